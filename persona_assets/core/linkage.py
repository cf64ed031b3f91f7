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
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa

from persona_assets.contracts import IdentityLinks, IdentityPii, ddl
from persona_assets.core.blocking import RULES, Blocking, block, capped, found_without, with_sizes
from persona_assets.core.engine import duckdb_functions
from persona_assets.core.refresh import Scope

if TYPE_CHECKING:  # pyspark is imported only by the Spark path
    from pyspark.sql import SparkSession

MODEL_TABLE = "identity_link_model"
COMPARED = ("first_name", "last_name", "birthday", "age", "postal_code", "city")

# Pairs that almost surely match, for the prior probability that two records match.
DETERMINISTIC_RULES = (
    "l.first_name = r.first_name AND l.last_name = r.last_name AND l.birthday = r.birthday",
    "l.last_name = r.last_name AND l.birthday = r.birthday AND l.postal_code = r.postal_code",
)
# EM needs blocks where matches are common; each pass estimates the comparisons not blocked on.
# (Indexes into blocking.RULES: birth date, first and last name, postcode.)
EM_RULES = (0, 1, 2)


def _jw(col: str, at: float) -> str:
    return f"jaro_winkler_similarity({col}_l, {col}_r) >= {at}"


def _edits(col: str) -> str:
    """Characters to change from one to the other: a Hamming distance for values of one length (cheap:
    Damerau-Levenshtein costs many times more), else Levenshtein."""
    return f"CASE WHEN length({col}_l) = length({col}_r) THEN hamming({col}_l, {col}_r) ELSE levenshtein({col}_l, {col}_r) END"


def _null(*cols: str) -> str:
    return " AND ".join(f"({c}_l IS NULL OR {c}_r IS NULL)" for c in cols)


# First and last name given the other way round (a typo allowed in each).
# (Their first letters agree first: most pairs fail that cheaply, and u is sampled over millions.)
SWAPPED = (
    "left(first_name_l, 1) = left(last_name_r, 1) AND left(last_name_l, 1) = left(first_name_r, 1) AND "
    "jaro_winkler_similarity(first_name_l, last_name_r) >= 0.9 AND "
    "jaro_winkler_similarity(last_name_l, first_name_r) >= 0.9"
)

# Both records hold the same shared email or phone, and the same (or nearly the same) first name.
SHARED_AGREE = (
    "shared_contact_l = shared_contact_r AND (first_name_l = first_name_r OR "
    "jaro_winkler_similarity(first_name_l, first_name_r) >= 0.92)"
)
# An email or phone seen with this many userIds at most is evidence that they are one person's
# accounts (more is a shared inbox, a call centre, a junk address: still only guarded).
MAX_SHARED_USER_IDS = 4

# The comparisons: (name, [(label, SQL on <col>_l and <col>_r, fixed m)]), the first level the
# null level, the last everything else. The fixed m is what a level's m is taken to be when the
# data cannot say (no pair found by other means falls in the comparison): the share of true
# duplicates at that level in hand-typed records.
COMPARISONS: tuple[tuple[str, tuple[tuple[str, str, float], ...]], ...] = (
    (
        "first_name",
        (
            ("null", _null("first_name"), 0),
            ("exact", "first_name_l = first_name_r", 0.80),
            ("names swapped", SWAPPED, 0.02),
            ("similar (JW >= 0.92)", _jw("first_name", 0.92), 0.08),
            ("close (JW >= 0.8)", _jw("first_name", 0.8), 0.05),
            ("else", "ELSE", 0.05),
        ),
    ),
    (
        "last_name",
        (
            ("null", _null("last_name"), 0),
            ("exact", "last_name_l = last_name_r", 0.80),
            ("names swapped", SWAPPED, 0.02),
            ("similar (JW >= 0.92)", _jw("last_name", 0.92), 0.08),
            ("close (JW >= 0.8)", _jw("last_name", 0.8), 0.05),
            ("else", "ELSE", 0.05),
        ),
    ),
    (
        "birthday",
        (
            ("null", _null("birthday"), 0),
            ("exact", "birthday_l = birthday_r", 0.80),
            # Dates compared are all YYYY-MM-DD: ten characters, so a typo or two is a Hamming distance.
            ("one digit off", "hamming(birthday_l, birthday_r) <= 1", 0.10),
            (
                "day and month swapped",
                "left(birthday_l, 4) = left(birthday_r, 4) AND substr(birthday_l, 6, 2) = "
                "substr(birthday_r, 9, 2) AND substr(birthday_l, 9, 2) = substr(birthday_r, 6, 2)",
                0.02,
            ),
            ("two digits off", "hamming(birthday_l, birthday_r) <= 2", 0.04),
            ("else", "ELSE", 0.04),
        ),
    ),
    (
        "age",
        (
            ("null", _null("age"), 0),
            ("exact", "age_l = age_r", 0.90),
            ("within a year", "abs(age_l - age_r) <= 1", 0.07),
            ("else", "ELSE", 0.03),
        ),
    ),
    (
        "postal_code",
        (
            ("null", _null("postal_code"), 0),
            ("exact", "postal_code_l = postal_code_r", 0.85),
            ("one character off", f"{_edits('postal_code')} <= 1", 0.06),
            ("two characters off", f"{_edits('postal_code')} <= 2", 0.03),
            ("else", "ELSE", 0.06),
        ),
    ),
    (
        "city",
        (
            ("null", _null("city"), 0),
            ("exact", "city_l = city_r", 0.85),
            ("similar (JW >= 0.9)", _jw("city", 0.9), 0.07),
            ("else", "ELSE", 0.08),
        ),
    ),
    # Two accounts (userIds) that share an email or phone and give one first name: one person with
    # two accounts, unless the rest disagrees. A shared email with different first names (a family)
    # is no evidence here, and the first names' disagreement and the userId guard keep them apart.
    (
        "shared_contact",
        (
            ("null", f"NOT ({SHARED_AGREE}) OR {_null('shared_contact')}", 0),
            ("same email or phone, same first name", SHARED_AGREE, 0.5),
            ("else", "ELSE", 0.5),
        ),
    ),
)
# Comparisons whose m and u are set here, not estimated: (m, u) per level after the null level.
# Two random people almost never share an email and a first name: u is one pair in a million.
FIXED = {"shared_contact": ((0.5, 1e-6), (0.5, 0.5))}

