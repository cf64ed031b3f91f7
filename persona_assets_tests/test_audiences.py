"""Audiences and computed traits: the definitions file checked as a whole, every kind of trait on
hand-written events in another vocabulary, audiences compiled with bound values and explained,
an incremental refresh equal to a full one, and CDNOW's orders through the assets."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from persona_assets import cli
from persona_assets.core import audience_definitions as defs
from persona_assets.core import audiences, computed_traits
from persona_assets.core.cleaning import clean
from persona_assets.core.identity import resolve
from persona_assets.core.ingest import ingest
from persona_assets.settings import load_settings

# --- the definitions file ----------------------------------------------------------------------------

GOOD = """\
computed_traits:
  orders_30d:      {count: {event: Order Completed, within_days: 30}}
  lifetime_value:  {sum: {event: Order Completed, property: revenue}}
  favourite_category: {most_frequent: {event: Product Viewed, property: category}}
audiences:
  recent_book_buyers:
    description: ordered at least twice in 30 days, books first
    where:
      all:
        - {event: Order Completed, count: {gte: 2}, within_days: 30}
        - {trait: top_category, in: [books]}
  buyers:
    where: {trait: order_count, gte: 1}
  book_lovers: {where: {any: [{trait: category_affinity.books, gt: 3}, {segment: S1}]}}
  not_buyers: {where: {not: {audience: buyers}}}
destinations:
  crm:     {webhook: {url: "http://127.0.0.1:9000/hook", secret_env: PERSONA_HOOK_SECRET}, audiences: [recent_book_buyers]}
  exports: {file: {folder: exports, format: csv}}
