"""Merges a user can undo: persona unmerge / merge decisions hold through incremental runs, full
rebuilds and new files, rebuild every person table and the snapshot, and are undone by the next."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from persona_assets.contracts import IdentityOverrides
from persona_assets.core import identity, ingest, overrides
from persona_assets.datagen import generate, identify_records

from .test_incremental import COMPARED, assert_same, build, table

KEY = b"k"
OPTS = identity.IdentityOptions(min_link_records=100)


def _event(message_id: str, kind: str, at: str, **fields) -> str:
    return json.dumps({"messageId": message_id, "type": kind, "timestamp": at, **fields}) + "\n"


# Ann (u1) browses on a shared family tablet d1 that Bob (anonymous a2) also uses: one person
# through the tablet. Carl (u9) and his anonymous a7 were never seen together.
HAND = (
    _event("h1", "identify", "2025-01-01T10:00:00Z", userId="u1", anonymousId="a1", traits={"email": "ann@example.com"})
    + _event(
        "h2",
        "track",
        "2025-01-02T10:00:00Z",
        anonymousId="a1",
        event="Product Viewed",
        context={"device": {"id": "d1"}},
        properties={"category": "books", "price": 10},
    )
    + _event(
        "h3",
        "track",
        "2025-01-03T10:00:00Z",
        anonymousId="a2",
        event="Product Viewed",
        context={"device": {"id": "d1"}},
        properties={"category": "toys", "price": 5},
    )
    + _event("h4", "identify", "2025-01-04T10:00:00Z", userId="u9", anonymousId="a9", traits={"first_name": "Carl"})
    + _event(
        "h5",
        "track",
        "2025-01-05T10:00:00Z",
        anonymousId="a7",
        event="Product Viewed",
        properties={"category": "garden", "price": 7},
    )
)
# Later: the tablet again for both, and Carl's anonymous id again.
LATER = (
    _event(
        "h6",
        "track",
        "2025-02-01T10:00:00Z",
        anonymousId="a2",
        event="Product Viewed",
        context={"device": {"id": "d1"}},
        properties={"category": "toys", "price": 6},
    )
    + _event(
        "h7",
        "track",
        "2025-02-02T10:00:00Z",
        anonymousId="a1",
        event="Product Viewed",
        context={"device": {"id": "d1"}},
        properties={"category": "books", "price": 11},
    )
    + _event(
        "h8",
        "track",
        "2025-02-03T10:00:00Z",
        anonymousId="a7",
        event="Product Viewed",
        properties={"category": "garden", "price": 8},
    )
)


def person_of(con, kind: str, identifier: str) -> str | None:
    rows = con.execute(
        "SELECT person_id FROM identity_map WHERE identifier_type = ? AND identifier = ?", [kind, identifier]
    ).fetchall()
    return rows[0][0] if rows else None


def matched_person(con) -> tuple[str, list[str]]:
    """A person linkage made of exactly two sign-ups (one merged link), and their anonymousIds."""
    person = con.execute(
        """SELECT person_id FROM identity_links WHERE status = 'merged' GROUP BY 1 HAVING count(*) = 1
           AND person_id IN (SELECT person_id FROM identity_map GROUP BY 1 HAVING count(*) = 2)
           ORDER BY 1 LIMIT 1"""
    ).fetchall()[0][0]
    anons = [
        r[0]
        for r in con.execute("SELECT identifier FROM identity_map WHERE person_id = ? ORDER BY 1", [person]).fetchall()
    ]
    return person, anons


def identity_tables(con) -> dict:
    return {
        name: con.execute(sql).fetchall()
        for name, sql in {
            "identity_map": "SELECT identifier_type, identifier, person_id FROM identity_map ORDER BY ALL",
            "identity_guard": "SELECT * FROM identity_guard ORDER BY ALL",
            "identity_links": "SELECT record_id_l, record_id_r, person_id, status, reason FROM identity_links ORDER BY ALL",
            "deduped_users": "SELECT person_id, identifier_count, event_count, user_id FROM deduped_users ORDER BY ALL",
        }.items()
    }


@pytest.fixture
def linked(tmp_path: Path):
    """A warehouse where linkage merged duplicate sign-ups and a shared tablet joined Ann and Bob."""
    landing = tmp_path / "landing"
    identify_records(400, 3, landing)
    shutil.rmtree(landing / "_truth")
    (landing / "hand.jsonl").write_text(HAND)
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ingest.ingest(con, landing, KEY)
    assert identity.resolve(con, OPTS).links.merges > 50
    yield con, landing
    con.close()


def test_unmerge_and_merge_hold_through_incremental_runs_new_files_and_full_rebuilds(linked, tmp_path):
    con, landing = linked
    matched, (s1, s2) = matched_person(con)
    ann = person_of(con, "user_id", "u1")
    assert person_of(con, "anonymous_id", "a2") == person_of(con, "device_id", "d1") == ann  # the tablet joined them

    # Split the match, take the tablet out, join Carl's two ids: each applied by the next (incremental) run.
    split = overrides.unmerge(con, KEY, matched, reason="two sisters", by="tester")
    assert (split.kind, split.action, len(split.parts)) == ("split", "keep_apart", 2)
    taken = overrides.unmerge(con, KEY, "user_id:u1", "device_id:d1")
    assert (taken.kind, taken.action, taken.parts) == ("split", "take_out", [("device_id", "d1")])
    joined = overrides.merge(con, KEY, "user_id:u9", "a7")
    assert (joined.kind, joined.action) == ("merge", "join")
    report = identity.resolve(con, OPTS)
    assert report.mode == "incremental" and report.people_recomputed <= 8

    def holds() -> None:
        assert person_of(con, "anonymous_id", s1) != person_of(con, "anonymous_id", s2)
        assert person_of(con, "anonymous_id", "a1") == person_of(con, "user_id", "u1") == ann
        assert person_of(con, "anonymous_id", "a2") not in (None, ann)
        assert person_of(con, "device_id", "d1") is None  # a device taken out belongs to nobody
        assert person_of(con, "user_id", "u9") == person_of(con, "anonymous_id", "a7") is not None

    holds()
    # The match is kept, blocked, with the decision that blocked it; the tablet shows in the guard.
    assert con.execute("SELECT status, reason FROM identity_links WHERE reason LIKE 'kept apart%'").fetchall() == [
        ("blocked", f"kept apart by persona unmerge (decision {split.override_id})")
    ]
    assert con.execute("SELECT reason FROM identity_guard WHERE identifier = 'd1'").fetchall() == [
        (f"taken out by persona unmerge (decision {taken.override_id})",)
    ]
    history = con.execute("SELECT old_person_id, change FROM person_id_history ORDER BY changed_at").fetchall()
    # One run writes its changes with one timestamp, so their order among themselves is not defined.
    assert (matched, "split") in history and (ann, "split") in history and "merge" in {c for _, c in history}
    decisions = con.execute("SELECT * FROM identity_overrides").df()
    IdentityOverrides.validate(decisions)
    assert decisions.loc[decisions.override_id == split.override_id, "reason"].tolist() == ["two sisters"] * 2
    assert identity.resolve(con, OPTS).people_recomputed == 0  # applied once, not again on every run

    # A new file: the tablet again for both, Carl's anonymous id again; then a full rebuild.
    (landing / "later.jsonl").write_text(LATER)
    ingest.ingest(con, landing, KEY)
    assert identity.resolve(con, OPTS).mode == "incremental"
    holds()
    incremental = identity_tables(con)
    assert identity.resolve(con, OPTS, full=True).mode == "full"
    holds()
    assert identity_tables(con) == incremental


def test_a_later_decision_undoes_an_earlier_one(linked):
    con, _ = linked
    matched, (s1, s2) = matched_person(con)
    overrides.unmerge(con, KEY, matched)
    overrides.unmerge(con, KEY, "user_id:u1", "device_id:d1")
    identity.resolve(con, OPTS)
    # Merge the sisters back and put the tablet back: the splits are revoked, the links made again.
    back = overrides.merge(con, KEY, f"anonymous_id:{s1}", f"anonymous_id:{s2}")
    tablet = overrides.merge(con, KEY, "user_id:u1", "device_id:d1")
    assert back.revoked == [1] and tablet.revoked == [2]
    identity.resolve(con, OPTS)
    assert person_of(con, "anonymous_id", s1) == person_of(con, "anonymous_id", s2)
    assert person_of(con, "anonymous_id", "a2") == person_of(con, "device_id", "d1") == person_of(con, "user_id", "u1")
    assert not con.execute("SELECT count(*) FROM identity_guard WHERE identifier = 'd1'").fetchall()[0][0]
    # And unmerging the person a merge made undoes that merge.
    undo = overrides.unmerge(con, KEY, f"anonymous_id:{s1}")
    assert back.override_id in undo.revoked
    identity.resolve(con, OPTS)
    assert person_of(con, "anonymous_id", s1) != person_of(con, "anonymous_id", s2)
    active = con.execute("SELECT DISTINCT override_id FROM identity_overrides WHERE revoked_at IS NULL ORDER BY 1")
    assert [r[0] for r in active.fetchall()] == [tablet.override_id, undo.override_id]


def test_decisions_that_cannot_be_made_say_why(linked):
    con, _ = linked
    ann = person_of(con, "user_id", "u1")
    carl = person_of(con, "user_id", "u9")
    cases = {
        "No person p0000000000000000": lambda: overrides.unmerge(con, KEY, "p0000000000000000"),
        "No person holds 'user_id:nobody'": lambda: overrides.merge(con, KEY, "user_id:nobody", ann),
        "events tie all its identifiers together": lambda: overrides.unmerge(con, KEY, carl),
        f"belongs to {carl}, not to {ann}": lambda: overrides.unmerge(con, KEY, ann, "user_id:u9"),
        "are already one person": lambda: overrides.merge(con, KEY, "user_id:u1", "anonymous_id:a1"),
    }
    for message, decide in cases.items():
        with pytest.raises(overrides.OverrideError, match=message):
            decide()
    # An email is found by its address, hashed as ingest hashed it (never stored raw).
    assert overrides.find(con, KEY, "email:Ann@Example.com").person_id == ann
    assert not con.execute("SELECT count(*) FROM identity_overrides").fetchall()[0][0]


@pytest.mark.slow
def test_incremental_equals_full_with_overrides_in_place(tmp_path):
    """Every person table after decisions and a new file equals a full rebuild of the same warehouse."""
    source = tmp_path / "gen"
    generate(600, 29, source, "jsonl", people_per_file=300)
    identify_records(300, 4, source / "signups")
    landing = tmp_path / "inc" / "landing"
    landing.mkdir(parents=True)
    files = sorted(source.glob("*.jsonl"))
    shutil.copy2(files[0], landing)
    shutil.copy2(source / "signups" / "signups-s4.jsonl", landing)
    (landing / "hand.jsonl").write_text(HAND)
    from persona_assets.core.models import ModelStore

    store = ModelStore(tmp_path / "inc" / "models")
    path = tmp_path / "inc" / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        build(con, landing, store)
        matched, _ = matched_person(con)
        overrides.unmerge(con, KEY, matched)
        overrides.unmerge(con, KEY, "user_id:u1", "device_id:d1")
        overrides.merge(con, KEY, "user_id:u9", "anonymous_id:a7")
        applied = build(con, landing, store)
        assert 0 < applied["identity"] <= 8 and applied["profiles"] is not None
        for f in files[1:]:
            shutil.copy2(f, landing)
        (landing / "later.jsonl").write_text(LATER)
        build(con, landing, store)
        incremental = {name: table(con, name) for name in COMPARED}
        # The decisions hold: the match is blocked, the tablet is nobody's, Carl is one person.
        assert con.execute("SELECT count(*) FROM identity_links WHERE reason LIKE 'kept apart%'").fetchall()[0][0]
        assert person_of(con, "device_id", "d1") is None
        assert person_of(con, "user_id", "u9") == person_of(con, "anonymous_id", "a7") is not None
    full = tmp_path / "full"
    shutil.copytree(tmp_path / "inc", full)
    with duckdb.connect(str(full / "warehouse.duckdb")) as con:
        build(con, full / "landing", ModelStore(full / "models"), full=True)
        assert con.execute("SELECT count(DISTINCT override_id) FROM identity_overrides").fetchall()[0][0] == 3
        rebuilt = {name: table(con, name) for name in COMPARED}
    for name in COMPARED:
        assert_same(incremental[name], rebuilt[name], name)


# --- the commands, end to end through the asset graph and the snapshot -----------------------


def persona(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (its PERSONA_HOME), capturing what it prints."""
    import contextlib
    import io

    from persona_assets.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code, err = exc.code, io.StringIO(f"{err.getvalue()}{exc.code}")
    return code, out.getvalue(), err.getvalue()