# Levels that must carry evidence in this order (an exact match never less than a fuzzier one,
# a fuzzy one never less than a disagreement): each chain's Bayes factors may not increase.
CHAINS = {
    "first_name": (("exact", "similar (JW >= 0.92)", "close (JW >= 0.8)", "else"), ("names swapped", "else")),
    "last_name": (("exact", "similar (JW >= 0.92)", "close (JW >= 0.8)", "else"), ("names swapped", "else")),
    "birthday": (("exact", "one digit off", "two digits off", "else"), ("exact", "day and month swapped", "else")),
    "age": (("exact", "within a year", "else"),),
    "postal_code": (("exact", "one character off", "two characters off", "else"),),
    "city": (("exact", "similar (JW >= 0.9)", "else"),),
}
# A chain may rise by this factor from one level to the next (sampling noise in u and m).
ORDER_SLACK = 1.5


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
    model_status: str = ""  # how the model in use was made, in plain words
    fallback: bool = False  # EM's model failed its checks and a fallback links instead
    problems: list[str] = field(default_factory=list)  # what EM's model got wrong, when it did
    by_threshold: list[tuple[float, int]] = field(default_factory=list)  # pairs scored at or above each
    left_out: list[str] = field(default_factory=list)  # blocking keys too common to compare on, in plain words


# Values that mean "not given" in exports and forms.
MISSING = ("", "n/a", "na", "none", "null", "unknown", "-", "--", "?", "x", "xx", "xxx")


def _name(col: str) -> str:
    """A name as compared: accents stripped, lower-cased, anything but letters and digits a single
    space (so O'Brien-Smith and o brien smith agree), trimmed; a placeholder is missing."""
    clean = rf"trim(regexp_replace(lower(strip_accents(trim({col}::VARCHAR))), '[^\pL\pN]+', ' ', 'g'))"
    missing = ", ".join(repr(m) for m in MISSING)
    return f"CASE WHEN lower(trim({col}::VARCHAR)) IN ({missing}) OR {clean} = '' THEN NULL ELSE {clean} END"


def _date(col: str) -> str:
    """A birth date as compared: YYYY-MM-DD text from ISO (with or without a time), DD/MM/YYYY (or
    DD.MM.YYYY, DD-MM-YYYY; MM/DD/YYYY when the second number cannot be a month) and YYYYMMDD. An
    impossible date (a typo: month 13) keeps its digits, so a typo of one digit still compares as
    one; anything else is missing."""
    v = f"trim({col}::VARCHAR)"
    ymd = rf"regexp_extract({v}, '^(\d{{4}})[-/.](\d{{1,2}})[-/.](\d{{1,2}})([ T].*)?$', ['y', 'm', 'd'])"
    dmy = rf"regexp_extract({v}, '^(\d{{1,2}})[-/.](\d{{1,2}})[-/.](\d{{4}})([ T].*)?$', ['d', 'm', 'y'])"
    compact = rf"regexp_extract({v}, '^(\d{{4}})(\d{{2}})(\d{{2}})$', ['y', 'm', 'd'])"

    def iso(parts: str, swap: bool = False) -> str:
        m, d = (f"{parts}.d", f"{parts}.m") if swap else (f"{parts}.m", f"{parts}.d")
        return f"{parts}.y || '-' || lpad({m}, 2, '0') || '-' || lpad({d}, 2, '0')"

    return f"""CASE
        WHEN {ymd}.y <> '' THEN {iso(ymd)}
        WHEN {dmy}.y <> '' AND TRY_CAST({dmy}.m AS INT) > 12 AND TRY_CAST({dmy}.d AS INT) <= 12 THEN {iso(dmy, swap=True)}
        WHEN {dmy}.y <> '' THEN {iso(dmy)}
        WHEN {compact}.y <> '' THEN {iso(compact)}
        ELSE NULL END"""


# How each matching trait is read from an event, the same way for every record: names without
# accents, case or punctuation; a birth date as YYYY-MM-DD whatever format it came in; an age in
# years; a postcode without spaces, upper-case. Each is DuckDB SQL of one column.
MATCH_VALUES = {
    "first_name": _name,
    "last_name": _name,
    "birthday": _date,
    "age": lambda c: (
        f"CASE WHEN TRY_CAST(trim({c}) AS DOUBLE) BETWEEN 0 AND 120 THEN TRY_CAST(trim({c}) AS DOUBLE)::BIGINT END"
    ),
    "postal_code": lambda c: f"nullif(upper(regexp_replace(trim({c}), '[^A-Za-z0-9]', '', 'g')), '')",
    "city": _name,
}
TRAIT_SQL = {name: value(f"e.{name}") for name, value in MATCH_VALUES.items()}

