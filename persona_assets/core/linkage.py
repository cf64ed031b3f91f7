"""Probabilistic identity: link people who share no identifier, by name, birth date, age, postcode and city.

(Not by phone: a phone is an identifier, so two records never share a usable one, and "both
have a phone and they differ" is the only level left, which carries no evidence.)

A *record* is a person as deterministic stitching found them (one component of the
identifier graph, keyed by the id that component alone would get). Records are compared
with Splink on DuckDB: blocking rules keep the candidate pairs near-linear, comparison
levels grade agreement (exact, Jaro-Winkler, date tolerance), and m/u parameters are
estimated without labels (random sampling for u, EM for m). The fitted model is saved in
the warehouse (`identity_link_model`) and reused until retrained, so an incremental run
scores new records exactly as a full rebuild would.

Links above the threshold merge records greedily, strongest first, unless the merged
person would hold two different userIds. Every link is kept in `identity_links` with its
probability and per-comparison match weights. The matching traits live only in the
restricted `identity_pii` table.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import numpy as np
import pyarrow as pa

from persona_assets.contracts import IdentityLinks, IdentityPii, ddl
from persona_assets.core.refresh import SCOPE

MODEL_TABLE = "identity_link_model"
COMPARED = ("first_name", "last_name", "birthday", "age", "postal_code", "city")

# Each rule is an equi-join, so each person meets only those who agree on these keys.
# Together they still catch a pair with a typo in any one field.
BLOCKING_RULES = (
    "l.birthday = r.birthday",
    "l.postal_code = r.postal_code",
    "l.first_name = r.first_name AND l.last_name = r.last_name AND left(l.birthday, 4) = left(r.birthday, 4)",
    "l.first_name = r.first_name AND l.last_name = r.last_name AND left(l.postal_code, 2) = left(r.postal_code, 2)",
    "l.last_name = r.last_name AND left(l.birthday, 4) = left(r.birthday, 4) "
    "AND left(l.postal_code, 1) = left(r.postal_code, 1)",
)
# Pairs that almost surely match, for the prior probability that two records match.
DETERMINISTIC_RULES = (
    "l.first_name = r.first_name AND l.last_name = r.last_name AND l.birthday = r.birthday",
    "l.last_name = r.last_name AND l.birthday = r.birthday AND l.postal_code = r.postal_code",
)
# EM needs blocks where matches are common; each pass estimates the comparisons not blocked on.
EM_RULES = (
    "l.birthday = r.birthday",
    "l.first_name = r.first_name AND l.last_name = r.last_name",
    "l.postal_code = r.postal_code",
)


class NotTrainable(ValueError):
    """The records give EM nothing to learn from."""


@dataclass
class LinkReport:
    enabled: bool = False
    note: str = ""
    records: int = 0
    candidate_pairs: int = 0
    links: int = 0
    merges: int = 0
    blocked: int = 0
    model_version: int | None = None
    trained: bool = False


def _norm(col: str) -> str:
    return f"nullif(lower(trim({col})), '')"


# How each matching trait is read from an event: trimmed and lower-cased; a date as ISO; an age in years.
TRAIT_SQL = {
    "first_name": _norm("e.first_name"),
    "last_name": _norm("e.last_name"),
    "birthday": "strftime(TRY_CAST(trim(e.birthday) AS DATE), '%Y-%m-%d')",
    "age": "CASE WHEN TRY_CAST(trim(e.age) AS DOUBLE) BETWEEN 0 AND 120 THEN TRY_CAST(trim(e.age) AS DOUBLE)::BIGINT END",
    "postal_code": "nullif(upper(replace(trim(e.postal_code), ' ', '')), '')",
    "city": _norm("e.city"),
}


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(ddl(IdentityPii, "identity_pii"))
    con.execute(ddl(IdentityLinks, "identity_links"))
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {MODEL_TABLE} (version BIGINT PRIMARY KEY, trained_at TIMESTAMP,
            records BIGINT, settings VARCHAR)"""
    )


