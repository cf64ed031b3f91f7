"""Profile accuracy on data that is not shaped like the generator's defaults (issue 21).

Each shape is generated, ingested, resolved and cleaned once per module; tests score the
stages against the generator's truth."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from persona_assets.core.affinity import INTERACTIONS_SQL
from persona_assets.core.cleaning import OUTLIER_FEATURES, CleaningOptions, _person_fences_sql, clean
from persona_assets.core.identity import resolve
from persona_assets.core.ingest import ingest
from persona_assets.datagen import ARCHETYPES, CATEGORIES, Shape, generate

# Ten-hour sessions planted often enough to measure recall; the second rhythm is the issue's
# 32 events 20 minutes apart, among many one-page visits that drag the typical session down.
SLOW_LONG = {"long_session_events": 32, "long_session_gap_seconds": 1200.0, "long_session_even": True}
SHAPES = {
    "buyers_10": Shape(buyer_share=0.1, long_session_rate=0.02),
    "buyers_40_anonymous": Shape(
        buyer_share=0.4, anonymous_share=0.3, bounce_share=0.5, long_session_rate=0.02, **SLOW_LONG
    ),
    "buyers_60": Shape(buyer_share=0.6, long_session_rate=0.02, **SLOW_LONG),
}
PEOPLE = 2000


def build(root: Path, shape: Shape, people: int = PEOPLE, seed: int = 11) -> tuple[Path, Path, dict]:
    source = root / "landing"
    generate(people, seed, source, "jsonl", people_per_file=1000, shape=shape)
    path = root / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        ingest(con, source, b"k")
        resolve(con)
        report = clean(con)
    return path, source / "_truth", report


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, tuple[Path, Path, dict]] = {}

    def make(name: str) -> tuple[Path, Path, dict]:
        if name not in made:
            made[name] = build(tmp_path_factory.mktemp(name), SHAPES[name])
        return made[name]

    return make


def person_keys(con: duckdb.DuckDBPyConnection, truth: Path) -> pd.DataFrame:
    """person_id -> the generator's person_key (through each person's anonymousIds)."""
    ids = pd.read_parquet(truth / "identifiers.parquet")[["anonymous_id", "person_key"]]
    linked = con.execute(
        "SELECT identifier AS anonymous_id, person_id FROM identity_map WHERE identifier_type = 'anonymous_id'"
    ).df()
    return ids.merge(linked, on="anonymous_id")[["person_key", "person_id"]].drop_duplicates("person_id")


def cleaning_scores(path: Path, truth: Path) -> dict[str, float]:
    people = pd.read_parquet(truth / "people.parquet")[["person_key", "is_bot", "has_long_session"]]
    people = people.rename(columns={"is_bot": "planted_bot", "has_long_session": "planted_long"})
    flags = ", ".join(f"coalesce(list_contains(outlier_flags, '{f}'), false) AS {f}" for f in OUTLIER_FEATURES)
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute(
            f"SELECT person_id, behaviour_events, is_bot, has_long_session, {flags} FROM cleaned_users"
        ).df()
        rows = rows.merge(person_keys(con, truth), on="person_id").merge(people, on="person_key")
        sessions = con.execute("SELECT anonymous_id, is_long FROM sessions WHERE is_long").df()
    planted = pd.read_parquet(truth / "long_sessions.parquet")
    normal = rows[~rows.planted_bot & ~rows.planted_long & (rows.behaviour_events > 0)]
    return {
        **{f: normal[f].mean() for f in OUTLIER_FEATURES},
        "long_sessions": planted.anonymous_id.isin(set(sessions.anonymous_id)).mean(),
        "long_session_people": rows[rows.planted_long].has_long_session.mean(),
        "bots": rows[rows.planted_bot].is_bot.mean(),
        "planted_long": len(planted),
        "planted_bots": int(rows.planted_bot.sum()),
    }


def check_cleaning(scores: dict[str, float]) -> None:
    # Before issue 21: 10% buyers flagged 9.6% of normal people on order_count and revenue, 40%
    # buyers 40%; with many one-page visits no 10-hour session was long (recall 0).
    assert max(scores[f] for f in OUTLIER_FEATURES) <= 0.02, scores
    assert scores["planted_long"] >= 20 and scores["long_sessions"] >= 0.95, scores
    assert scores["long_session_people"] >= 0.95, scores
    assert scores["planted_bots"] >= 2 and scores["bots"] == 1.0, scores


@pytest.mark.slow
def test_cleaning_holds_on_the_default_generator(resolved):
    scores = cleaning_scores(*resolved)
    assert max(scores[f] for f in OUTLIER_FEATURES) <= 0.02, scores
    assert scores["long_sessions"] >= 0.95 and scores["long_session_people"] >= 0.95 and scores["bots"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHAPES))
def test_cleaning_holds_on_other_shapes(shaped, name):
    path, truth, report = shaped(name)
    check_cleaning(cleaning_scores(path, truth))
    fences = {row["feature"]: row for row in report.fences}
    assert set(OUTLIER_FEATURES) <= set(fences) and "session duration_seconds" in fences
    # Repeat buyers are not outliers: the order fence sits above the common counts.
    assert fences["order_count"]["high_fence"] >= 3


def fences_of(people: pd.DataFrame, opts: CleaningOptions | None = None) -> pd.DataFrame:
    """The person fences cleaning fits on `people` (one row per person, the OUTLIER_FEATURES)."""
    with duckdb.connect() as con:
        con.register("people", people.assign(behaviour_events=1))
        sql = _person_fences_sql(opts or CleaningOptions(), "SELECT * FROM people")
        return con.execute(f"SELECT feature, spread, exp(lo) - 1 AS lo, exp(hi) - 1 AS hi FROM ({sql})").df()


def test_fences_hold_on_zero_inflated_discrete_and_constant_features():
    n = 1000
    people = pd.DataFrame(
        {
            "event_count": [20 + i % 7 for i in range(n)],
            "session_count": [3] * n,  # everyone alike: no spread
            "avg_session_seconds": [120.0 + i % 50 for i in range(n)],
            "order_count": [(1 + (i % 10 == 0)) if i % 5 == 0 else 0 for i in range(n)],  # 20% buy, a few twice
            "total_revenue": [0.0] * n,  # nobody spends
        }
    )
    for method in ("mad", "iqr", "zscore"):
        fences = fences_of(people, CleaningOptions(outlier_method=method)).set_index("feature")
        # Before issue 21 the order fences were [0, 0] (median and MAD of mostly zeros): every buyer flagged.
        assert fences.loc["order_count", "hi"] >= 3, (method, fences)
        assert pd.isna(fences.loc["session_count", "hi"]) and fences.loc["session_count", "spread"] == 0
        assert pd.isna(fences.loc["total_revenue", "hi"])
        assert 26 < fences.loc["event_count", "hi"] < 200


def test_long_sessions_have_a_floor_in_hours():
    with pytest.raises(ValueError, match="long_session_hours"):
        CleaningOptions(long_session_hours=0)


def profiled_copy(path: Path, root: Path) -> duckdb.DuckDBPyConnection:
    """A copy of a cleaned warehouse taken through features, segments, imputation and profiles."""
    from persona_assets.core import features, imputation, profiles, segments
    from persona_assets.core.models import ModelStore
    from persona_assets.settings import shipped_enrichment

    shutil.copy2(path, root / "profiled.duckdb")
    con = duckdb.connect(str(root / "profiled.duckdb"))
    store = ModelStore(root / "models")
    features.build(con, store, features.FeatureOptions())
    segments.build(con, store, segments.SegmentOptions())
    imputation.impute(con, store, imputation.ImputationOptions(enrichment_path=str(shipped_enrichment())))
    profiles.build(con)
    return con


def top_category_precision(con: duckdb.DuckDBPyConnection, truth: Path) -> dict[str, float]:
    """Precision@1 of user_profiles.top_category and of plain counting (the category with the
    most product interactions) against each person's planted favourite (their archetype's
    heaviest category weight)."""
    favourite = {
        a.name: CATEGORIES[max(range(len(CATEGORIES)), key=a.category_weights.__getitem__)] for a in ARCHETYPES
    }
    people = pd.read_parquet(truth / "people.parquet")[["person_key", "archetype"]]
    planted = person_keys(con, truth).merge(people, on="person_key")
    planted["planted"] = planted.archetype.map(favourite)
    # Plain counting's ties are broken at random: a person scores 1/k when their favourite is
    # one of k categories tied for the most interactions.
    rows = con.execute(
        f"""WITH counts AS (SELECT person_id, category, count(*) AS n FROM ({INTERACTIONS_SQL})
                            WHERE category IS NOT NULL GROUP BY ALL),
            best AS (SELECT person_id, list(category) FILTER (WHERE n = most) AS tied, sum(n) AS n
                     FROM (SELECT *, max(n) OVER (PARTITION BY person_id) AS most FROM counts) GROUP BY person_id)
            SELECT u.person_id, u.top_category, b.tied, b.n FROM user_profiles u JOIN best b USING (person_id)"""
    ).df()
    scored = rows.merge(planted[["person_id", "planted"]], on="person_id")
    scored["top_right"] = scored.top_category == scored.planted
    scored["plain_right"] = [(p in list(t)) / len(t) for p, t in zip(scored.planted, scored.tied)]
    few = scored[scored.n <= 10]
    return {
        "people": len(scored),
        "top": scored.top_right.mean(),
        "plain": scored.plain_right.mean(),
        "top_few_events": few.top_right.mean(),
        "plain_few_events": few.plain_right.mean(),
    }


@pytest.mark.slow
def test_top_category_beats_plain_counting(resolved, shaped, tmp_path):
    # Before issue 21 (decayed scores alone): 0.68 against plain counting's 0.72 on the default
    # generator, 0.59 against 0.60 for people with ten interactions or fewer.
    path, truth = resolved
    with profiled_copy(path, tmp_path) as con:
        scores = top_category_precision(con, truth)
    assert scores["people"] > 2000 and scores["top"] >= scores["plain"] + 0.05, scores
    assert scores["top_few_events"] >= scores["plain_few_events"] + 0.05, scores
    path, truth, _ = shaped("buyers_40_anonymous")
    (tmp_path / "shape").mkdir()
    with profiled_copy(path, tmp_path / "shape") as con:
        scores = top_category_precision(con, truth)
    assert scores["people"] > 1000 and scores["top"] >= scores["plain"] + 0.05, scores


# Segments against the planted archetypes (part 5): buyer shares the generator's archetypes do
# not set, at three sizes. Each case generates, ingests, resolves and cleans its own data.
SEGMENT_SHAPES = {
    "buyers_10": Shape(buyer_share=0.1),
    "buyers_40": Shape(buyer_share=0.4),
    "buyers_60": Shape(buyer_share=0.6),
}


def segment_scores(path: Path, truth: Path, root: Path) -> dict:
    """ARI of the segments (people who are not planted bots) against the planted archetypes,
    with the k and space chosen and the seconds features and segments took."""
    import time

    from sklearn.metrics import adjusted_rand_score

    from persona_assets.core import features, segments
    from persona_assets.core.models import ModelStore

    shutil.copy2(path, root / "segmented.duckdb")
    with duckdb.connect(str(root / "segmented.duckdb")) as con:
        store = ModelStore(root / "models")
        started = time.perf_counter()
        features.build(con, store, features.FeatureOptions())
        model = segments.build(con, store, segments.SegmentOptions()).model
        seconds = time.perf_counter() - started
        people = pd.read_parquet(truth / "people.parquet")[["person_key", "archetype", "is_bot"]]
        rows = con.execute("SELECT person_id, segment_id FROM segments WHERE segment_id IS NOT NULL").df()
        rows = rows.merge(person_keys(con, truth), on="person_id").merge(people, on="person_key")
    humans = rows[~rows.is_bot]
    ari = adjusted_rand_score(humans.archetype, humans.segment_id)
    return {"ari": round(ari, 3), "k": model.chosen_k, "space": model.space, "seconds": round(seconds, 1)}


# make test runs the 2,000-people grid; the whole grid: PERSONA_SEGMENT_SIZES=2000,5000,10000 (about 10 minutes).
SEGMENT_SIZES = [int(n) for n in os.environ.get("PERSONA_SEGMENT_SIZES", "2000").split(",")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "people"), [(n, k) for k in SEGMENT_SIZES for n in SEGMENT_SHAPES])
def test_segments_recover_the_archetypes_at_every_size_and_buyer_share(tmp_path, name, people):
    # The goal of issue 21 part 5. Seen, all k = 5 in the feature space: 10% buyers 0.940 / 0.939 /
    # 0.934 at 2,000 / 5,000 / 10,000 people; 40% 0.949 / 0.943 / 0.943; 60% 0.939 / 0.946 / 0.944.
    # Before correlated features counted as one: 0.825 (k 6) at 10% and 5,000, 0.585 (k 10) at 40%
    # and 10,000, 0.591 (k 10) at 60% and 5,000.
    path, truth, _ = build(tmp_path, SEGMENT_SHAPES[name], people=people)
    scores = segment_scores(path, truth, tmp_path)
    print(f"\nsegments {name} {people:,} people: {scores}")
    assert scores["ari"] >= 0.9 and scores["k"] == 5, scores
