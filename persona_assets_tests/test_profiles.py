import pandas as pd
import pytest

from persona_assets.core import imputation, profiles
from persona_assets.core.affinity import (
    INTERACTIONS_SQL,
    AffinityOptions,
    decay_to,
    decayed_update,
    segment_priors,
    shrunk_top,
)
from persona_assets.core.pii import hmac_hex, normalize_email
from persona_assets.settings import shipped_enrichment

from .conftest import segmented_copy

KEY = b"k"  # the key the resolved fixture was ingested with


@pytest.fixture(scope="module")
def profiled(resolved, tmp_path_factory):
    con, store, truth_dir = segmented_copy(resolved, tmp_path_factory.mktemp("profiled"))
    imputation.impute(con, store, imputation.ImputationOptions(enrichment_path=str(shipped_enrichment())))
    profiles.build(con)
    yield con, truth_dir
    con.close()


def test_one_profile_per_person_with_every_core_trait_sourced(profiled):
    con, _ = profiled
    table = con.execute("SELECT * FROM user_profiles").df()
    assert len(table) == con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]
    assert table.person_id.is_unique
    for trait in profiles.CORE_TRAITS:
        assert table[f"{trait}_source"].notna().all()
        known = table[table[f"{trait}_source"] != "unknown"]
        assert known[trait].notna().all()
    assert table.completeness.between(0, 1).all() and table.segment_id.notna().all()
    buyers = table[table.order_count > 0]
    assert (buyers.top_category.notna()).mean() > 0.99


def test_category_affinity_is_the_decayed_weighted_sum(profiled):
    con, _ = profiled
    opts = AffinityOptions()
    as_of = con.execute("SELECT max(event_at) FROM raw_events").fetchall()[0][0]
    person = con.execute("SELECT person_id FROM user_profiles WHERE order_count > 1 ORDER BY person_id LIMIT 1")
    person_id = person.fetchall()[0][0]
    events = con.execute(
        f"SELECT kind, category, event_at FROM ({INTERACTIONS_SQL}) WHERE person_id = ? AND category IS NOT NULL",
        [person_id],
    ).df()
    age_days = (pd.Timestamp(as_of) - events.event_at).dt.total_seconds().clip(lower=0) / 86400
    events["score"] = events.kind.map(opts.weight) * 2 ** (-age_days / opts.half_life_days)
    expected = events.groupby("category").score.sum()
    stored = con.execute("SELECT category_affinity, top_category FROM user_profiles WHERE person_id = ?", [person_id])
    affinity, top = stored.fetchall()[0]
    assert set(affinity) == set(expected.index)
    for category, score in expected.items():
        assert affinity[category] == pytest.approx(score, rel=1e-5)
    segment = con.execute("SELECT segment_id FROM user_profiles WHERE person_id = ?", [person_id]).fetchall()[0][0]
    assert top == shrunk_top(affinity, segment_priors(con)[segment])
    assert "purchase" in set(events.kind), "orders count through the products they contain"


def test_the_top_category_is_the_scores_shrunk_toward_the_segment_by_the_real_time_formula(profiled):
    con, _ = profiled
    priors = segment_priors(con)
    rows = con.execute("SELECT segment_id, category_affinity, top_category FROM user_profiles").fetchall()
    assert sum(1 for _, affinity, _ in rows if affinity) > 1000
    # The stream's formula (shrunk_top with the segment's prior from the snapshot) gives the batch's answer.
    assert all(top == shrunk_top(affinity or {}, priors.get(segment)) for segment, affinity, top in rows)
    # A fitted strength: neither nothing nor everything.
    strengths = {segment: sum(p.values()) for segment, p in priors.items()}
    assert len(set(round(v, 6) for v in strengths.values())) == 1 and 0.5 < next(iter(strengths.values())) < 500
    # Someone with a handful of events is pulled toward their segment; a heavy user keeps their own mix.
    moved = [(sum(a.values()), top != shrunk_top(a)) for _, a, top in rows if a]
    few = [m for total, m in moved if total < 5]
    many = [m for total, m in moved if total > 100]
    assert sum(few) / len(few) > sum(many) / max(len(many), 1)


def test_the_real_time_update_gives_the_batch_score():
    opts = AffinityOptions(half_life_days=10)
    events = [(0.0, "view"), (3600.0, "add_to_cart"), (86400.0 * 4, "purchase"), (86400.0 * 9, "view")]
    as_of = 86400.0 * 12
    batch = sum(opts.weight(kind) * 2 ** (-(as_of - t) / 86400 / 10) for t, kind in events)
    score, last = 0.0, 0.0
    for t, kind in events:
        score, last = decayed_update(score, t - last, kind, opts), t
    assert decay_to(score, as_of - last, opts) == pytest.approx(batch)


def test_a_profile_is_found_by_any_identifier(profiled):
    con, truth_dir = profiled
    people = pd.read_parquet(truth_dir / "people.parquet")
    someone = people[people.email.notna() & ~people.is_bot].iloc[0]
    written = f"  {someone.email.upper()} "
    by_email = profiles.find_person(con, written, KEY)
    assert len(by_email) == 1
    hashed = hmac_hex(KEY, normalize_email(someone.email))
    assert con.execute("SELECT count(*) FROM identity_map WHERE identifier = ?", [hashed]).fetchall()[0][0] == 1
    assert profiles.find_person(con, by_email[0], KEY) == by_email
    anonymous = con.execute(
        "SELECT identifier FROM identity_map WHERE person_id = ? AND identifier_type = 'anonymous_id' LIMIT 1",
        [by_email[0]],
    ).fetchall()[0][0]
    assert profiles.find_person(con, anonymous, KEY) == by_email
    assert profiles.find_person(con, "nobody@example.org", KEY) == []