def latest_model(con: duckdb.DuckDBPyConnection) -> tuple[int, dict] | None:
    ensure_tables(con)
    row = con.execute(f"SELECT version, settings FROM {MODEL_TABLE} ORDER BY version DESC LIMIT 1").fetchall()
    return (row[0][0], json.loads(row[0][1])) if row else None


def matching_people(con: duckdb.DuckDBPyConnection) -> int:
    """People (userIds, else anonymousIds) whose events carry a name or a birth date: with enough
    of them a model can be trained. Cheap, and the same number at planning and training time."""
    return con.execute(
        """SELECT count(DISTINCT coalesce(user_id, anonymous_id)) FROM raw_events
           WHERE first_name IS NOT NULL OR last_name IS NOT NULL OR birthday IS NOT NULL"""
    ).fetchall()[0][0]


def stage_records(con: duckdb.DuckDBPyConnection, events: str, members: str) -> int:
    """`_records`: one row per component of `members` (node, identifier_type, identifier,
    first_seen_at, component) with its matching traits (most recent non-null, from `events`)
    and its userIds. Components with no name and no birth date have nothing to compare."""
    traits = ",\n".join(
        f"arg_max({sql}, (e.event_at, e.message_id)) FILTER (WHERE {sql} IS NOT NULL) AS {name}"
        for name, sql in TRAIT_SQL.items()
    )
    any_trait = " OR ".join(f"e.{c} IS NOT NULL" for c in COMPARED)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _records AS
        WITH firsts AS (
          SELECT component,
                 arg_min(identifier_type || ':' || identifier, (first_seen_at, identifier_type, identifier)) AS first_id,
                 arg_min(identifier_type, (first_seen_at, identifier_type, identifier)) AS anchor_type,
                 arg_min(identifier, (first_seen_at, identifier_type, identifier)) AS anchor,
                 list(DISTINCT identifier ORDER BY identifier) FILTER (WHERE identifier_type = 'user_id') AS user_id_list
          FROM {members} GROUP BY component
        ), traits AS (
          SELECT coalesce(mu.component, ma.component) AS component, {traits}
          FROM {events} e
          LEFT JOIN {members} mu ON mu.identifier_type = 'user_id' AND mu.identifier = e.user_id
          LEFT JOIN {members} ma ON ma.identifier_type = 'anonymous_id' AND ma.identifier = e.anonymous_id
          WHERE ({any_trait}) AND coalesce(mu.component, ma.component) IS NOT NULL
          GROUP BY 1
        )
        SELECT 'p' || left(sha256(f.first_id), 16) AS record_id, f.component, f.anchor_type, f.anchor,
               coalesce(len(f.user_id_list), 0) AS user_ids, f.user_id_list[1] AS user_id,
               coalesce(f.user_id_list, []) AS user_id_list,
               t.* EXCLUDE (component)
        FROM firsts f JOIN traits t USING (component)
        WHERE t.first_name IS NOT NULL OR t.last_name IS NOT NULL OR t.birthday IS NOT NULL"""
    )
    return con.execute("SELECT count(*) FROM _records").fetchall()[0][0]


def _settings(threshold_rules: tuple[str, ...]) -> dict:
    import splink.comparison_library as cl
    from splink import SettingsCreator

    creator = SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="record_id",
        comparisons=[
            cl.ForenameSurnameComparison("first_name", "last_name"),
            cl.DateOfBirthComparison("birthday", input_is_string=True),
            cl.ExactMatch("age"),
            cl.LevenshteinAtThresholds("postal_code", [1, 2]),
            cl.JaroWinklerAtThresholds("city", [0.9, 0.8]),
        ],
        blocking_rules_to_generate_predictions=list(threshold_rules),
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=True,
    )
    settings = creator.create_settings_dict(sql_dialect_str="duckdb")
    # No term-frequency adjustments: a pair's score then depends on the pair alone, not on who else
    # is in the data, so links stored from earlier runs stay valid and incremental equals full.
    for comparison in settings["comparisons"]:
        for level in comparison["comparison_levels"]:
            level.pop("tf_adjustment_column", None)
            level.pop("tf_adjustment_weight", None)
    return settings


def _linker(records: pa.Table, settings: dict):
    from splink import DuckDBAPI, Linker

    scratch = duckdb.connect()  # Splink's working tables stay out of the warehouse
    db = DuckDBAPI(scratch)
    return Linker(db.register(records), settings, log_level=logging.ERROR), scratch, db


def _splink_input(con: duckdb.DuckDBPyConnection, select: str) -> pa.Table:
    cols = ", ".join(("record_id", *COMPARED, "in_area"))
    return con.sql(f"SELECT {cols} FROM ({select}) ORDER BY record_id").to_arrow_table()


def train(con: duckdb.DuckDBPyConnection) -> dict:
    """Estimate a model on `_records` without labels; returns Splink's settings with the parameters."""
    records = _splink_input(con, "SELECT *, true AS in_area FROM _records")
    settings = _settings(BLOCKING_RULES)
    settings["probability_two_random_records_match"] = prior(con)
    linker, scratch, _ = _linker(records, settings)
    try:
        linker.training.estimate_u_using_random_sampling(max_pairs=5e6, seed=1)
        from splink.internals.exceptions import EMTrainingException

        passes = 0
        for rule in EM_RULES:
            # The prior stays at the deterministic estimate: with few true matches EM would drive it to zero.
            try:
                linker.training.estimate_parameters_using_expectation_maximisation(
                    rule, max_pairs=2e6, fix_probability_two_random_records_match=True
                )
                passes += 1
            except (EMTrainingException, ValueError):
                # No pairs agree on this rule's keys, or EM drove a level's m to zero (small data,
                # few true matches): this pass is skipped and the others estimate.
                continue
        if not passes:
            raise NotTrainable(f"no two people agree on any of {', '.join(EM_RULES)}")
        return linker.misc.save_model_to_json()
    finally:
        scratch.close()