"""
VOCAB = defs.Vocabulary(events=frozenset({"Order Completed", "Product Viewed"}), segments=frozenset({"S1", "S2"}))


def _load(tmp_path: Path, text: str, vocab: defs.Vocabulary = VOCAB) -> defs.Definitions:
    (tmp_path / "audiences.yaml").write_text(text)
    return defs.load(tmp_path, None, vocab)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(defs.DefinitionsError) as caught:
        _load(tmp_path, text)
    return caught.value.problems


def test_a_good_file_defines_traits_audiences_and_destinations(tmp_path):
    d = _load(tmp_path, GOOD)
    assert list(d.traits) == ["orders_30d", "lifetime_value", "favourite_category"]
    assert d.traits["orders_30d"].within_days == 30 and d.traits["lifetime_value"].column == "number"
    assert d.traits["favourite_category"].column == "text"
    # The event condition's count is a computed trait of its own, named after its audience and line.
    assert "recent_book_buyers.line_10" in d.all_traits
    assert d.depends_on("not_buyers") == ["buyers"]
    assert d.destinations["crm"].audiences == ("recent_book_buyers",) and d.destinations["exports"].format == "csv"


@pytest.mark.parametrize(
    "replace, expected",
    [
        ("{trait: top_category, in: [books]}", None),
        (
            "{trait: top_categry, in: [books]}",
            ":11: audiences.recent_book_buyers: unknown trait 'top_categry'; traits: age_bracket",
        ),
        (
            "{trait: top_category, like: books}",
            ":11: audiences.recent_book_buyers: unknown operator 'like'; operators: eq, in, gte",
        ),
        ("{trait: order_count, gte: many}", ":11: audiences.recent_book_buyers: gte on a number takes a number"),
        (
            "{event: Order Complete, count: {gte: 1}}",
            ":11: audiences.recent_book_buyers: unknown event "
            "'Order Complete'; the data's events: Order Completed, Product",
        ),
        (
            "{event: Order Completed, count: {gte: 1}, where: {brand: x}}",
            ":11: audiences.recent_book_buyers.where: unknown property 'brand'; allowed: age",
        ),
        ("{audience: buyerz}", ":11: audiences.recent_book_buyers: unknown audience 'buyerz'; audiences: book_lovers"),
        ("{segment: S9}", ":11: audiences.recent_book_buyers: unknown segment S9; segments: S1, S2"),
        (
            "{audience: recent_book_buyers}",
            ":6: audiences.recent_book_buyers: audiences depend on each other: "
            "recent_book_buyers -> recent_book_buyers",
        ),
    ],
)
def test_each_mistake_is_refused_with_its_line_and_the_allowed_names(tmp_path, replace, expected):
    text = GOOD.replace("{trait: top_category, in: [books]}", replace)
    if expected is None:
        _load(tmp_path, text)
        return
    problems = _problems(tmp_path, text)
    assert len(problems) == 1 and expected in problems[0], problems


def test_every_mistake_is_named_at_once(tmp_path):
    text = GOOD.replace("property: revenue", "property: revenu").replace("gte: 1}", "gte: 1, lte: 3}")
    text = text.replace(
        "audiences:\n",
        "audiences:\n  loop_a: {where: {audience: loop_b}}\n  loop_b: {where: {not: {audience: loop_a}}}\n",
        1,
    )
    problems = _problems(tmp_path, text)
    assert any(":3: computed_traits.lifetime_value: unknown numeric property 'revenu'" in p for p in problems)
    assert any("a trait condition takes one operator, got gte, lte" in p for p in problems)
    assert any("audiences depend on each other: loop_a -> loop_b -> loop_a" in p for p in problems)


def test_destinations_are_checked(tmp_path):
    text = GOOD.replace("secret_env: PERSONA_HOOK_SECRET", 'secret_env: "hunter2 is my secret"').replace(
        "format: csv", "format: xlsx"
    )
    problems = _problems(tmp_path, text)
    assert any("destinations.crm: secret_env names the environment variable" in p for p in problems)
    assert any("destinations.exports: format is csv or parquet, got 'xlsx'" in p for p in problems)


def test_the_sections_may_live_in_persona_yaml(tmp_path):
    (tmp_path / "persona.yaml").write_text("cleaning:\n  sparse_threshold: 0.4\n" + GOOD)
    assert load_settings(tmp_path / "persona.yaml")["cleaning"] == {"sparse_threshold": 0.4}
    d = defs.load(tmp_path, tmp_path / "persona.yaml", VOCAB)
    assert set(d.audiences) == {"recent_book_buyers", "buyers", "book_lovers", "not_buyers"}
    assert d.source.endswith("persona.yaml")
    # audiences.yaml, when present, is the one in force.
    (tmp_path / "audiences.yaml").write_text("audiences:\n  everyone: {where: {trait: event_count, gte: 0}}\n")
    assert list(defs.load(tmp_path, tmp_path / "persona.yaml", VOCAB).audiences) == ["everyone"]


# --- every kind of trait, on hand-written events of a music service -------------------------------------

NOW = datetime(2026, 3, 1, 12, 0)


def _event(mid: str, who: dict, name: str, days_ago: float, **properties) -> str:
    at = (NOW - timedelta(days=days_ago)).isoformat() + "Z"
    return (
        json.dumps({"messageId": mid, "type": "track", "event": name, "timestamp": at, **who, "properties": properties})
        + "\n"
    )


A, B, C = {"userId": "listener-a"}, {"userId": "listener-b"}, {"anonymousId": "visitor-c"}
MUSIC = [
    _event("a1", A, "Track Played", 1, category="jazz", product_id="t1"),
    _event("a2", A, "Track Played", 2, category="jazz", product_id="t2"),
    _event("a3", A, "Track Played", 3, category="rock", product_id="t3"),
    _event("a4", A, "Track Played", 40, category="jazz", product_id="t1"),
    _event("a5", A, "Plan Purchased", 5, revenue=9.99),
    _event("a6", A, "Plan Purchased", 50, revenue=4.99),
    _event("b1", B, "Track Played", 10, category="rock", product_id="t3"),
    _event("b2", B, "Track Played", 60, category="rock", product_id="t4"),
    _event("c1", C, "Plan Purchased", 0, revenue=19.99),
]
MUSIC_DEFS = """\
computed_traits:
  plays_30d:   {count: {event: Track Played, within_days: 30}}
  spend:       {sum: {event: Plan Purchased, property: revenue}}
  avg_plan:    {mean: {event: Plan Purchased, property: revenue}}
  cheapest:    {min: {event: Plan Purchased, property: revenue}}
  priciest:    {max: {event: Plan Purchased, property: revenue}}
  top_genre:   {most_frequent: {event: Track Played, property: category}}
  first_genre: {first: {event: Track Played, property: category}}
  last_genre:  {last: {event: Track Played, property: category}}
  genres:      {unique_list: {event: Track Played, property: category}}
  tracks:      {unique_count: {event: Track Played, property: product_id}}
  jazz_plays:  {count: {event: Track Played, where: {category: jazz}}}