# On Spark each trait is read by DuckDB's own SQL above, run on the executors (`duckdb_functions`):
# Spark has no strip_accents and no regexp_extract into named groups, and casts 34.5 to an age of 34
# where DuckDB gives 35. An age comes back as a DOUBLE (a count with NULLs reaches pandas as floats).
SPARK_TRAIT_FUNCTIONS = {
    f"duckdb_match_{name}": ("DOUBLE" if name == "age" else "STRING", value("x"), ("x",))
    for name, value in MATCH_VALUES.items()
}
SPARK_TRAIT_SQL = {
    name: f"duckdb_match_{name}(e.{name})" + ("::BIGINT" if name == "age" else "") for name in MATCH_VALUES
}


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(ddl(IdentityPii, "identity_pii"))
    con.execute(ddl(IdentityLinks, "identity_links"))
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {MODEL_TABLE} (version BIGINT PRIMARY KEY, trained_at TIMESTAMP,
            records BIGINT, settings VARCHAR, status VARCHAR)"""
    )
    # A warehouse from before models said how they were made, or records held shared contacts.
    con.execute(f"ALTER TABLE {MODEL_TABLE} ADD COLUMN IF NOT EXISTS status VARCHAR")
    con.execute("ALTER TABLE identity_pii ADD COLUMN IF NOT EXISTS shared_contact VARCHAR")


def model_status(con: duckdb.DuckDBPyConnection, version: int | None) -> str:
    """How the model `version` was made, in plain words."""
    row = con.execute(f"SELECT status FROM {MODEL_TABLE} WHERE version = ?", [version]).fetchall()
    return (row[0][0] or "trained by EM") if row else ""


def latest_model(con: duckdb.DuckDBPyConnection) -> tuple[int, dict] | None:
    ensure_tables(con)
    row = con.execute(f"SELECT version, settings FROM {MODEL_TABLE} ORDER BY version DESC LIMIT 1").fetchall()
    return (row[0][0], json.loads(row[0][1])) if row else None


# People (userIds, else anonymousIds) whose events carry a name or a birth date: with enough of
# them a model can be trained. Cheap, and the same number at planning and training time.
MATCHING_PEOPLE = """SELECT count(DISTINCT coalesce(user_id, anonymous_id)) FROM raw_events
                     WHERE first_name IS NOT NULL OR last_name IS NOT NULL OR birthday IS NOT NULL"""


def matching_people(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute(MATCHING_PEOPLE).fetchall()[0][0]


def records_select(events: str, members: str, traits: dict[str, str] = TRAIT_SQL) -> str:
    """One row per component of `members` (node, identifier_type, identifier, first_seen_at,
    component) with its matching traits (most recent non-null, from `events`, read by `traits`)
    and its userIds; components with no name and no birth date have nothing to compare. Reads
    identity's `_guard` and `_occ`. DuckDB's dialect, compiled for Spark too (`engine.to_spark`)."""
    picked = ",\n".join(
        f"arg_max({sql}, (e.event_at, e.message_id)) FILTER (WHERE {sql} IS NOT NULL) AS {name}"
        for name, sql in traits.items()
    )
    any_trait = " OR ".join(f"e.{c} IS NOT NULL" for c in COMPARED)
    first = "(first_seen_at, identifier_type, identifier)"
    user_id = "WHERE identifier_type = 'user_id'"
    return f"""
        WITH firsts AS (
          SELECT component,
                 arg_min(identifier_type || ':' || identifier, {first}) AS first_id,
                 arg_min(identifier_type, {first}) AS anchor_type,
                 arg_min(identifier, {first}) AS anchor,
                 count(*) FILTER ({user_id}) AS user_ids,
                 min(identifier) FILTER ({user_id}) AS user_id,
                 list_sort(list(identifier) FILTER ({user_id})) AS user_id_list
          FROM {members} GROUP BY component
        ), traits AS (
          SELECT coalesce(mu.component, ma.component) AS component, {picked}
          FROM {events} e
          LEFT JOIN {members} mu ON mu.identifier_type = 'user_id' AND mu.identifier = e.user_id
          LEFT JOIN {members} ma ON ma.identifier_type = 'anonymous_id' AND ma.identifier = e.anonymous_id
          WHERE ({any_trait}) AND coalesce(mu.component, ma.component) IS NOT NULL
          GROUP BY 1
        ), shared AS (
          -- A guarded email or phone seen with a few userIds (and guarded for that alone), by the
          -- component of the userId or anonymousId it was seen with.
          SELECT m.component, min(g.identifier_type || ':' || g.identifier) AS shared_contact
          FROM _guard g
          JOIN _occ o ON o.identifier_type = g.identifier_type AND o.identifier = g.identifier
          JOIN _occ o2 ON o2.tid = o.tid AND o2.identifier_type IN ('user_id', 'anonymous_id')
          JOIN {members} m ON m.identifier_type = o2.identifier_type AND m.identifier = o2.identifier
          WHERE g.identifier_type IN ('email', 'phone') AND g.reason = g.user_ids || ' userIds'
            AND g.user_ids <= {MAX_SHARED_USER_IDS}
          GROUP BY 1
        )
        SELECT 'p' || left(sha256(f.first_id), 16) AS record_id, f.component, f.anchor_type, f.anchor,
               f.user_ids, f.user_id, coalesce(f.user_id_list, []) AS user_id_list,
               {", ".join(f"t.{name}" for name in traits)}, s.shared_contact
        FROM firsts f JOIN traits t ON t.component = f.component LEFT JOIN shared s ON s.component = f.component
        WHERE t.first_name IS NOT NULL OR t.last_name IS NOT NULL OR t.birthday IS NOT NULL"""


def stage_records(con: duckdb.DuckDBPyConnection, events: str, members: str) -> int:
    """`_records` (`records_select`) on DuckDB; returns how many."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE _records AS {records_select(events, members)}")
    return con.execute("SELECT count(*) FROM _records").fetchall()[0][0]


def _settings(threshold_rules: tuple[str, ...]) -> dict:
    import splink.comparison_level_library as cll
    import splink.comparison_library as cl
    from splink import SettingsCreator

    comparisons = []
    for name, levels in COMPARISONS:
        built = []
        for label, sql, _ in levels:
            if label == "null":
                built.append(cll.CustomLevel(sql, "null").configure(is_null_level=True))
            elif label == "else":
                built.append(cll.ElseLevel())
            else:
                built.append(cll.CustomLevel(sql, label))
        comparisons.append(cl.CustomComparison(built, output_column_name=name, comparison_description=name))
    creator = SettingsCreator(
        link_type="dedupe_only",
        unique_id_column_name="record_id",
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=list(threshold_rules),
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=True,
    )
    # No term-frequency adjustments: a pair's score then depends on the pair alone, not on who else
    # is in the data, so links stored from earlier runs stay valid and incremental equals full.
    settings = creator.create_settings_dict(sql_dialect_str="duckdb")
    for comparison in settings["comparisons"]:
        for level, (m, u) in zip(_levels(comparison), FIXED.get(comparison["output_column_name"], ())):
            level.update(m_probability=m, u_probability=u, fix_m_probability=True, fix_u_probability=True)
    return settings