def prior(con: duckdb.DuckDBPyConnection, recall: float = 0.7) -> float:
    """The probability that two random records match: the pairs the deterministic rules find,
    scaled up for the matches they miss, over all pairs. At least one match is assumed, so the
    prior is never zero (with no duplicates at all, links then need overwhelming evidence)."""
    pairs = " UNION ".join(
        f"SELECT l.record_id, r.record_id FROM _records l JOIN _records r ON {rule} AND l.record_id < r.record_id"
        for rule in DETERMINISTIC_RULES
    )
    found, n = con.execute(f"SELECT (SELECT count(*) FROM ({pairs})), (SELECT count(*) FROM _records)").fetchall()[0]
    return min(max(found / recall, 1.0) / max(n * (n - 1) / 2, 1.0), 0.5)


def save_model(con: duckdb.DuckDBPyConnection, settings: dict, records: int) -> int:
    version = next_version(con)
    con.execute(
        f"INSERT INTO {MODEL_TABLE} VALUES (?, ?, ?, ?)",
        [version, datetime.now(UTC).replace(tzinfo=None), records, json.dumps(settings)],
    )
    return version


def predict(con: duckdb.DuckDBPyConnection, model: dict, threshold: float, outside: str | None) -> int:
    """`_candidates`: scored pairs at or above `threshold` among `_records` (in_area) and, on an
    incremental run, the stored records of people outside the run (`outside`, not in_area):
    only pairs with at least one record in the run are compared. Returns the pairs compared."""
    select = "SELECT *, true AS in_area FROM _records"
    if outside:
        select += f" UNION ALL BY NAME SELECT *, false AS in_area FROM ({outside})"
    records = _splink_input(con, select)
    settings = dict(model)
    settings["blocking_rules_to_generate_predictions"] = [
        {"blocking_rule": rule, "sql_dialect": "duckdb"} for rule in BLOCKING_RULES
    ]
    settings["retain_intermediate_calculation_columns"] = True
    settings["retain_matching_columns"] = False
    linker, scratch, db = _linker(records, settings)
    try:
        if outside is None:
            # Blocked pairs first, to count them; predict reuses them from Splink's cache.
            blocked = linker.inference.compute_blocked_pairs_for_predict().physical_name
        else:
            blocked = _area_pairs(scratch, records)
            linker.table_management.register_blocked_pairs_for_predict(db.register(blocked))
        compared = scratch.sql(f"SELECT count(*) FROM {blocked}").fetchall()[0][0]
        pairs = linker.inference.predict(threshold_match_probability=threshold)
        table = scratch.sql(f"SELECT * FROM {pairs.physical_name}").to_arrow_table()
    finally:
        scratch.close()
    # Splink's per-comparison match weights (log2 Bayes factors): mw_<comparison>.
    weights = {c[3:]: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names if c.startswith("mw_")}
    names = list(weights)
    rows = {
        "record_id_l": table.column("record_id_l"),
        "record_id_r": table.column("record_id_r"),
        "match_probability": table.column("match_probability"),
        "match_weight": table.column("match_weight"),
        "weights": pa.array(
            [json.dumps({n: round(float(weights[n][i]), 3) for n in names}) for i in range(table.num_rows)],
            pa.string(),
        ),
    }
    con.register("_candidates_arrow", pa.table(rows))
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _candidates AS
           SELECT least(record_id_l, record_id_r) AS record_id_l, greatest(record_id_l, record_id_r) AS record_id_r,
                  match_probability, match_weight, weights FROM _candidates_arrow"""
    )
    con.unregister("_candidates_arrow")
    return compared


def _area_pairs(scratch: duckdb.DuckDBPyConnection, records: pa.Table) -> str:
    """The pairs Splink's blocking would give that have a record of this run on at least one side,
    found from those records outward: each rule joins the run's few records to everyone's, so an
    incremental run does not pair up everyone to keep a handful. Each pair keeps the first rule
    that found it, as Splink's own blocking does."""
    scratch.register("_records_arrow", records)
    scratch.execute("CREATE TABLE _records AS SELECT * FROM _records_arrow")
    scratch.unregister("_records_arrow")
    found = " UNION ALL ".join(
        f"""SELECT '{i}' AS match_key, least(l.record_id, r.record_id) AS join_key_l,
                   greatest(l.record_id, r.record_id) AS join_key_r
            FROM (SELECT * FROM _records WHERE in_area) l JOIN _records r
            ON {rule} AND l.record_id <> r.record_id"""
        for i, rule in enumerate(BLOCKING_RULES)
    )
    scratch.execute(
        f"""CREATE TABLE _area_blocked AS SELECT min(match_key) AS match_key, join_key_l, join_key_r
            FROM ({found}) GROUP BY join_key_l, join_key_r"""
    )
    return "_area_blocked"


