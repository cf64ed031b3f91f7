"""user_profiles: one row per person — identity, behaviour, affinity, traits with provenance, segment, quality."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from persona_assets.contracts import CategoryScores, UserProfiles
from persona_assets.core import refresh
from persona_assets.core.affinity import (
    INTERACTION_COLUMNS,
    INTERACTION_EVENTS,
    AffinityOptions,
    affinity_sql,
    person_scores_sql,
    segment_priors_sql,
    shrunk_top_sql,
)
from persona_assets.core.engine import SparkTables
from persona_assets.core.identity import PERSON_EVENTS, stage_scope_events
from persona_assets.core.publish import find_person  # noqa: F401  (look-ups live beside the snapshot they read)
from persona_assets.core.stage import StageResult
from persona_assets.core.warehouse import (
    DATA_AS_OF,
    Scratch,
    bind,
    data_as_of,
    replace_tables,
    scratch,
    transaction,
)

if TYPE_CHECKING:  # pyspark is imported only by the Spark path
    from pyspark.sql import SparkSession

CORE_TRAITS = ("age_bracket", "gender", "country")
INFERRED_TRAITS = ("primary_device", "usual_daypart")
# Traits that are scores or optional numbers, not answers a profile is complete without.
NOT_COUNTED = ("intent_score", "age", "postal_code")


# Events of the people being profiled: cleaning leaves out those who declined personalization.
PROFILED = "(SELECT * FROM {events} WHERE person_id IN (SELECT person_id FROM cleaned_users))"
# What Spark reads to score categories: the events, who they belong to, and who is profiled.
SPARK_INPUTS = ("raw_events", "identity_map", "cleaned_users")


def category_scores_sql(opts: AffinityOptions) -> str:
    """Everyone's category scores as of `$as_of`, from `person_events` (one statement, both engines)."""
    return person_scores_sql(opts, PROFILED.format(events="person_events"))


def profiles_sql(opts: AffinityOptions, updated: str = "$updated_at") -> str:
    """Everyone's profile from the person-level tables and `category_scores`; `updated` is the
    expression for updated_at (an incremental run keeps it for people it did not touch)."""

    def one(trait: str, field: str) -> str:
        return f"any_value({field}) FILTER (WHERE trait = '{trait}')"

    core = ",\n    ".join(
        f"{one(t, 'value')} AS {t}, {one(t, 'source')} AS {t}_source, {one(t, 'confidence')} AS {t}_confidence, "
        f"{one(t, 'model_version')} AS {t}_model_version"
        for t in CORE_TRAITS
    )
    inferred = ",\n    ".join(
        f"{one(t, 'value')} AS {t}, {one(t, 'confidence')} AS {t}_confidence" for t in INFERRED_TRAITS
    )
    not_counted = ", ".join(f"'{t}'" for t in NOT_COUNTED)
    return f"""
WITH traits AS (
  SELECT person_id,
    {core},
    {inferred},
    {one("intent_score", "TRY_CAST(value AS DOUBLE)")} AS intent_score,
    map_from_entries(list_sort(list((trait, value)) FILTER (WHERE source = 'enriched'))) AS enriched,
    -- each answer counts by how sure we are of it: observed 1, unknown 0
    avg(confidence) FILTER (WHERE trait NOT IN ({not_counted})) AS completeness
  FROM imputed_attributes GROUP BY person_id
), asks AS (
  SELECT a.person_id,
         arg_max(a.trait, ((1 - a.confidence) * i.importance, a.trait)) FILTER (WHERE a.source <> 'observed') AS next_question
  FROM imputed_attributes a JOIN trait_importance i USING (trait) GROUP BY a.person_id
), affinity AS ({affinity_sql("category_scores", opts)}
), priors AS ({segment_priors_sql("affinity", "segments")}
), shrunk AS ({shrunk_top_sql("affinity", "segments", "priors")})
SELECT c.person_id, d.identifier_count, c.first_seen_at, c.last_seen_at,
  c.session_count, c.avg_session_seconds, c.event_count, c.order_count, c.total_revenue, c.avg_order_value,
  c.first_order_at, c.last_order_at, c.days_since_last_order, c.sessions_per_week,
  coalesce(sh.top_category, f.top_category) AS top_category, f.category_affinity,
  t.* EXCLUDE (person_id, completeness),
  s.segment_id, s.segment_name, s.subsegment_id, s.subsegment_name,
  coalesce(s.is_noise, false) AS is_noise, coalesce(s.segment_confidence, 0) AS segment_confidence,
  c.missing_ratio, c.is_sparse, c.is_bot, c.outlier_flags, coalesce(t.completeness, 0) AS completeness,
  q.next_question, {updated} AS updated_at
FROM cleaned_users c
JOIN deduped_users d USING (person_id)
LEFT JOIN segments s USING (person_id)
LEFT JOIN traits t USING (person_id)
LEFT JOIN asks q USING (person_id)
LEFT JOIN affinity f USING (person_id)
LEFT JOIN shrunk sh USING (person_id)
"""