audiences:
  jazz_fans:
    where:
      all:
        - {trait: top_genre, eq: jazz}
        - {event: Track Played, count: {gte: 2}, within_days: 7, where: {category: jazz}}
  payers: {where: {trait: spend, gt: 0}}
  listeners_not_paying: {where: {all: [{trait: plays_30d, gte: 1}, {not: {audience: payers}}]}}
  silent: {where: {trait: plays_30d, eq: 0}}
  rock_listeners: {where: {trait: genres, contains: [rock, metal]}}
  recent: {where: {trait: last_seen_at, gte: 2026-02-28}}
"""


@pytest.fixture
def music(tmp_path):
    """A warehouse of the music service's events, resolved and cleaned, with the people profiled."""
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "plays.jsonl").write_text("".join(MUSIC))
    (tmp_path / "audiences.yaml").write_text(MUSIC_DEFS)
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ingest(con, tmp_path / "landing", b"k")
    resolve(con)
    clean(con)
    # The audience stages read user_profiles' people and columns: cleaned_users has those these conditions use.
    con.execute("CREATE TABLE user_profiles AS SELECT * FROM cleaned_users")
    people = dict(
        con.execute(
            "SELECT identifier, person_id FROM identity_map WHERE identifier_type IN ('user_id', 'anonymous_id')"
        ).fetchall()
    )
    yield con, tmp_path, {"a": people["listener-a"], "b": people["listener-b"], "c": people["visitor-c"]}
    con.close()


def _traits(con, person: str) -> dict:
    rows = con.execute(
        "SELECT trait, kind, number, text, list, source FROM computed_traits WHERE person_id = ?", [person]
    ).fetchall()
    assert {r[5] for r in rows} <= {"computed"}
    return {t: (n if n is not None else (s if s is not None else lst)) for t, _, n, s, lst, _ in rows}


def test_every_kind_of_trait_on_events_in_another_vocabulary(music):
    con, home, who = music
    d = defs.load(home, None, audiences.vocabulary(con))
    report = computed_traits.build(con, d)
    assert report.mode == "full" and report.as_of == NOW
    a = _traits(con, who["a"])
    assert a.pop("spend") == pytest.approx(14.98) and a.pop("avg_plan") == pytest.approx(7.49)
    assert a == {
        "plays_30d": 3,
        "cheapest": 4.99,
        "priciest": 9.99,
        "top_genre": "jazz",
        "first_genre": "jazz",
        "last_genre": "jazz",
        "genres": ["jazz", "rock"],
        "tracks": 3,
        "jazz_plays": 3,
        "jazz_fans.line_18": 2,
    }
    assert _traits(con, who["b"]) == {
        "plays_30d": 1,
        "top_genre": "rock",
        "first_genre": "rock",
        "last_genre": "rock",
        "genres": ["rock"],
        "tracks": 2,
    }
    c = _traits(con, who["c"])
    assert c["spend"] == pytest.approx(19.99) and "plays_30d" not in c  # no matching event: no row (reads as 0)


def _members(con, d, name: str) -> set[str]:
    sql, params = audiences.members_sql(d, name)
    return {r[0] for r in con.execute(sql, params).fetchall()}