def _linker(records: pa.Table, settings: dict):
    from splink import DuckDBAPI, Linker

    scratch = duckdb.connect()  # Splink's working tables stay out of the warehouse
    db = DuckDBAPI(scratch)
    return Linker(db.register(records), settings, log_level=logging.ERROR), scratch, db


def _splink_input(con: duckdb.DuckDBPyConnection, select: str) -> pa.Table:
    """The records to compare, with how many records share each blocking key (see blocking)."""
    cols = ", ".join(("record_id", *COMPARED, "shared_contact", "in_area"))
    return con.sql(f"{with_sizes(f'SELECT {cols} FROM ({select})')} ORDER BY record_id").to_arrow_table()


def train(con: duckdb.DuckDBPyConnection, pairs_per_record: int) -> tuple[dict, str, list[str]]:
    """Estimate a model on `_records` without labels (u by random sampling, m by EM), then check it.
    Returns Splink's settings with the parameters, how they were made, what was wrong with EM's
    model when it failed its checks (then the settings are the fallback's, see `fallback_model`).
    The checks score the pairs blocking gives, within `pairs_per_record`."""
    records = _splink_input(con, "SELECT *, true AS in_area FROM _records")
    settings = _settings(RULES)
    settings["probability_two_random_records_match"] = prior(con)
    linker, scratch, db = _linker(records, settings)
    try:
        blocked = block(scratch, records, pairs_per_record)
        linker.training.estimate_u_using_random_sampling(max_pairs=5e6, seed=1)
        u_only = linker.misc.save_model_to_json()
        em = _em_model(linker, db, records, blocked.limit)
        pairs = _score_blocked(scratch, blocked, em)
        problems = check_model(scratch, pairs, em, len(records))
        if not problems:
            return em, "trained by EM", []
        if all(kind == "order" for kind, _ in problems):
            # Only levels out of order (without term frequencies a near miss on a rare surname can
            # look stronger than an exact common one): the fuzzier level is pooled with the stricter,
            # and checked again.
            _put_in_order(em)
            pairs = _score_blocked(scratch, blocked, em)
            if not check_model(scratch, pairs, em, len(records)):
                return em, "trained by EM; levels put in order: " + "; ".join(t for _, t in problems), []
        model, how = fallback_model(scratch, pairs, u_only)
        return model, how, [t for _, t in problems]
    finally:
        scratch.close()


def _em_model(linker, db, records: pa.Table, limit: int | None) -> dict:
    """m by EM, one pass per EM_RULES blocking rule (u already estimated; the keys blocking left
    out left out here too); the settings after."""
    from splink import Linker
    from splink.internals.exceptions import EMTrainingException

    passes = 0
    for rule in EM_RULES:
        before = linker.misc.save_model_to_json()
        # The prior stays at the deterministic estimate: with few true matches EM would drive it to zero.
        try:
            linker.training.estimate_parameters_using_expectation_maximisation(
                capped(rule, limit), max_pairs=2e6, fix_probability_two_random_records_match=True
            )
            passes += 1
        except (EMTrainingException, ValueError):
            # No pairs agree on this rule's keys, or EM drove a level's m to zero (small data,
            # few true matches): this pass is skipped and the others estimate. A failed pass
            # leaves Splink's model without the comparisons it blocked on: start from before it.
            linker = Linker(db.register(records), before, log_level=logging.ERROR)
    if not passes:
        raise NotTrainable(f"no two people agree on any of {', '.join(RULES[i] for i in EM_RULES)}")
    return linker.misc.save_model_to_json()


def _levels(comparison: dict) -> list[dict]:
    """A comparison's levels other than the null level, best first: the i-th has gamma n-1-i."""
    return [lv for lv in comparison["comparison_levels"] if not lv.get("is_null_level")]


def _bf(level: dict) -> float | None:
    m, u = level.get("m_probability"), level.get("u_probability")
    return None if m is None or not u else m / u


def _score_blocked(scratch: duckdb.DuckDBPyConnection, blocked: Blocking, model: dict) -> str:
    """Every pair `blocked` gives (see blocking.block) scored by `model`: a table in `scratch` of each
    pair's gamma per comparison (Splink's numbering: -1 null, 0 else, the best level highest), its
    match_probability and the rules that found it, and nothing else, so millions of pairs stay
    small; returns its name."""
    columns = ", ".join(f"l.{c} AS {c}_l, r.{c} AS {c}_r" for c in (*COMPARED, "shared_contact"))
    gammas, weights = [], []
    for comparison in model["comparisons"]:
        name = comparison["output_column_name"]
        levels = _levels(comparison)
        null = next(lv["sql_condition"] for lv in comparison["comparison_levels"] if lv.get("is_null_level"))
        cases = [f"WHEN {null} THEN -1"] + [
            f"WHEN {lv['sql_condition']} THEN {len(levels) - 1 - i}" for i, lv in enumerate(levels[:-1])
        ]
        gammas.append(f"CASE {' '.join(cases)} ELSE 0 END::TINYINT AS gamma_{name}")
        bfs = [(len(levels) - 1 - i, _bf(lv)) for i, lv in enumerate(levels)]
        whens = " ".join(f"WHEN {g} THEN {float(np.log2(bf))!r}" for g, bf in bfs if bf)
        weights.append(f"CASE gamma_{name} {whens} ELSE 0 END" if whens else "0")
    lam = model["probability_two_random_records_match"]
    prior_weight = float(np.log2(lam / (1 - lam)))
    scratch.execute(
        f"""CREATE OR REPLACE TABLE _scored AS
            SELECT * EXCLUDE (mw), 1 / (1 + pow(2, -mw)) AS match_probability FROM (
              SELECT *, {prior_weight!r} + {" + ".join(weights)} AS mw FROM (
                SELECT rules, {", ".join(gammas)} FROM (
                  SELECT b.rules, {columns} FROM {blocked.table} b
                  JOIN {blocked.records} l ON l.record_id = b.join_key_l
                  JOIN {blocked.records} r ON r.record_id = b.join_key_r)))"""
    )
    return "_scored"