def outside_people(con: duckdb.DuckDBPyConnection) -> list[str]:
    """People outside an incremental run whose records a new candidate links to: the run must take them in."""
    return [
        r[0]
        for r in con.execute(
            f"""SELECT DISTINCT p.person_id FROM identity_pii p
                WHERE p.record_id IN (SELECT record_id_l FROM _candidates UNION SELECT record_id_r FROM _candidates)
                  AND p.person_id NOT IN (SELECT person_id FROM {SCOPE})
                  AND p.record_id NOT IN (SELECT record_id FROM _records)"""
        ).fetchall()
    ]


def cluster(con: duckdb.DuckDBPyConnection, max_user_ids: int) -> dict[str, int]:
    """Merge records along `_candidates`, strongest link first, unless the merged person would hold
    more than `max_user_ids` different userIds. Relabels `_labels` so a merged person is one
    component, and leaves each link's status in `_link_status`."""
    records = con.execute("SELECT record_id, component, user_id_list FROM _records").fetchall()
    component = {r: c for r, c, _ in records}
    users = {r: frozenset(u) for r, _, u in records}
    parent = {r: r for r in component}

    def root(r: str) -> str:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    statuses = []
    for left, right in con.execute(
        "SELECT record_id_l, record_id_r FROM _candidates ORDER BY match_probability DESC, record_id_l, record_id_r"
    ).fetchall():
        a, b = root(left), root(right)
        if a == b:
            statuses.append((left, right, "redundant", "already one person through stronger links"))
        elif len(users[a] | users[b]) > max_user_ids:
            statuses.append((left, right, "blocked", "would join different userIds"))
        else:
            a, b = sorted((a, b))
            parent[b] = a
            users[a] = users[a] | users[b]
            statuses.append((left, right, "merged", None))
    merged = {component[r]: component[root(r)] for r in component if root(r) != r}
    con.register(
        "_merges_arrow",
        pa.table(
            {"component": pa.array(list(merged), pa.int64()), "merged": pa.array(list(merged.values()), pa.int64())}
        ),
    )
    con.execute("UPDATE _labels SET component = m.merged FROM _merges_arrow m WHERE _labels.component = m.component")
    con.unregister("_merges_arrow")
    cols = list(zip(*statuses)) if statuses else [[], [], [], []]
    con.register(
        "_status_arrow",
        pa.table(
            {
                name: pa.array(list(values), pa.string())
                for name, values in zip(("record_id_l", "record_id_r", "status", "reason"), cols)
            }
        ),  # fmt: skip
    )
    con.execute("CREATE OR REPLACE TEMP TABLE _link_status AS SELECT * FROM _status_arrow")
    con.unregister("_status_arrow")
    counts = {s: sum(1 for x in statuses if x[2] == s) for s in ("merged", "redundant", "blocked")}
    return counts