def test_audiences_over_traits_events_and_other_audiences(music):
    con, home, who = music
    d = defs.load(home, None, audiences.vocabulary(con))
    computed_traits.build(con, d)
    a, b, c = who["a"], who["b"], who["c"]
    assert _members(con, d, "jazz_fans") == {a}
    assert _members(con, d, "payers") == {a, c}
    assert _members(con, d, "listeners_not_paying") == {b}
    assert _members(con, d, "silent") == {c}
    assert _members(con, d, "rock_listeners") == {a, b}
    assert _members(con, d, "recent") == {a, c}
    # Evaluated into the tables: entries now, exits when the data changes.
    first = audiences.evaluate(con, d, "payers", "run-1")
    assert (first.size, first.entered, first.exited) == (2, 2, 0)
    con.execute("DELETE FROM computed_traits WHERE person_id = ? AND trait = 'spend'", [c])
    second = audiences.evaluate(con, d, "payers", "run-2")
    assert (second.size, second.entered, second.exited) == (1, 0, 1)
    changes = con.execute(
        "SELECT change_id, person_id, change, run FROM audience_changes ORDER BY change_id"
    ).fetchall()
    assert [(p, ch, r) for _, p, ch, r in changes][-1] == (c, "exited", "run-2")
    assert [i for i, *_ in changes] == list(range(1, len(changes) + 1))
    assert {r[0] for r in con.execute("SELECT person_id FROM audience_members").fetchall()} == {a}
    assert con.execute("SELECT count(*) FROM audience_runs WHERE audience = 'payers'").fetchall()[0][0] == 2


def test_why_a_person_is_in_or_out(music):
    con, home, who = music
    d = defs.load(home, None, audiences.vocabulary(con))
    computed_traits.build(con, d)
    reasons = audiences.explain(con, d, "listeners_not_paying", who["a"])
    lines = [(r.depth, r.holds, r.text.split(":")[0], r.value) for r in reasons]
    assert lines == [
        (1, False, "line 20", None),  # all of
        (2, True, "line 20", 3),  # plays_30d >= 1
        (2, False, "line 20", None),  # not
        (3, True, "line 20", None),  # in audience payers
        (4, True, "line 19", pytest.approx(14.98)),  # spend > 0
    ]
    assert audiences.explain(con, d, "silent", who["c"])[0].holds  # no plays: the count reads 0


def test_values_from_the_file_are_bound_never_pasted(music):
    con, home, who = music
    hostile = "jazz'; DROP TABLE user_profiles; --"
    text = MUSIC_DEFS.replace("{trait: top_genre, eq: jazz}", json.dumps({"trait": "top_genre", "eq": hostile}))
    text = text.replace("where: {category: jazz}", "where: {category: " + json.dumps(hostile) + "}")
    (home / "audiences.yaml").write_text(text)
    d = defs.load(home, None, audiences.vocabulary(con))
    computed_traits.build(con, d)
    sql, params = audiences.members_sql(d, "jazz_fans")
    assert hostile not in sql and hostile in params.values()
    assert _members(con, d, "jazz_fans") == set()
    assert con.execute("SELECT count(*) FROM user_profiles").fetchall()[0][0] == 3


# --- an incremental refresh equals a full one ------------------------------------------------------------

GENERATED_DEFS = """\
computed_traits:
  orders_30d:   {count: {event: Order Completed, within_days: 30}}
  views_7d:     {count: {event: Product Viewed, within_days: 7}}
  spend:        {sum: {event: Order Completed, property: revenue}}
  favourite:    {most_frequent: {event: Product Viewed, property: category}}
  last_device:  {last: {property: device_type}}
  categories:   {unique_list: {event: Product Viewed, property: category, within_days: 14}}
audiences:
  buyers_30d: {where: {event: Order Completed, count: {gte: 1}, within_days: 30}}
  browsers: {where: {all: [{event: Product Viewed, count: {gte: 3}, within_days: 7}, {not: {audience: buyers_30d}}]}}
  lapsed: {where: {all: [{trait: order_count, gte: 1}, {trait: days_since_last_order, gt: 20}]}}
  fans: {where: {any: [{trait: favourite, in: [books, gaming]}, {trait: category_affinity.fashion, gte: 2}]}}
"""