def _with_defaults(model: dict) -> dict:
    """A model whose unestimated levels (no pair was there to learn from) carry no evidence either way."""
    model = json.loads(json.dumps(model))
    for comparison in model["comparisons"]:
        for level in _levels(comparison):
            if level.get("m_probability") is None or level.get("u_probability") is None:
                level["m_probability"] = level["u_probability"] = level.get("u_probability") or 1e-6
    return model


def _top_counts(name: str) -> str:
    """SQL: how strongly the comparisons other than `name` agree, for pairs where none of them
    disagrees (each at its exact level or missing): a birth date counts 2, the rest 1."""
    agree = []
    for other, levels in COMPARISONS:
        if other == name or other in FIXED:
            continue
        top = len(levels) - 2
        agree.append((other, top, 2 if other == "birthday" else 1))
    all_top = " AND ".join(f"gamma_{o} IN ({t}, -1)" for o, t, _ in agree)
    score = " + ".join(f"CASE WHEN gamma_{o} = {t} THEN {w} ELSE 0 END" for o, t, w in agree)
    return f"CASE WHEN {all_top} THEN {score} ELSE 0 END"


# Fields a comparison's agreement follows from besides its own: an age from a birth date, a
# city from a postcode. A rule on those selects pairs that agree on the comparison too.
FOLLOWS = {"age": ("birthday",), "city": ("postal_code",)}


def _evidence(scratch: duckdb.DuckDBPyConnection, pairs: str, name: str) -> dict[int, int]:
    """For comparison `name`: how many pairs that agree on everything else (strongly: a birth date,
    or two other fields) fall at each of its levels (gamma -> pairs). Only pairs found by a rule
    that looks at none of its fields count: a rule on the birth year finds namesakes born that
    year, whose birth dates agree more than a match's and a random pair's would say."""
    rows = scratch.execute(
        f"""SELECT gamma_{name}, count(*) FROM {pairs}
            WHERE ({_top_counts(name)}) >= 2 AND gamma_{name} >= 0 AND {found_without((name, *FOLLOWS.get(name, ())))}
            GROUP BY 1"""
    ).fetchall()
    return dict(rows)


def check_model(scratch: duckdb.DuckDBPyConnection, pairs: str, model: dict, records: int) -> list[tuple[str, str]]:
    """What makes a trained model untrustworthy, as (kind, plain words) (empty when nothing does):
    - levels out of order: a fuzzier level carrying more evidence than a stricter one;
    - a level's m driven to (near) zero although pairs that agree on everything else sit at that
      level in numbers non-matches cannot explain;
    - an implausible number of expected matches against the pairs the deterministic rules find, or
      those pairs not linking."""
    by_name = {c["output_column_name"]: c for c in model["comparisons"]}
    return [
        *_order_problems(by_name),
        *_zero_problems(scratch, pairs, by_name),
        *_count_problems(scratch, pairs, records),
    ]


def _order_problems(by_name: dict) -> list[tuple[str, str]]:
    """Fuzzier levels carrying more evidence than stricter ones, along each comparison's CHAINS."""
    problems = []
    for name, chains in CHAINS.items():
        levels = {lv.get("label_for_charts"): lv for lv in _levels(by_name[name])}
        levels["else"] = _levels(by_name[name])[-1]
        for chain in chains:
            for upper, lower in zip(chain, chain[1:]):
                hi, lo = _bf(levels[upper]), _bf(levels[lower])
                if hi is not None and lo is not None and lo > hi * ORDER_SLACK:
                    problems.append(
                        (
                            "order",
                            f"{name}: '{lower}' carried more evidence than '{upper}' "
                            f"(Bayes factor {lo:.3g} against {hi:.3g})",
                        )
                    )
    return problems


def _zero_problems(scratch: duckdb.DuckDBPyConnection, pairs: str, by_name: dict) -> list[tuple[str, str]]:
    """Levels EM left without an estimate, or whose m it drove to near zero against the evidence."""
    problems = []
    for name in ("first_name", "last_name", "birthday"):
        # The exact level of a name or a birth date is the strongest evidence there is: EM leaving it
        # without an estimate (its passes failed on small data) is a model that cannot link.
        exact = _levels(by_name[name])[0]
        if exact.get("m_probability") is None and exact.get("u_probability"):
            problems.append(("zero", f"{name}: EM left '{exact.get('label_for_charts')}' without an estimate"))
    for name, _ in COMPARISONS:
        if name in FIXED:
            continue
        levels = _levels(by_name[name])
        counts = _evidence(scratch, pairs, name)
        seen = sum(counts.values())
        for i, level in enumerate(levels[:-1]):
            n = counts.get(len(levels) - 1 - i, 0)
            by_chance = seen * (level.get("u_probability") or 0)
            m = level.get("m_probability")
            if n >= 5 and n > 3 * by_chance + 5 and (m is None or m < 0.1 * (n - by_chance) / seen):
                problems.append(
                    (
                        "zero",
                        f"{name}: m of '{level.get('label_for_charts')}' is {0 if m is None else m:.2g} "
                        f"though {n} of {seen} pairs that agree on everything else are at that level",
                    )
                )
    return problems


