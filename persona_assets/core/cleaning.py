"""Sessions, behaviour aggregates, cleaned traits, missing ratios and outliers — all in SQL, written
once in DuckDB's dialect and run on DuckDB (`clean`) or compiled for Spark (`clean_on_spark`, see
core/engine.py and docs/scaling.md).

Nothing is deleted: sparse people and outliers stay, with flags that later stages read
(`exclude_from_fitting`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import duckdb
import pandas as pd

from persona_assets.contracts import CleanedUsers, Sessions
from persona_assets.core import refresh
from persona_assets.core.engine import SparkTables
from persona_assets.core.identity import (
    COUNTRIES,
    GENDERS,
    MAX_AGE,
    MIN_AGE,
    PERSON_EVENTS,
    birth_date_sql,
    stage_scope_events,
)
from persona_assets.core.options import setting
from persona_assets.core.stage import StageResult
from persona_assets.core.warehouse import DATA_AS_OF, Scratch, bind, data_as_of, replace_tables, scratch

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

OUTLIER_METHODS = ("zscore", "iqr", "mad")
OUTLIER_ACTIONS = ("flag", "clip", "exclude")
# Person features checked for outliers, on a log1p scale (counts and money are heavy-tailed).
OUTLIER_FEATURES = ("event_count", "session_count", "avg_session_seconds", "order_count", "total_revenue")
# Whole counts: their fences are never narrower than one count at the center (see spread_sql).
COUNT_FEATURES = ("event_count", "session_count", "order_count")
# Events that are behaviour (what a person did), as opposed to identify, alias and group calls
# (what a system said about them). Features and segments fit on people with behaviour.
BEHAVIOUR_TYPES = ("track", "page", "screen")
MISSING_ATTRIBUTES = ("age_bracket", "gender", "country", "postal_code", "has_email", "has_phone")

# Checked against the latest value a person gave of each of these traits (deduped_users holds
# the latest *valid* one), so a value superseded for being invalid stays visible in trait_issues.
CHECKED_TRAITS = ("age", "birthday", "gender", "country")


@dataclass(frozen=True)
class CleaningOptions:
    """Sessions, trait cleaning, sparsity and outliers."""

    session_gap_minutes: float = setting(30.0, "Inactivity that ends a session.", gt=0)
    missing_attributes: tuple[str, ...] = setting(
        MISSING_ATTRIBUTES,
        f"Attributes counted for each person's missing_ratio (among {', '.join(MISSING_ATTRIBUTES)}).",
    )
    sparse_threshold: float = setting(
        0.5, "Above this missing_ratio a person is sparse: kept, not fitted on.", gt=0, le=1
    )
    outlier_method: Literal["zscore", "iqr", "mad"] = setting(
        "mad", "zscore, iqr or mad (on log1p of counts and money)."
    )
    outlier_limit: float = setting(3.5, "Fence width for person features.", gt=0)
    session_outlier_limit: float = setting(
        5.0, "Fence width for session length and event rate (10-hour sessions, bots).", gt=0
    )
    outlier_action: Literal["flag", "clip", "exclude"] = setting(
        "flag", "flag, clip (to the fences) or exclude (from fitting)."
    )
    burst_min_events: int = setting(30, "A bot burst needs at least this many events.", ge=2)
    long_session_hours: float = setting(
        6.0, "A session at least this long is long whatever the others look like.", gt=0
    )
    # The valid ages are identity's (it keeps a person's latest valid age), not a setting of their own.
    min_age: int = MIN_AGE
    max_age: int = MAX_AGE

    def __post_init__(self) -> None:
        if self.outlier_method not in OUTLIER_METHODS:
            raise ValueError(f"outlier_method must be one of {OUTLIER_METHODS}, got {self.outlier_method!r}")
        if self.outlier_action not in OUTLIER_ACTIONS:
            raise ValueError(f"outlier_action must be one of {OUTLIER_ACTIONS}, got {self.outlier_action!r}")
        unknown = set(self.missing_attributes) - set(MISSING_ATTRIBUTES)
        if unknown or not self.missing_attributes:
            raise ValueError(f"missing_attributes must be a non-empty subset of {MISSING_ATTRIBUTES}")
        if not 0 < self.sparse_threshold <= 1 or self.session_gap_minutes <= 0 or self.outlier_limit <= 0:
            raise ValueError("sparse_threshold must be in (0, 1]; session_gap_minutes and outlier_limit > 0")
        if self.long_session_hours <= 0:
            raise ValueError("long_session_hours must be > 0")


def spread_sql(v: str, method: str, whole_counts: bool = False) -> str:
    """Aggregate expression: the spread of `v` (a standard deviation's worth) that fences scale by.

    MAD alone collapses to 0 on discrete and lumpy values (most buyers order once, so the
    median and MAD of their log1p(order_count) are the same number and every repeat buyer
    would be flagged). The spread is therefore the largest of three estimates of one standard
    deviation: 1.4826 MAD, IQR / 1.349 and the 5-95% range / 3.29; zscore uses the standard
    deviation. For whole counts it is never less than one count above the center
    (ln(1 + e^-center) on the log1p scale), so a fence never falls between two counts that
    are both common. It is 0 only if at least 90% of the values are equal, or (counts) never.
    MAD is the median of |v - fit_center|, the column `fitted_sql` adds (median(v) over the same
    rows): written out, because Spark has no MAD aggregate (DuckDB's mad gives the same numbers).
    """
    if method == "zscore":
        spread = f"stddev_pop({v})"
    else:
        q = [f"quantile_cont({v}, {p})" for p in (0.05, 0.25, 0.75, 0.95)]
        spread = (
            f"greatest(1.4826 * median(abs({v} - fit_center)), ({q[2]} - {q[1]}) / 1.349, ({q[3]} - {q[0]}) / 3.29)"
        )
    if whole_counts:
        # Zero spread stays zero: a count everyone shares flags nobody.
        spread = f"CASE WHEN {spread} > 0 THEN greatest({spread}, ln(1 + exp(-median({v})))) ELSE {spread} END"
    return spread


def fitted_sql(value: str, rows: str, where: str = "") -> str:
    """The values fences are fitted on: `value` over `rows` as column v, with their median as
    column fit_center (what spread_sql's MAD measures from)."""
    return f"(SELECT {value} AS v, median({value}) OVER () AS fit_center FROM {rows} {where})"


def bounds_sql(v: str, method: str, limit: float, whole_counts: bool = False) -> tuple[str, str]:
    """Aggregate expressions giving the (lo, hi) fences of `v` (over `fitted_sql` rows) for an
    outlier method (NULL when the spread is 0: a feature with no spread flags nobody)."""
    spread = spread_sql(v, method, whole_counts)
    width = f"{limit} * nullif({spread}, 0)"
    if method == "zscore":
        lo, hi = f"avg({v})", f"avg({v})"
    elif method == "iqr":
        lo, hi = f"quantile_cont({v}, 0.25)", f"quantile_cont({v}, 0.75)"
        width = f"{limit} * 1.349 * nullif({spread}, 0)"
    else:
        lo = hi = f"median({v})"
    return f"{lo} - {width}", f"{hi} + {width}"


def _person_fences_sql(opts: CleaningOptions, scored: str) -> str:
    """One row per outlier feature: its fences on the log1p scale, fitted on the people with
    behaviour who have some of it. Zero is a value, not an outlier (most people never order):
    zeros are neither fitted on nor flagged, so the fences hold however few people order."""
    parts = []
    for f in OUTLIER_FEATURES:
        lo, hi = bounds_sql("v", opts.outlier_method, opts.outlier_limit, f in COUNT_FEATURES)
        parts.append(
            f"""SELECT '{f}' AS feature, count(v) AS fitted_on, median(v) AS center,
                   {spread_sql("v", opts.outlier_method, f in COUNT_FEATURES)} AS spread,
                   {lo} AS lo, {hi} AS hi
            FROM {fitted_sql(f"ln(1 + {f})", "s", f"WHERE {f} > 0")}"""
        )
    return f"""WITH s AS (SELECT * FROM ({scored}) WHERE behaviour_events > 0)
{" UNION ALL ".join(parts)}"""


def vocabularies() -> dict[str, pd.DataFrame]:
    """The small reference tables cleaning joins, by name, for either engine: gender and country
    aliases, and each time zone's UTC offset now (DuckDB's list; in seconds, because an INTERVAL
    column has no Parquet type Spark reads)."""
    with duckdb.connect() as mem:
        tz = mem.execute("SELECT name, epoch(utc_offset)::BIGINT AS utc_offset_seconds FROM pg_timezone_names()").df()
    return {
        "_gender_vocab": pd.DataFrame(
            [(alias, g) for g, aliases in GENDERS.items() for alias in aliases], columns=["alias", "gender"]
        ),
        "_country_vocab": pd.DataFrame(list(COUNTRIES.items()), columns=["alias", "country"]),
        "_tz": tz,
    }


def _vocabularies(con: duckdb.DuckDBPyConnection) -> None:
    for name, frame in vocabularies().items():
        con.register("_vocabulary", frame)
        con.execute(f'CREATE OR REPLACE TEMP TABLE "{name}" AS SELECT * FROM _vocabulary')
        con.unregister("_vocabulary")


# People who declined personalization: their events still count, but profiling starts here,
# so they get no sessions and no cleaned row, and nothing downstream (features, segments,
# models, imputations, profiles) ever sees them.
DECLINED = "(SELECT person_id FROM deduped_users WHERE consent = 'declined')"


def _session_rows_sql(events: str) -> str:
    """Sessions (without flags) of the people in `events` (person_events, or an incremental run's scope).
    Both windows order by (event_at, message_id): ordered by event_at alone, two events at the
    same instant could number a person's first session 0 or 1 from one run to the next."""
    return f"""
WITH e AS (
  SELECT person_id, event_at, message_id, device_type, anonymous_id,
         CASE WHEN lag(event_at) OVER w IS NULL
                OR epoch_us(event_at) - epoch_us(lag(event_at) OVER w) > $gap_seconds * 1e6 THEN 1 ELSE 0 END AS starts
  FROM {events} WHERE person_id IS NOT NULL AND person_id NOT IN (SELECT person_id FROM {DECLINED})
  WINDOW w AS (PARTITION BY person_id ORDER BY event_at, message_id)
), numbered AS (
  SELECT *, sum(starts) OVER (PARTITION BY person_id ORDER BY event_at, message_id ROWS UNBOUNDED PRECEDING)
    AS session_no
  FROM e
)
SELECT person_id || '-' || session_no AS session_id, person_id, min(event_at) AS started_at,
       max(event_at) AS ended_at, (epoch_us(max(event_at)) - epoch_us(min(event_at))) / 1e6 AS duration_seconds,
       count(*) AS event_count,
       count(*) / greatest((epoch_us(max(event_at)) - epoch_us(min(event_at))) / 1e6 / 60.0, 1.0) AS events_per_minute,
       mode() WITHIN GROUP (ORDER BY device_type) AS device_type,
       mode() WITHIN GROUP (ORDER BY anonymous_id) AS anonymous_id
FROM numbered GROUP BY person_id, session_no
"""


def _session_fences_sql(opts: CleaningOptions, rows: str) -> str:
    """One row: the fences of session length (over sessions that last at all: a one-event
    visit has no length) and of event rate, on the log1p scale."""
    hi = bounds_sql("v", opts.outlier_method, opts.session_outlier_limit)[1]
    return f"""
WITH s AS ({rows})
SELECT (SELECT {hi} FROM {fitted_sql("ln(1 + duration_seconds)", "s", "WHERE duration_seconds > 0")}) AS long_hi,
       (SELECT {hi} FROM {fitted_sql("ln(1 + events_per_minute)", "s")}) AS burst_hi,
       (SELECT count(*) FROM s) AS fitted_on
"""


def _sessions_sql(rows: str) -> str:
    """Flag long and burst sessions in `rows` against `_session_fences`. A session is long past
    `long_session_hours` whatever the rest look like: on a log scale a robust fence over
    mostly short visits can sit at hundreds of hours, and a 10-hour session is never typical."""
    return f"""
WITH s AS ({rows})
SELECT s.*, duration_seconds >= $long_seconds OR coalesce(ln(1 + duration_seconds) > f.long_hi, false) AS is_long,
       event_count >= $burst_min AND coalesce(ln(1 + events_per_minute) > f.burst_hi, false) AS is_burst
FROM s, _session_fences f
"""


DAYPART_AND_DEVICE_SHARES = (
    ("mobile", "device_type = 'mobile'"),
    ("desktop", "device_type = 'desktop'"),
    ("tablet", "device_type = 'tablet'"),
    ("night", "local_hour < 6"),
    ("morning", "local_hour >= 6 AND local_hour < 12"),
    ("afternoon", "local_hour >= 12 AND local_hour < 18"),
    ("evening", "local_hour >= 18"),
)
# When each attribute counts as present, for the missing ratio.
PRESENT = {
    "age_bracket": "age_bracket IS NOT NULL",
    "gender": "gender IS NOT NULL",
    "country": "country IS NOT NULL",
    "postal_code": "postal_code IS NOT NULL",
    "has_email": "has_email",
    "has_phone": "has_phone",
}


def _behaviour_ctes(events: str) -> str:
    """CTEs `behaviour`, `categories` and `sess`: what each person in `events` did."""
    shares = ",\n".join(
        f"  coalesce(avg(({cond})::INT), 0) AS {name}_share" for name, cond in DAYPART_AND_DEVICE_SHARES
    )
    return f"""ev AS (
  SELECT pe.person_id, pe.event_at, pe.event_type, pe.event_name, pe.revenue, pe.category, pe.device_type,
         hour(pe.event_at + INTERVAL 1 SECOND * coalesce(tz.utc_offset_seconds, 0)) AS local_hour
  FROM {events} pe LEFT JOIN _tz tz ON tz.name = pe.timezone
  WHERE pe.person_id IS NOT NULL
), behaviour AS (
  SELECT person_id, count(*) AS event_count,
    count(*) FILTER (WHERE event_type IN {BEHAVIOUR_TYPES}) AS behaviour_events,
    count(*) FILTER (WHERE event_name = 'Order Completed') AS order_count,
    coalesce(sum(revenue) FILTER (WHERE event_name = 'Order Completed'), 0) AS total_revenue,
    min(event_at) FILTER (WHERE event_name = 'Order Completed') AS first_order_at,
    max(event_at) FILTER (WHERE event_name = 'Order Completed') AS last_order_at,
{shares}
  FROM ev GROUP BY person_id
), categories AS (
  SELECT person_id, map_from_entries(list_sort(list((category, n)))) AS category_counts
  FROM (SELECT person_id, category, count(*) AS n FROM ev WHERE category IS NOT NULL GROUP BY 1, 2)
  GROUP BY person_id
), sess AS (
  SELECT person_id, count(*) AS session_count, avg(duration_seconds) AS avg_session_seconds,
         median(duration_seconds) AS median_session_seconds
  FROM _session_rows GROUP BY person_id
)"""


def _trait_ctes(events: str, people: str) -> str:
    """CTEs `traits` and `aged`: each person's cleaned traits (age from a stated age or a
    birthday), and the issues of the latest values they gave, valid or not."""
    latest = ", ".join(
        f"arg_max({t}, (event_at, message_id)) FILTER (WHERE {t} IS NOT NULL) AS latest_{t}" for t in CHECKED_TRAITS
    )
    return f"""latest AS (
  SELECT person_id, {latest}
  FROM {events}
  WHERE person_id IS NOT NULL AND ({" OR ".join(f"{t} IS NOT NULL" for t in CHECKED_TRAITS)})
  GROUP BY person_id
), traits AS (
  SELECT d.person_id, d.first_seen_at, d.last_seen_at, d.email_hash IS NOT NULL AS has_email,
         d.phone_hash IS NOT NULL AS has_phone, d.postal_code,
         TRY_CAST(d.age AS DOUBLE) AS age_number,
         year($as_of::DATE) - year({birth_date_sql("d.birthday")}) AS birthday_age, d.birthday,
         gv.gender, cv.country,
         -- The latest values given, valid or not (a person's own events; else what survived).
         coalesce(l.latest_age, d.age) AS latest_age, coalesce(l.latest_birthday, d.birthday) AS latest_birthday,
         coalesce(l.latest_gender, d.gender) AS latest_gender, coalesce(l.latest_country, d.country) AS latest_country,
         -- Checked here, not in aged's list: Spark allows no subquery inside a list function.
         lower(trim(coalesce(l.latest_gender, d.gender))) NOT IN (SELECT alias FROM _gender_vocab) AS gender_unknown,
         upper(trim(coalesce(l.latest_country, d.country))) NOT IN (SELECT alias FROM _country_vocab) AS country_unknown
  FROM (SELECT * FROM deduped_users WHERE person_id NOT IN (SELECT person_id FROM {DECLINED})) d
  LEFT JOIN _gender_vocab gv ON gv.alias = lower(trim(d.gender))
  LEFT JOIN _country_vocab cv ON cv.alias = upper(trim(d.country))
  LEFT JOIN latest l ON l.person_id = d.person_id
  {people}
), aged AS (
  SELECT *,
    -- A stated age wins when valid; else a valid birthday gives it.
    CASE WHEN age_number BETWEEN $min_age AND $max_age THEN round(age_number)
         WHEN birthday_age BETWEEN $min_age AND $max_age THEN birthday_age END::BIGINT AS age,
    list_filter([
      CASE WHEN latest_age IS NOT NULL AND TRY_CAST(latest_age AS DOUBLE) IS NULL THEN 'age_not_a_number' END,
      CASE WHEN NOT TRY_CAST(latest_age AS DOUBLE) BETWEEN $min_age AND $max_age THEN 'age_out_of_range' END,
      CASE WHEN latest_birthday IS NOT NULL AND {birth_date_sql("latest_birthday")} IS NULL THEN 'birthday_not_a_date' END,
      CASE WHEN gender_unknown THEN 'gender_unrecognized' END,
      CASE WHEN country_unknown THEN 'country_unrecognized' END
    ], lambda x: x IS NOT NULL) AS trait_issues
  FROM traits
)"""


# One row per person from the CTEs above (a person without behaviour gets zeros).
JOINED = """SELECT a.person_id, a.first_seen_at, a.last_seen_at,
    coalesce(b.event_count, 0) AS event_count, coalesce(b.behaviour_events, 0) AS behaviour_events,
    coalesce(s.session_count, 0) AS session_count,
    s.avg_session_seconds, s.median_session_seconds,
    coalesce(b.order_count, 0) AS order_count, coalesce(b.total_revenue, 0) AS total_revenue,
    b.first_order_at, b.last_order_at,
    coalesce(s.session_count, 0) / greatest(date_diff('second', a.first_seen_at, a.last_seen_at) / 604800.0, 1.0)
      AS sessions_per_week,
    c.category_counts,
    coalesce(b.mobile_share, 0) AS mobile_share, coalesce(b.desktop_share, 0) AS desktop_share,
    coalesce(b.tablet_share, 0) AS tablet_share, coalesce(b.night_share, 0) AS night_share,
    coalesce(b.morning_share, 0) AS morning_share, coalesce(b.afternoon_share, 0) AS afternoon_share,
    coalesce(b.evening_share, 0) AS evening_share,
    a.age,
    CASE WHEN a.age < 25 THEN '<25' WHEN a.age < 35 THEN '25-34' WHEN a.age < 45 THEN '35-44'
         WHEN a.age < 55 THEN '45-54' WHEN a.age IS NOT NULL THEN '55+' END AS age_bracket,
    a.gender, a.country, a.postal_code, a.has_email, a.has_phone,
    CASE WHEN array_length(a.trait_issues) > 0 THEN a.trait_issues END AS trait_issues
  FROM aged a
  LEFT JOIN behaviour b USING (person_id) LEFT JOIN sess s USING (person_id) LEFT JOIN categories c USING (person_id)"""


def _scored_sql(opts: CleaningOptions, events: str, people: str) -> str:
    """Per-person rows (everything but what depends on the whole population or the clock) for
    the people in `events`; `people` filters deduped_users to the same people."""
    missing = " + ".join(f"(NOT coalesce({PRESENT[a]}, false))::INT" for a in opts.missing_attributes)
    return f"""
WITH {_behaviour_ctes(events)}, {_trait_ctes(events, people)}, joined AS (
  {JOINED}
)
SELECT *, ({missing}) / {len(opts.missing_attributes)}.0 AS missing_ratio FROM joined
"""


def _finish_sql(scored: str) -> str:
    """Everyone's final row from their per-person rows in `scored`: recency to the data's
    as-of time, bot and long-session flags from the sessions table, and outlier flags
    against the fences in `_fences` (a zero is never flagged, a feature without fences flags
    nobody)."""
    fence_cols = ", ".join(
        f"max(lo) FILTER (WHERE feature = '{f}') AS {f}_lo, max(hi) FILTER (WHERE feature = '{f}') AS {f}_hi"
        for f in OUTLIER_FEATURES
    )
    flags = ", ".join(
        f"CASE WHEN {f} > 0 AND (ln(1 + {f}) < {f}_lo OR ln(1 + {f}) > {f}_hi) THEN '{f}' END" for f in OUTLIER_FEATURES
    )
    clip = {
        f: f"CASE WHEN $action = 'clip' AND {f} > 0 AND {f}_hi IS NOT NULL"
        f" THEN least(greatest({f}, exp({f}_lo) - 1), exp({f}_hi) - 1) ELSE {f} END"
        for f in OUTLIER_FEATURES
    }
    # A clipped count is rounded half to even, as DuckDB's cast does (Spark's cast truncates).
    clipped = ", ".join(
        f"round_even({clip[f]}, 0)::BIGINT AS {f}" if f in COUNT_FEATURES else f"{clip[f]} AS {f}"
        for f in OUTLIER_FEATURES
    )
    return f"""
WITH sess AS (
  SELECT person_id, bool_or(is_long) AS has_long_session, bool_or(is_burst) AS is_bot FROM sessions GROUP BY 1
), scored AS (
  SELECT p.*, date_diff('second', p.last_order_at, $as_of) / 86400.0 AS days_since_last_order,
         coalesce(s.has_long_session, false) AS has_long_session, coalesce(s.is_bot, false) AS is_bot
  FROM ({scored}) p LEFT JOIN sess s USING (person_id)
), fences AS (
  SELECT {fence_cols} FROM _fences
), flagged AS (
  SELECT scored.*, fences.*,
    list_filter([{flags}], lambda x: x IS NOT NULL) AS flag_list
  FROM scored, fences
)
SELECT * EXCLUDE ({", ".join(OUTLIER_FEATURES)}, flag_list, {", ".join(f"{f}_lo, {f}_hi" for f in OUTLIER_FEATURES)}),
  {clipped},
  CASE WHEN order_count > 0 THEN total_revenue / order_count END AS avg_order_value,
  missing_ratio > $sparse_threshold AS is_sparse,
  CASE WHEN array_length(flag_list) > 0 THEN flag_list END AS outlier_flags,
  behaviour_events = 0 OR is_bot OR ($action = 'exclude' AND (array_length(flag_list) > 0 OR has_long_session))
    AS exclude_from_fitting
FROM flagged
"""


# The event columns sessions and per-person rows read (an incremental run stages only these).
EVENT_COLUMNS = (
    "message_id",
    "anonymous_id",
    "event_at",
    "event_type",
    "event_name",
    "revenue",
    "category",
    "device_type",
    "timezone",
    *CHECKED_TRAITS,
)
# Columns of cleaned_users that _finish_sql derives; the rest are each person's own.
DERIVED_COLUMNS = (
    "days_since_last_order",
    "has_long_session",
    "is_bot",
    "avg_order_value",
    "is_sparse",
    "outlier_flags",
    "exclude_from_fitting",
)
# What later stages read: a change in these puts a person in the next stage's scope.
DOWNSTREAM_FLAGS = ("is_sparse", "is_bot", "has_long_session", "exclude_from_fitting")


@dataclass
class CleaningResult(StageResult):
    fences: list[dict] = field(default_factory=list)  # the fences in force, for the asset's metadata


@dataclass(frozen=True)
class _Sources:
    """Where a cleaning run reads from: all events and people, or an incremental run's scope
    (new rows for the people in `_scope`, everyone else's stored rows)."""

    events: str
    people: str
    sessions: str
    scored: str


FULL_SOURCES = _Sources("person_events", "", "SELECT * FROM _session_rows", "SELECT * FROM _scored_new")


def _scope_sources(con: duckdb.DuckDBPyConnection, opts: CleaningOptions, p: refresh.Plan, as_of) -> _Sources:
    """Widen the scope to people whose age moved with the data's as-of date, stage their events,
    and remember everyone's downstream flags (people whose flags move go downstream too)."""
    p.scope.widen(
        con,
        """SELECT person_id FROM deduped_users WHERE birthday IS NOT NULL
           AND NOT coalesce(TRY_CAST(age AS DOUBLE) BETWEEN $min_age AND $max_age, false)
           AND year($old::DATE) - year({birthday})
               IS DISTINCT FROM year($new::DATE) - year({birthday})""".format(birthday=birth_date_sql("birthday")),
        {"old": p.previous_as_of or as_of, "new": as_of, "min_age": opts.min_age, "max_age": opts.max_age},
    )
    stage_scope_events(con, p.scope, EVENT_COLUMNS)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _flags_before AS SELECT person_id, {', '.join(DOWNSTREAM_FLAGS)} FROM cleaned_users"
    )
    return _Sources(
        events="_scope_events",
        people=f"WHERE {p.scope.has('d.person_id')}",
        sessions=f"""SELECT * EXCLUDE (is_long, is_burst) FROM sessions WHERE {p.scope.lacks()}
                     UNION ALL BY NAME SELECT * FROM _session_rows""",
        scored=f"""SELECT * EXCLUDE ({", ".join(DERIVED_COLUMNS)}) FROM cleaned_users
                   WHERE {p.scope.lacks()}
                   UNION ALL BY NAME SELECT * FROM _scored_new""",
    )


def parameters(opts: CleaningOptions, as_of) -> dict:
    """The values cleaning's statements bind (`$gap_seconds`...), from the options and the data's as-of time."""
    return {
        "gap_seconds": opts.session_gap_minutes * 60,
        "long_seconds": opts.long_session_hours * 3600,
        "burst_min": opts.burst_min_events,
        "as_of": as_of,
        "min_age": opts.min_age,
        "max_age": opts.max_age,
        "sparse_threshold": opts.sparse_threshold,
        "action": opts.outlier_action,
    }


def steps(opts: CleaningOptions, src: _Sources = FULL_SOURCES) -> list[tuple[str, str]]:
    """The statements before the results, by the table each makes: the scope's sessions and
    per-person rows, then the fences over everyone's."""
    return [
        ("_session_rows", _session_rows_sql(src.events)),
        ("_scored_new", _scored_sql(opts, src.events, src.people)),
        ("_fences", _person_fences_sql(opts, src.scored)),
        ("_session_fences", _session_fences_sql(opts, src.sessions)),
    ]


def _stage_rows(s: Scratch | SparkTables, opts: CleaningOptions, src: _Sources, params: dict) -> None:
    """`steps` as DuckDB scratch tables or Spark temp views (the same statements on both)."""
    for name, sql in steps(opts, src):
        s.table(name, sql, bind(sql, params))


def results(src: _Sources = FULL_SOURCES) -> list[tuple[type, str, str]]:
    """The tables cleaning writes, in order (cleaned_users reads the new sessions)."""
    return [
        (Sessions, "sessions", _sessions_sql(src.sessions)),
        (CleanedUsers, "cleaned_users", _finish_sql(src.scored)),
    ]


def clean(con: duckdb.DuckDBPyConnection, opts: CleaningOptions | None = None, full: bool = False) -> CleaningResult:
    """Bring `sessions` and `cleaned_users` up to date (one transaction).

    Incrementally, sessions and per-person rows are recomputed from the events of the people
    identity changed (and of people whose age moved with the data's as-of date); fences, flags
    and recency are then redone over everyone's rows, which is cheap and keeps the result equal
    to a full rebuild. With `outlier_action='clip'` the stored values are clipped, so fences
    cannot be recomputed from them: every run is full.
    """
    opts = opts or CleaningOptions()
    as_of = data_as_of(con)
    params = parameters(opts, as_of)
    with scratch(con) as s:
        for name in ("_gender_vocab", "_country_vocab", "_tz", "_scope_events", "_flags_before"):
            s.adopt(name)
        _vocabularies(con)
        p = refresh.plan(
            con,
            "cleaning",
            asdict(opts),
            ("sessions", "cleaned_users"),
            full=full or opts.outlier_action == "clip",
            full_reason="full rebuild asked for" if full else "outlier_action is clip",
        )
        src = FULL_SOURCES if p.full else _scope_sources(con, opts, p, as_of)
        _stage_rows(s, opts, src, params)
        recomputed = p.scope.size(con)

        def record() -> None:
            if not p.full:  # people whose flags moved with the population's fences go downstream too
                p.scope.widen(
                    con,
                    f"""SELECT person_id FROM (SELECT person_id, {", ".join(DOWNSTREAM_FLAGS)} FROM cleaned_users
                        EXCEPT SELECT * FROM _flags_before)""",
                )
            refresh.record(con, p, as_of, p.scope.size(con))

        counts = replace_tables(con, results(src), params, before_commit=[(record, None)])
        fences = fence_report(con, opts)
    return CleaningResult(
        mode=p.mode,
        why=p.reason,
        people=counts["cleaned_users"],
        people_recomputed=None if p.full else recomputed,
        counts=counts,
        fences=fences,
    )


# The fences in force, in each feature's own units, with how many they flag (on either engine).
PERSON_FENCES = """SELECT feature, fitted_on, round(exp(center) - 1, 2) AS typical, round(exp(lo) - 1, 2) AS low_fence,
       round(exp(hi) - 1, 2) AS high_fence,
       (SELECT count(*) FROM cleaned_users WHERE list_contains(outlier_flags, feature)) AS flagged,
       CASE WHEN fitted_on = 0 THEN 'nobody has any: flags nobody'
            WHEN coalesce(spread, 0) = 0 THEN 'no spread: flags nobody'
            ELSE 'fitted on people with behaviour and a nonzero value; zeros never flagged' END AS note
FROM _fences ORDER BY feature"""
SESSION_FENCES = """SELECT 'session duration_seconds' AS feature, fitted_on, round(exp(long_hi) - 1, 2) AS high_fence,
       (SELECT count(*) FROM sessions WHERE is_long) AS flagged,
       'is_long: at least ' || $hours || ' h, or above the fence' AS note
FROM _session_fences
UNION ALL
SELECT 'session events_per_minute', fitted_on, round(exp(burst_hi) - 1, 2),
       (SELECT count(*) FROM sessions WHERE is_burst),
       'is_burst: above the fence with at least ' || $burst_min || ' events'
FROM _session_fences"""


def _fence_params(opts: CleaningOptions) -> dict:
    return {"hours": opts.long_session_hours, "burst_min": opts.burst_min_events}


def fence_report(con: duckdb.DuckDBPyConnection, opts: CleaningOptions) -> list[dict]:
    """The fences in force (for the asset's metadata: a reader sees where each line was drawn and why none was)."""
    return _fence_rows([con.execute(PERSON_FENCES).df(), con.execute(SESSION_FENCES, _fence_params(opts)).df()])


def _fence_rows(frames: list) -> list[dict]:
    rows = [row for frame in frames for row in frame.to_dict("records")]
    return [{k: (None if v != v else v) for k, v in row.items()} for row in rows]


# What reads raw events on Spark so far (`engine: spark` refuses to run the graph until all do).
SPARK_INPUTS = ("raw_events", "identity_map", "deduped_users")


def clean_on_spark(spark: SparkSession, warehouse: Path, opts: CleaningOptions | None = None) -> CleaningResult:
    """`sessions` and `cleaned_users` rebuilt in full on Spark from the Parquet tables in
    `warehouse` (raw_events, identity_map, deduped_users), with the statements `clean` runs on
    DuckDB, compiled by `engine.to_spark`; the results are written there as Parquet.

    Full builds only (the incremental path reads and splices DuckDB tables); a full build gives
    the rows an incremental one would. The fences' report is made on Spark too.
    """
    opts = opts or CleaningOptions()
    t = SparkTables(spark, warehouse)
    try:
        t.read(*SPARK_INPUTS)
        for name, frame in vocabularies().items():
            t.frame(name, frame)
        t.view("person_events", PERSON_EVENTS)
        params = parameters(opts, t.query(DATA_AS_OF).collect()[0][0])
        _stage_rows(t, opts, FULL_SOURCES, params)
        counts = {table: t.write(model, table, sql, params) for model, table, sql in results()}
        fences = _fence_rows(
            [t.query(PERSON_FENCES).toPandas(), t.query(SESSION_FENCES, _fence_params(opts)).toPandas()]
        )
    finally:
        t.drop()
    return CleaningResult(
        mode="full", why="Spark builds in full", people=counts["cleaned_users"], counts=counts, fences=fences
    )