@pytest.mark.slow
def test_increments_equal_a_full_rebuild(tmp_path):
    from persona_assets.core.models import ModelStore
    from persona_assets.datagen import generate

    from .test_incremental import _stamp, assert_same, build, rebuild_beside, split_lines

    generate(600, 31, tmp_path / "gen", "jsonl", people_per_file=300)
    parts = split_lines(tmp_path / "gen", 3, seed=2)
    # A last, small increment: the newest events (the clock moves on for everyone, few people act).
    last = sorted(parts[-1], key=_stamp)
    parts = [*parts[:-1], last[:-40], last[-40:]]
    inc, full = tmp_path / "inc", tmp_path / "full"
    for home in (inc, full):
        (home / "landing").mkdir(parents=True)
        (home / "audiences.yaml").write_text(GENERATED_DEFS)
    reports = []
    with duckdb.connect(str(inc / "warehouse.duckdb")) as con:
        for i, lines in enumerate(parts):
            (inc / "landing" / f"part-{i}.jsonl").write_text("".join(lines))
            build(con, inc / "landing", ModelStore(inc / "models"))
            d = defs.load(inc, None, audiences.vocabulary(con))
            reports.append(computed_traits.build(con, d))
            for name in d.audiences:
                audiences.evaluate(con, d, name, f"run-{i}")
        incremental = _audience_tables(con)
        people = con.execute("SELECT count(*) FROM user_profiles").fetchall()[0][0]
    assert reports[0].mode == "full" and all(r.mode == "incremental" for r in reports[1:])
    assert all(r.people_recomputed > 0 for r in reports[1:]) and reports[-1].people_recomputed < people / 2, reports
    with duckdb.connect(str(full / "warehouse.duckdb")) as con:
        rebuild_beside(con, inc, full)
        d = defs.load(full, None, audiences.vocabulary(con))
        assert computed_traits.build(con, d, full=True).mode == "full"
        for name in d.audiences:
            audiences.evaluate(con, d, name, "full")
        rebuilt = _audience_tables(con)
    for name in incremental:
        assert_same(incremental[name], rebuilt[name], name)
    assert len(incremental["computed_traits"]) > 0
    assert incremental["members"].groupby("audience").size().min() > 0  # every audience has someone


def _audience_tables(con) -> dict[str, pd.DataFrame]:
    traits = con.execute("SELECT * FROM computed_traits ORDER BY person_id, trait").df()
    members = con.execute("SELECT audience, person_id FROM audience_members ORDER BY 1, 2").df()
    return {"computed_traits": traits.reset_index(drop=True), "members": members.reset_index(drop=True)}


# --- CDNOW's orders through the assets, the definitions in persona.yaml ------------------------------------

CDNOW_AUDIENCES = """
computed_traits:
  cds_bought:    {sum: {event: Order Completed, property: quantity}}
  biggest_order: {max: {event: Order Completed, property: revenue}}
  orders_90d:    {count: {event: Order Completed, within_days: 90}}
audiences:
  big_spenders:
    description: three orders or more, one of them at least $100
    where: {all: [{trait: order_count, gte: 3}, {trait: biggest_order, gte: 100}]}
  active: {where: {event: Order Completed, count: {gte: 2}, within_days: 90}}
  lapsed_regulars: {where: {all: [{trait: order_count, gte: 2}, {not: {audience: active}}]}}
  collectors: {where: {trait: cds_bought, gte: 50}}
destinations:
  exports: {file: {folder: exports, format: parquet}, audiences: [big_spenders, collectors]}
"""