def _count_problems(scratch: duckdb.DuckDBPyConnection, pairs: str, records: int) -> list[tuple[str, str]]:
    """An implausible number of expected matches, or sure pairs (same names and birth date) not linking."""
    top = {name: len(levels) - 2 for name, levels in COMPARISONS}
    agree = " AND ".join(f"gamma_{c} = {top[c]}" for c in ("first_name", "last_name", "birthday"))
    expected, sure, sure_linked = scratch.execute(
        f"""SELECT sum(match_probability), count(*) FILTER (WHERE {agree}),
                   count(*) FILTER (WHERE {agree} AND match_probability >= 0.5)
            FROM {pairs}"""
    ).fetchall()[0]
    expected, problems = expected or 0.0, []
    if sure < 10:
        return problems
    if expected < 0.5 * sure or expected > max(50 * sure, 2 * records):
        problems.append(
            (
                "count",
                f"the model expects {expected:.0f} matching pairs where {sure} pairs agree "
                f"exactly on name and birth date",
            )
        )
    if sure_linked < 0.9 * sure:
        problems.append(
            ("count", f"only {sure_linked} of the {sure} pairs that agree exactly on name and birth date would link")
        )
    return problems


def fallback_model(scratch: duckdb.DuckDBPyConnection, pairs: str, u_model: dict) -> tuple[dict, str]:
    """A model to trust when EM's is not: u from random sampling as before; each comparison's m from
    the pairs that agree on everything else, less what non-matches put at each level (their count
    times u), anchored on the fixed m of COMPARISONS, or those fixed m alone when such pairs are
    few; levels then put in order. Returns the settings and a sentence saying how m was made."""
    model = json.loads(json.dumps(u_model))
    by_name = {c["output_column_name"]: c for c in model["comparisons"]}
    estimated, fixed = [], []
    for name, spec in COMPARISONS:
        if name in FIXED:
            continue
        levels = _levels(by_name[name])
        prior_m = [m for label, _, m in spec if label != "null"]
        u = [lv.get("u_probability") or 1e-6 for lv in levels]
        counts = _evidence(scratch, pairs, name)
        n = [counts.get(len(levels) - 1 - i, 0) for i in range(len(levels))]
        seen = sum(n)
        # Matches among the pairs seen, from the disagreeing level: n_else = M m_else + (seen - M) u_else.
        matches = (seen * u[-1] - n[-1]) / max(u[-1] - prior_m[-1], 1e-6) if seen else 0.0
        matches = min(max(matches, 0.0), seen)
        if matches >= 20:
            alpha = 20.0
            raw = [max(n[i] - (seen - matches) * u[i], 0.0) / matches for i in range(len(levels))]
            m = [(matches * raw[i] + alpha * prior_m[i]) / (matches + alpha) for i in range(len(levels))]
            estimated.append(f"{name} ({matches:.0f} pairs)")
        else:
            m = list(prior_m)
            fixed.append(name)
        m = [max(x, 1e-4) for x in m]
        total = sum(m)
        for level, value, u_value in zip(levels, m, u):
            level["m_probability"], level["u_probability"] = value / total, u_value
    _put_in_order(model)
    how = (
        "fallback: EM's model failed its checks; m "
        + "; ".join(
            part
            for part in (
                f"estimated from the pairs that agree on everything else for {', '.join(estimated)}"
                if estimated
                else "",
                f"fixed per level for {', '.join(fixed)}" if fixed else "",
            )
            if part
        )
        + "; u from random sampling"
    )
    return model, how


def _put_in_order(model: dict) -> None:
    """Where a fuzzier level carries more evidence than a stricter one in its chain, pool the two:
    both get the Bayes factor of their m and u together (the m they hold between them is kept)."""
    for comparison in model["comparisons"]:
        levels = {lv.get("label_for_charts"): lv for lv in _levels(comparison)}
        levels["else"] = _levels(comparison)[-1]
        for _ in range(10):
            pooled = False
            for chain in CHAINS.get(comparison["output_column_name"], ()):
                for upper, lower in zip(chain, chain[1:]):
                    hi, lo = levels[upper], levels[lower]
                    if _bf(hi) is not None and _bf(lo) is not None and _bf(lo) > _bf(hi) * (1 + 1e-9):
                        bf = (hi["m_probability"] + lo["m_probability"]) / (hi["u_probability"] + lo["u_probability"])
                        hi["m_probability"], lo["m_probability"] = bf * hi["u_probability"], bf * lo["u_probability"]
                        pooled = True
            if not pooled:
                break


# Pairs that almost surely match although one field has a typo: first name, last name and birth
# date all given, two of them the same and the third nearly (a name at Jaro-Winkler >= 0.9, a
# date one digit off). Real duplicates rarely agree exactly on everything, so without these the
# prior of hand-typed records would be near zero and no pair could link. A date one digit off
# keeps its year or its month and day, so that rule joins on either (never on the names alone,
# which thousands may share).
NEAR_EXACT_RULES = (
    "l.first_name = r.first_name AND l.birthday = r.birthday AND jaro_winkler_similarity(l.last_name, r.last_name) >= 0.9",
    "l.last_name = r.last_name AND l.birthday = r.birthday AND jaro_winkler_similarity(l.first_name, r.first_name) >= 0.9",
    *(
        f"l.first_name = r.first_name AND l.last_name = r.last_name AND {part}(l.birthday, {n}) = {part}(r.birthday, {n}) "
        "AND length(l.birthday) = length(r.birthday) AND hamming(l.birthday, r.birthday) <= 1"
        for part, n in (("left", 4), ("right", 5))
    ),
)


def prior(con: duckdb.DuckDBPyConnection, recall: float = 0.9) -> float:
    """The probability that two random records match: the pairs the deterministic rules find (exact,
    or near-exact: one typo in one of name, surname and birth date), scaled up for the matches they
    miss (`recall`: the share of hand-typed duplicates with at most one typo in those three), over
    all pairs. At least one match is assumed, so the prior is never zero (with no duplicates at all,
    links then need overwhelming evidence)."""
    pairs = " UNION ".join(
        f"SELECT l.record_id, r.record_id FROM _records l JOIN _records r ON {rule} AND l.record_id < r.record_id"
        for rule in (*DETERMINISTIC_RULES, *NEAR_EXACT_RULES)
    )
    found, n = con.execute(f"SELECT (SELECT count(*) FROM ({pairs})), (SELECT count(*) FROM _records)").fetchall()[0]
    return min(max(found / recall, 1.0) / max(n * (n - 1) / 2, 1.0), 0.5)