def record_people_sql(identity_map: str) -> str:
    """Each staged record with the person it now belongs to."""
    return f"""SELECT r.*, m.person_id FROM _records r
               JOIN {identity_map} m ON m.identifier_type = r.anchor_type AND m.identifier = r.anchor"""


PII_SELECT = "SELECT * EXCLUDE (component, user_id_list) FROM ({people})"

LINKS_SELECT = """
SELECT c.record_id_l, c.record_id_r, p.person_id, c.match_probability, c.match_weight, c.weights,
       s.status, s.reason, $model_version AS model_version
FROM _candidates c JOIN _link_status s USING (record_id_l, record_id_r)
JOIN ({people}) p ON p.record_id = c.record_id_l
"""


def weights_png(con: duckdb.DuckDBPyConnection, threshold: float) -> bytes:
    """Match weights of the links by status, and the mean weight each comparison added."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = con.execute("SELECT match_weight, status, weights FROM identity_links").fetchall()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    for status in ("merged", "redundant", "blocked"):
        values = [w for w, s, _ in rows if s == status]
        if values:
            axes[0].hist(values, bins=30, alpha=0.7, label=f"{status} ({len(values)})")
    axes[0].axvline(np.log2(threshold / (1 - threshold)), color="grey", linestyle="--")
    axes[0].set_title("match weight of links (threshold dashed)", fontsize=10)
    axes[0].legend(fontsize=8)
    per = {}
    for _, _, w in rows:
        for name, value in json.loads(w).items():
            per.setdefault(name, []).append(value)
    names = sorted(per)
    axes[1].barh(names, [float(np.mean(per[n])) for n in names])
    axes[1].set_title("mean match weight per comparison", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def next_version(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute(f"SELECT coalesce(max(version), 0) + 1 FROM {MODEL_TABLE}").fetchall()[0][0]