@pytest.mark.slow
def test_cdnow_audiences_through_the_assets(persona_home, capsys):
    from .conftest import materialize_all
    from .test_foreign import CDNOW_SETTINGS, cdnow

    orders = cdnow().reset_index(names="order_no")
    orders["order_no"] = "cdnow-" + orders["order_no"].astype(str)
    orders.to_csv(persona_home / "landing" / "cdnow_orders.csv", index=False)
    (persona_home / "persona.yaml").write_text(CDNOW_SETTINGS + CDNOW_AUDIENCES)
    materialize_all(persona_home)

    orders["at"] = pd.to_datetime(orders["date"], format="%Y%m%d")
    as_of = orders["at"].max()
    recent = orders[orders["at"] > as_of - pd.Timedelta(days=90)].groupby("customer_id").size()
    per = orders.groupby("customer_id").agg(
        n=("order_no", "size"), top=("dollar_value", "max"), cds=("number_of_cds", "sum")
    )
    expected = {
        "big_spenders": set(per[(per.n >= 3) & (per.top >= 100)].index),
        "active": set(recent[recent >= 2].index),
        "lapsed_regulars": set(per[per.n >= 2].index) - set(recent[recent >= 2].index),
        "collectors": set(per[per.cds >= 50].index),
    }
    with duckdb.connect(str(persona_home / "serving" / "persona.duckdb"), read_only=True) as con:
        got = con.execute(
            """SELECT a.audience, m.identifier FROM audience_members a JOIN identity_map m USING (person_id)
               WHERE m.identifier_type = 'user_id'"""
        ).df()
        runs = con.execute("SELECT audience, size, entered, exited FROM audience_runs ORDER BY audience").fetchall()
        state = con.execute("SELECT destination, delivered FROM destination_deliveries").fetchall()
        person = con.execute(
            "SELECT person_id FROM identity_map WHERE identifier_type = 'user_id' AND identifier = ?",
            [sorted(expected["big_spenders"])[0]],
        ).fetchall()[0][0]
    for name, people in expected.items():
        assert set(got[got.audience == name].identifier) == people, name
        assert people, name
    assert {r[0]: (r[1], r[2], r[3]) for r in runs}["collectors"] == (len(expected["collectors"]),) * 2 + (0,)
    assert state == [("exports", sum(len(expected[a]) for a in ("big_spenders", "collectors")))]
    exported = pd.read_parquet(persona_home / "exports" / "big_spenders.parquet")
    assert set(exported["user_id"]) == expected["big_spenders"]
    assert (persona_home / "audiences" / "big_spenders.size.png").read_bytes()[:4] == b"\x89PNG"

    assert cli.main(["audience", "big_spenders", person]) == 0
    out = capsys.readouterr().out
    assert f"{person} is IN since" in out and "holds  line" in out and "biggest_order" in out
    assert cli.main(["destinations"]) == 0
    assert "exports (file):" in capsys.readouterr().out


# --- real time: the stream consumer decides what it can, and agrees with the batch ---------------------

LIVE_DEFS = """\
computed_traits:
  orders_total: {count: {event: Order Completed}}
  views_7d:     {count: {event: Product Viewed, within_days: 7}}
audiences:
  repeat_buyers: {where: {trait: orders_total, gte: 2}}
  viewers: {where: {event: Product Viewed, count: {gte: 3}, within_days: 7}}
  big_not_browsing: {where: {all: [{trait: total_revenue, gte: 100}, {not: {audience: viewers}}]}}
  carted_not_ordered:
    where:
      all:
        - {event: Product Added, count: {gte: 1}, within_days: 14, where: {price: {gte: 20}}}
        - {event: Order Completed, count: {eq: 0}, within_days: 14}
  quiet_week: {where: {any: [{trait: views_7d, eq: 0}, {trait: event_count, lt: 3}]}}
  lapsing: {where: {trait: days_since_last_order, gt: 10}}
"""