def build(
    con: duckdb.DuckDBPyConnection, opts: AffinityOptions | None = None, full: bool = False, scores: str | None = None
) -> StageResult:
    """Bring user_profiles up to date (one transaction).

    Category scores are the only part read from events: incrementally they are recomputed for
    the people imputation changed; everyone else's keep the time they were valued at and are
    carried forward to the new as-of time by the decay factor alone (the formula the
    real-time path uses). The profile rows are then rebuilt from the person-level tables.

    `scores` names a table or view of category_scores rows computed elsewhere (Spark's
    `category_scores_on_spark`, loaded into this database): they are taken as they are (the
    people profiled only) instead of being computed from events, in a full build.
    """
    opts = opts or AffinityOptions()
    as_of = data_as_of(con)
    now = con.execute("SELECT now()::TIMESTAMP").fetchall()[0][0]
    # scores_layout: category_scores hold one row per person, valued at its own time (older
    # warehouses rebuild once)
    settings = {**asdict(opts), "scores_layout": 3}
    given = "category scores given (computed elsewhere)" if scores else ""
    p = refresh.plan(
        con, "profiles", settings, ("user_profiles", "category_scores"), full=full or bool(scores), full_reason=given
    )
    params = {"as_of": as_of, "updated_at": now}
    record = [(lambda: refresh.record(con, p, as_of, p.scope.size(con)), None)]
    with scratch(con) as s:
        if p.full:
            scored = PROFILED.format(events=_quoted(scores)) if scores else category_scores_sql(opts)
            tables = [(CategoryScores, "category_scores", scored), (UserProfiles, "user_profiles", profiles_sql(opts))]
            counts = replace_tables(con, tables, params, record)
        else:
            # Scores read product interactions only: their events and columns are all that is staged.
            stage_scope_events(con, p.scope, INTERACTION_COLUMNS, INTERACTION_EVENTS)
            s.adopt("_scope_events")
            with transaction(con):
                _splice_scores(con, s, p.scope, opts, params)
                updated = "coalesce((SELECT u.updated_at FROM _updated u WHERE u.person_id = c.person_id), $updated_at)"
                counts = replace_tables(
                    con,
                    [(UserProfiles, "user_profiles", profiles_sql(opts, updated))],
                    params,
                    record,
                    transaction=False,
                )
    return StageResult(
        mode=p.mode,
        why=p.reason,
        people=counts["user_profiles"],
        people_recomputed=None if p.full else p.scope.size(con),
        counts=counts,
    )


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def category_scores_on_spark(spark: SparkSession, warehouse: Path, opts: AffinityOptions | None = None) -> int:
    """`category_scores` rebuilt on Spark from the Parquet tables in `warehouse` (raw_events,
    identity_map, cleaned_users) with the statement `build` runs on DuckDB (`category_scores_sql`,
    compiled by `engine.to_spark`), written there as Parquet; returns its rows.

    The scores are valued as of the newest event (`DATA_AS_OF`, the time DuckDB's build takes
    from the same raw_events), recorded in `scored_at`: profiles carries them forward from it.
    """
    opts = opts or AffinityOptions()
    t = SparkTables(spark, warehouse)
    try:
        t.read(*SPARK_INPUTS)
        t.view("person_events", PERSON_EVENTS)
        as_of = t.query(DATA_AS_OF).collect()[0][0]
        return t.write(CategoryScores, "category_scores", category_scores_sql(opts), {"as_of": as_of})
    finally:
        t.drop()


def _splice_scores(
    con: duckdb.DuckDBPyConnection, s: Scratch, scope: refresh.Scope, opts: AffinityOptions, params: dict
) -> None:
    """The scope's category scores in place of their old ones; everyone else's updated_at kept (`_updated`)."""
    con.execute(f"DELETE FROM category_scores WHERE {scope.has()}")
    sql = f"INSERT INTO category_scores BY NAME {person_scores_sql(opts, PROFILED.format(events='_scope_events'))}"
    con.execute(sql, bind(sql, params))
    s.table(
        "_updated",
        f"SELECT person_id, updated_at FROM user_profiles WHERE {scope.lacks()}",
    )