def save_model(con: duckdb.DuckDBPyConnection, settings: dict, records: int, status: str) -> int:
    version = next_version(con)
    con.execute(
        f"INSERT INTO {MODEL_TABLE} VALUES (?, ?, ?, ?, ?)",
        [version, datetime.now(UTC).replace(tzinfo=None), records, json.dumps(settings), status],
    )
    return version


# The thresholds the metadata counts links at.
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)


def _predict_inputs(con: duckdb.DuckDBPyConnection, model: dict, outside: str | None) -> tuple[pa.Table, dict]:
    """The records to score (`_records`, in_area, and the stored records of people outside the run)
    and the model's settings for predicting, the same on either engine."""
    select = "SELECT *, true AS in_area FROM _records"
    if outside:
        select += f" UNION ALL BY NAME SELECT *, false AS in_area FROM ({outside})"
    settings = _with_defaults(model)
    settings["retain_intermediate_calculation_columns"] = True
    settings["retain_matching_columns"] = False
    return _splink_input(con, select), settings


def _by_threshold(pairs: str) -> str:
    return f"SELECT {', '.join(f'count(*) FILTER (WHERE match_probability >= {t})' for t in THRESHOLDS)} FROM {pairs}"


def _kept(pairs: str, threshold: float) -> str:
    return f"SELECT * FROM {pairs} WHERE match_probability >= {float(threshold)!r}"


def predict(
    con: duckdb.DuckDBPyConnection,
    model: dict,
    threshold: float,
    outside: str | None,
    pairs_per_record: int,
    report: LinkReport,
) -> None:
    """`_candidates`: scored pairs at or above `threshold` among `_records` (in_area) and, on an
    incremental run, the stored records of people outside the run (`outside`, not in_area):
    only pairs with at least one record in the run are compared. Fills the report's pairs
    compared, what blocking left out, and how many pairs scored at or above each of THRESHOLDS."""
    records, settings = _predict_inputs(con, model, outside)
    linker, scratch, db = _linker(records, settings)
    try:
        blocked = block(scratch, records, pairs_per_record, area_only=outside is not None)
        scratch.execute(f"CREATE VIEW _splink_blocked AS SELECT match_key, join_key_l, join_key_r FROM {blocked.table}")
        linker.table_management.register_blocked_pairs_for_predict(db.register("_splink_blocked"))
        pairs = linker.inference.predict(threshold_match_probability=min(threshold, THRESHOLDS[0]))
        by_threshold = scratch.execute(_by_threshold(pairs.physical_name)).fetchall()[0]
        table = scratch.sql(_kept(pairs.physical_name, threshold)).to_arrow_table()
    finally:
        scratch.close()
    _report_predicted(con, blocked, by_threshold, table, report)


def _report_predicted(
    con: duckdb.DuckDBPyConnection, blocked: Blocking, by_threshold: tuple, table: pa.Table, report: LinkReport
) -> None:
    """The report's figures and `_candidates`, from either engine's scored pairs."""
    report.candidate_pairs, report.left_out = blocked.pairs, blocked.left_out
    report.by_threshold = list(zip(THRESHOLDS, tuple(by_threshold)))
    _stage_candidates(con, table)


# The model's DuckDB functions that Spark lacks or has under another meaning, as DuckDB's own run
# on the executors (`engine.duckdb_functions`), under these names. Spark 4.3's built-in
# jaro_winkler_similarity (a built-in name a session function cannot take) counts half a
# transposition where DuckDB drops it: 0.825 for catherine / chater (DuckDB 0.85), 0.908 for
# leslie / leselie (DuckDB 0.928, another level of the model); the Splink jar's jaro_winkler counts
# as Spark does. Spark has no hamming.
SPARK_FUNCTIONS = {
    "duckdb_jaro_winkler_similarity": ("DOUBLE", "jaro_winkler_similarity(l, r)"),
    # DuckDB refuses values of two lengths; Spark runs a Python function on every row, not only
    # where the model's CASE reaches it (there both are one length). A DOUBLE: a count with NULLs
    # reaches pandas as floats; the model compares it with integers.
    "duckdb_hamming": ("DOUBLE", "CASE WHEN length(l) = length(r) THEN hamming(l, r) END"),
}
_ON_SPARK = re.compile(r"\b(jaro_winkler_similarity|hamming)\(")


def _spark_settings(settings: dict) -> dict:
    """The model's settings with its levels calling DuckDB's functions by their names on Spark."""
    settings = json.loads(json.dumps(settings))
    for comparison in settings["comparisons"]:
        for level in comparison["comparison_levels"]:
            level["sql_condition"] = _ON_SPARK.sub(r"duckdb_\1(", level["sql_condition"])
    return settings


def predict_on_spark(
    spark: SparkSession,
    con: duckdb.DuckDBPyConnection,
    model: dict,
    threshold: float,
    outside: str | None,
    pairs_per_record: int,
    report: LinkReport,
) -> None:
    """`predict` with the pairs scored by Splink's Spark backend (`SparkAPI`) in `spark`: the same
    records, blocked pairs, model and settings, and the same `_candidates` and report. The records
    and blocking stay on DuckDB (blocking.py is DuckDB SQL); the comparison of the pairs, the part
    that grows with them, runs on Spark."""
    from splink import Linker, SparkAPI

    records, settings = _predict_inputs(con, model, outside)
    scratch = duckdb.connect()
    try:
        blocked = block(scratch, records, pairs_per_record, area_only=outside is not None)
        pairs_in = scratch.sql(f"SELECT match_key, join_key_l, join_key_r FROM {blocked.table}").to_arrow_table()
    finally:
        scratch.close()
    duckdb_functions(spark, SPARK_FUNCTIONS)
    api = SparkAPI(spark_session=spark, break_lineage_method="persist", register_udfs_automatically=False)
    linker = Linker(api.register(records), _spark_settings(settings), log_level=logging.ERROR)
    linker.table_management.register_blocked_pairs_for_predict(api.register(spark.createDataFrame(pairs_in)))
    pairs = linker.inference.predict(threshold_match_probability=min(threshold, THRESHOLDS[0]))
    by_threshold = spark.sql(_by_threshold(pairs.physical_name)).first()
    table = spark.sql(_kept(pairs.physical_name, threshold)).toArrow()
    _report_predicted(con, blocked, by_threshold, table, report)