@pytest.fixture
def redis_url(tmp_path):
    from persona_assets import stream

    server, url = stream.start_redis(tmp_path / "redis")
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_the_stream_decides_audiences_as_the_next_batch_run_does(tmp_path, redis_url):
    from persona_assets import stream
    from persona_assets.core.ingest import landing_files
    from persona_assets.core.publish import publish_snapshot
    from persona_assets.datagen import generate
    from persona_assets.stream_audiences import CHANGES, LiveAudiences

    generate(250, 29, tmp_path / "landing", "jsonl", people_per_file=125)
    (tmp_path / "audiences.yaml").write_text(LIVE_DEFS)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        ingest(con, tmp_path / "landing", b"k")
        resolve(con)
        clean(con)
        con.execute("CREATE TABLE user_profiles AS SELECT * FROM cleaned_users")
        publish_snapshot(con, tmp_path / "serving" / "persona.duckdb", {"identity_map": "SELECT * FROM identity_map"})
        d = defs.load(tmp_path, None, audiences.vocabulary(con))
        computed_traits.build(con, d)
        batch = {name: _members(con, d, name) for name in d.audiences}

    client = stream.connect(redis_url)
    stream.load_identity(client, tmp_path / "serving" / "persona.duckdb")
    sent = sum(stream.publish(client, path) for path in landing_files(tmp_path / "landing"))
    live = LiveAudiences(client, d)
    assert sorted(live.audiences) == sorted(set(d.audiences) - {"lapsing"})  # a batch-only field waits
    worker = stream.Consumer(
        client,
        stream.RedisStreamSource(client, "one"),
        tmp_path / "out",
        stream.ConsumerOptions(block_ms=50),
        audiences=live,
    )
    while worker.handled < sent:
        assert worker.step() or worker.handled == sent, "stream ran dry"
    worker.flush()  # settles the last events, then re-decides everyone as of the final clock
    for name in live.audiences:
        assert live.members(name) == batch[name], name
        assert batch[name], name
    # Every entry and exit was emitted: replaying the changes stream gives the members.
    replayed: dict[str, set[str]] = {}
    for _, fields in client.xrange(CHANGES):
        members = replayed.setdefault(fields[b"audience"].decode(), set())
        person = fields[b"person_id"].decode()
        members.add(person) if fields[b"change"] == b"entered" else members.discard(person)
    assert {n: replayed.get(n, set()) for n in live.audiences} == {n: batch[n] for n in live.audiences}
    assert any(f[b"change"] == b"exited" for _, f in client.xrange(CHANGES))  # windows ended as the clock moved


@pytest.mark.slow
def test_a_file_with_mistakes_changes_nothing_and_does_not_fail_the_run(music):
    import dagster as dg

    from persona_assets.definitions import build_definitions

    con, home, who = music
    con.close()  # the run opens the warehouse itself
    selection = [
        "computed_traits",
        "audience_members",
        "audience_changes",
        "audience_runs",
        "destination_deliveries",
        "destination_dead_letters",
    ]

    def run():
        defs_ = build_definitions(home)
        keys = [dg.AssetKey(s) for s in selection] + [
            k for k in defs_.resolve_all_asset_keys() if k.path[0] == "audiences"
        ]
        result = defs_.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), asset_selection=keys, raise_on_error=False
        )
        assert result.success, [e.message for e in result.all_events if e.is_failure][:3]
        return {asset: status for assets, status in cli.stage_statuses(result.all_events) for asset in assets}

    def members():
        with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as c:
            return c.execute("SELECT audience, person_id FROM audience_members ORDER BY ALL").fetchall()

    assert run() == {}
    before = members()
    assert ("payers", who["c"]) in before and len(before) > 5
    (home / "audiences.yaml").write_text(MUSIC_DEFS.replace("{trait: spend, gt: 0}", "{trait: spent, gt: 0}"))
    statuses = run()
    assert set(statuses) == set(selection)  # every audience asset said why it changed nothing
    assert "audiences.yaml:19: audiences.payers: unknown trait 'spent'" in statuses["computed_traits"]
    assert members() == before  # nothing retired, nothing recomputed with a file that has mistakes