def run_graph(home: Path) -> None:
    """Materialize every asset as `persona run` does; the run and every blocking check must pass
    (the drift warning may sound: sign-ups with no behaviour beside shoppers move model inputs)."""
    import dagster as dg

    from persona_assets.definitions import build_definitions

    result = (
        build_definitions(home)
        .resolve_implicit_global_asset_job_def()
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure][:3]
    failed = [
        e.event_specific_data.check_name
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and not e.event_specific_data.passed
        and e.event_specific_data.severity == dg.AssetCheckSeverity.ERROR
    ]
    assert not failed, failed


@pytest.mark.slow
def test_unmerge_and_merge_commands_rebuild_every_person_table_and_the_snapshot(persona_home, generated):
    from persona_assets.core.publish import open_snapshot

    from .conftest import land

    land(generated(), persona_home / "landing")
    identify_records(400, 3, persona_home / "signups")
    shutil.copy2(persona_home / "signups" / "signups-s3.jsonl", persona_home / "landing")
    (persona_home / "landing" / "hand.jsonl").write_text(HAND)
    (persona_home / "persona.yaml").write_text("identity:\n  min_link_records: 100\n")
    run_graph(persona_home)
    snapshot = persona_home / "serving" / "persona.duckdb"
    with duckdb.connect(str(persona_home / "warehouse.duckdb"), read_only=True) as con:
        matched, (s1, s2) = matched_person(con)
        ann = person_of(con, "user_id", "u1")

    code, out, err = persona("unmerge", matched, "--reason", "two sisters")
    assert code == 0, err
    assert f"Decision #1 (split): {matched} is split into its 2 groups" in out
    assert "Undo with: persona merge" in out and "Traceback" not in out + err
    assert f"person_id_history:\n  {matched} -> " in out and ": split, 1 identifier(s) moved" in out
    code, out, err = persona("unmerge", "user_id:u1", "--identifier", "device_id:d1")
    assert code == 0, err
    assert "device_id:d1: nobody (kept out of linking)" in out
    code, out, err = persona("merge", "user_id:u9", "anonymous_id:a7")
    assert code == 0, err
    with open_snapshot(snapshot) as con:
        a, b = person_of(con, "anonymous_id", s1), person_of(con, "anonymous_id", s2)
        bob = person_of(con, "anonymous_id", "a2")
        carl = person_of(con, "user_id", "u9")
        assert a != b and bob != ann and person_of(con, "anonymous_id", "a7") == carl
        # Every person table and the profiles have a row for each person now, and only for them.
        everyone = {r[0] for r in con.execute("SELECT DISTINCT person_id FROM identity_map").fetchall()}
        for name in ("cleaned_users", "segments", "user_profiles"):
            people = {r[0] for r in con.execute(f"SELECT person_id FROM {name}").fetchall()}
            assert {a, b, ann, bob, carl} <= people, name
            assert people <= everyone, name
        assert {r[0] for r in con.execute("SELECT person_id FROM user_profiles").fetchall()} == everyone
        assert {r[0] for r in con.execute("SELECT DISTINCT person_id FROM imputed_attributes").fetchall()} >= {a, b}
        changes = con.execute("SELECT old_person_id, change FROM person_id_history").fetchall()
        assert (matched, "split") in changes and (ann, "split") in changes and ("merge" in {c for _, c in changes})
        events = dict(
            con.execute(
                "SELECT person_id, event_count FROM user_profiles WHERE person_id IN (?, ?)", [ann, bob]
            ).fetchall()
        )
        assert events == {ann: 2, bob: 1}  # the tablet's events went with the anonymousId that sent them

    # A new file through the whole graph keeps every decision.
    (persona_home / "landing" / "later.jsonl").write_text(LATER)
    run_graph(persona_home)
    with open_snapshot(snapshot) as con:
        assert person_of(con, "anonymous_id", s1) != person_of(con, "anonymous_id", s2)
        assert person_of(con, "device_id", "d1") is None and person_of(con, "anonymous_id", "a2") != ann
        assert person_of(con, "anonymous_id", "a7") == carl

    # Mistakes are one plain line, no traceback.
    code, out, err = persona("unmerge", "p0000000000000000")
    assert code == 1 and err.startswith("persona: No person p0000000000000000") and "Traceback" not in err


def test_a_locked_warehouse_is_said_plainly(linked, tmp_path, monkeypatch):
    con, _ = linked
    con.close()
    home = tmp_path
    monkeypatch.setenv("PERSONA_HOME", str(home))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)",
            str(home / "warehouse.duckdb"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = persona("merge", "user_id:u9", "anonymous_id:a7", "--wait", "0")
    finally:
        holder.kill()
        holder.wait()
    assert code not in (0, None) and "The warehouse is busy" in str(code) + err and "Traceback" not in err
    with duckdb.connect(str(home / "warehouse.duckdb")) as again:
        overrides.ensure_table(again)
        assert again.execute("SELECT count(*) FROM identity_overrides").fetchall()[0][0] == 0


def test_forgetting_a_person_erases_the_decisions_naming_them(linked):
    from persona_assets.core import erasure

    con, landing = linked
    overrides.merge(con, KEY, "user_id:u9", "anonymous_id:a7")
    identity.resolve(con, OPTS)
    erasure.forget(con, KEY, "u9", landing)
    assert not con.execute("SELECT count(*) FROM identity_overrides WHERE identifier IN ('u9', 'a7')").fetchall()[0][0]