def _stage_candidates(con: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
    """Splink's scored pairs as `_candidates`: each pair once (lower record id left), with the
    weight each comparison added (Splink's mw_<comparison>, log2 Bayes factors) as JSON."""
    weights = {c[3:]: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names if c.startswith("mw_")}
    names = list(weights)
    shared = weights.get("shared_contact", np.zeros(table.num_rows)) > 0
    rows = {
        "record_id_l": table.column("record_id_l"),
        "record_id_r": table.column("record_id_r"),
        "match_probability": table.column("match_probability"),
        "match_weight": table.column("match_weight"),
        "shared": pa.array(shared, pa.bool_()),
        "weights": pa.array(
            [json.dumps({n: round(float(weights[n][i]), 3) for n in names}) for i in range(table.num_rows)],
            pa.string(),
        ),
    }
    con.register("_candidates_arrow", pa.table(rows))
    con.execute(
        """CREATE OR REPLACE TEMP TABLE _candidates AS
           SELECT least(record_id_l, record_id_r) AS record_id_l, greatest(record_id_l, record_id_r) AS record_id_r,
                  match_probability, match_weight, weights, shared FROM _candidates_arrow"""
    )
    con.unregister("_candidates_arrow")


def outside_people(con: duckdb.DuckDBPyConnection, scope: Scope) -> list[str]:
    """People outside an incremental run whose records a new candidate links to: the run must take them in."""
    return [
        r[0]
        for r in con.execute(
            f"""SELECT DISTINCT p.person_id FROM identity_pii p
                WHERE p.record_id IN (SELECT record_id_l FROM _candidates UNION SELECT record_id_r FROM _candidates)
                  AND {scope.lacks("p.person_id")}
                  AND p.record_id NOT IN (SELECT record_id FROM _records)"""
        ).fetchall()
    ]


def cluster(con: duckdb.DuckDBPyConnection, max_user_ids: int, relabel: bool = True) -> dict[str, int]:
    """Merge records along `_candidates`, strongest link first, unless the merged person would hold
    more than `max_user_ids` different userIds and the link is not two accounts sharing an email or
    phone with agreeing records (`shared`). Leaves the components merged (`_merges`: component, the
    one it joins) and each link's status (`_link_status`); relabels `_labels` with the merges (so a
    merged person is one component) unless `relabel` is off (on Spark `_labels` lives there)."""
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
    for left, right, shared in con.execute(
        "SELECT record_id_l, record_id_r, shared FROM _candidates "
        "ORDER BY match_probability DESC, record_id_l, record_id_r"
    ).fetchall():
        a, b = root(left), root(right)
        across = len(users[a] | users[b]) > max_user_ids
        if a == b:
            statuses.append((left, right, "redundant", "already one person through stronger links"))
        elif across and not shared:
            statuses.append((left, right, "blocked", "would join different userIds"))
        else:
            # Two accounts sharing an email or phone whose records agree are one person's.
            a, b = sorted((a, b))
            parent[b] = a
            users[a] = users[a] | users[b]
            statuses.append((left, right, "merged", "two accounts with one email or phone" if across else None))
    merged = {component[r]: component[root(r)] for r in component if root(r) != r}
    con.register(
        "_merges_arrow",
        pa.table(
            {"component": pa.array(list(merged), pa.int64()), "merged": pa.array(list(merged.values()), pa.int64())}
        ),
    )
    con.execute("CREATE OR REPLACE TEMP TABLE _merges AS SELECT * FROM _merges_arrow")
    con.unregister("_merges_arrow")
    if relabel:
        con.execute("UPDATE _labels SET component = m.merged FROM _merges m WHERE _labels.component = m.component")
    cols = list(zip(*statuses)) if statuses else [[], [], [], []]
    con.register(
        "_status_arrow",
        pa.table(
            {
                name: pa.array(list(values), pa.string())
                for name, values in zip(("record_id_l", "record_id_r", "status", "reason"), cols)
            }
        ),
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
    if rows:  # with no links there is nothing to label (and matplotlib would warn)
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


def model_weights(model: dict) -> list[tuple[str, str, float | None]]:
    """(comparison, level, match weight = log2(m/u)) for every level of every comparison but the null
    level, best level first; None where the model has no estimate."""
    rows = []
    for comparison in model["comparisons"]:
        for level in _levels(comparison):
            bf = _bf(level)
            label = level.get("label_for_charts") or "else"
            rows.append(
                (
                    comparison["output_column_name"],
                    "else" if label == "All other comparisons" else label,
                    None if not bf else float(np.log2(bf)),
                )
            )
    return rows


def model_png(model: dict, status: str = "") -> bytes:
    """The match-weight chart Splink draws: one bar per level of each comparison, its match weight
    (log2 Bayes factor: right is evidence for a match, left against), and the prior's weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in model_weights(model) if r[2] is not None]
    lam = model.get("probability_two_random_records_match") or 1e-6
    labels = ["prior (two random records match)"] + [f"{c}: {lv}" for c, lv, _ in rows]
    values = [float(np.log2(lam / (1 - lam)))] + [w for _, _, w in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.2), dpi=90)
    colours = ["grey"] + ["tab:green" if w >= 0 else "tab:red" for w in values[1:]]
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("match weight (log2 Bayes factor)", fontsize=8)
    ax.set_title(f"linkage model: match weight of each comparison level\n{status[:110]}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def next_version(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute(f"SELECT coalesce(max(version), 0) + 1 FROM {MODEL_TABLE}").fetchall()[0][0]
