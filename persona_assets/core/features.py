"""normalized_features: the modelling matrix — log1p on heavy tails, clipping at robust fences, then scaling.

The fitted parameters form a `FeatureTransform`, saved with a version so people who arrive
later are scored with exactly the transform the segment and trait models were trained on.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import duckdb
import numpy as np
import pandas as pd

from persona_assets.core import refresh
from persona_assets.core.models import ModelStore
from persona_assets.core.options import setting
from persona_assets.core.stage import StageResult, retrain_reasons
from persona_assets.core.warehouse import replace_frame, splice_frame

# Counts, durations and money: heavy-tailed, so modelled on a log1p scale and clipped.
LOG_FEATURES = (
    "event_count",
    "session_count",
    "avg_session_seconds",
    "events_per_session",
    "sessions_per_week",
    "order_count",
    "total_revenue",
    "avg_order_value",
)
# Bounded shares in [0, 1]: used as they are.
SHARE_FEATURES = (
    "conversion_rate",
    "mobile_share",
    "desktop_share",
    "tablet_share",
    "night_share",
    "morning_share",
    "afternoon_share",
    "evening_share",
)
CATEGORY_PREFIX = "category_"
SCALINGS = ("zscore", "minmax")
CLIP_METHODS = ("mad", "iqr", "zscore", "none")

BASE_SQL = """
SELECT person_id, is_sparse, exclude_from_fitting, behaviour_events,
  event_count::DOUBLE AS event_count, session_count::DOUBLE AS session_count,
  coalesce(avg_session_seconds, 0) AS avg_session_seconds,
  event_count / greatest(session_count, 1) AS events_per_session,
  sessions_per_week, order_count::DOUBLE AS order_count, total_revenue,
  coalesce(avg_order_value, 0) AS avg_order_value,
  order_count / greatest(session_count, 1) AS conversion_rate,
  mobile_share, desktop_share, tablet_share, night_share, morning_share, afternoon_share, evening_share,
  coalesce(list_sum(map_values(category_counts)), 0)::DOUBLE AS category_total{category_columns}
FROM cleaned_users
"""
# Features describe behaviour: they are fitted on people with behaviour who are not bots or (with
# outlier_action 'exclude') outliers, whatever traits they told us, and written for everyone with behaviour.
FITTING = "WHERE NOT exclude_from_fitting"
# Fewest people a transform is fitted on.
MIN_FIT_PEOPLE = 2


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unnamed"


@dataclass
class FeatureTransform:
    """Everything needed to turn a cleaned_users row into a row of the modelling matrix."""

    scaling: str
    categories: list[str]  # category names as in the data; the rest count as "other"
    clip_lo: dict[str, float]
    clip_hi: dict[str, float]
    center: dict[str, float]
    scale: dict[str, float]
    fitted_rows: int
    clip_method: str = "mad"
    clip_limit: float = 3.5
    version: int = 0
    features: list[str] = field(default_factory=list)

    def category_columns(self) -> list[str]:
        return [CATEGORY_PREFIX + slug(c) for c in self.categories] + [CATEGORY_PREFIX + "other"]

    def raw_matrix(self, base: pd.DataFrame) -> pd.DataFrame:
        """Unscaled features: log1p of heavy tails, shares, category shares (before clipping)."""
        out = pd.DataFrame(index=base.index)
        for name in LOG_FEATURES:
            out[name] = np.log1p(base[name].astype(float).clip(lower=0).fillna(0))
        for name in SHARE_FEATURES:
            out[name] = base[name].astype(float).fillna(0)
        total = base["category_total"].to_numpy(dtype=float)
        known = np.zeros(len(base))
        for i, col in enumerate(self.category_columns()[:-1]):
            counts = base[f"category_n{i}"].to_numpy(dtype=float)
            known += counts
            out[col] = _share(counts, total)
        out[CATEGORY_PREFIX + "other"] = _share(total - known, total)
        return out

    def apply(self, base: pd.DataFrame) -> pd.DataFrame:
        """The normalized matrix for rows of BASE_SQL, with this transform's fitted parameters."""
        raw = self.raw_matrix(base)
        for name in LOG_FEATURES:
            raw[name] = raw[name].clip(self.clip_lo[name], self.clip_hi[name])
        center = pd.Series(self.center)[raw.columns]
        scale = pd.Series(self.scale)[raw.columns]
        return (raw - center) / scale

    def summary(self) -> pd.DataFrame:
        rows = []
        for name in self.features:
            rows.append(
                {
                    "feature": name,
                    "log1p": name in LOG_FEATURES,
                    "clip_lo": round(self.clip_lo[name], 4) if name in self.clip_lo else None,
                    "clip_hi": round(self.clip_hi[name], 4) if name in self.clip_hi else None,
                    "center": round(self.center[name], 4),
                    "scale": round(self.scale[name], 4),
                }
            )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return asdict(self)


def _share(part: np.ndarray, total: np.ndarray) -> np.ndarray:
    return np.divide(part, total, out=np.zeros_like(part), where=total > 0)


def fences(values: np.ndarray, method: str, limit: float) -> tuple[float, float]:
    """Outlier fences of one feature, the same rules the cleaning stage flags by."""
    if method == "none" or len(values) == 0:
        return -np.inf, np.inf
    if method == "zscore":
        mid, spread = float(np.mean(values)), float(np.std(values))
    elif method == "iqr":
        q1, q3 = np.quantile(values, [0.25, 0.75])
        lo, hi = q1 - limit * (q3 - q1), q3 + limit * (q3 - q1)
        return (float(lo), float(hi)) if q3 > q1 else (-np.inf, np.inf)
    else:
        mid = float(np.median(values))
        spread = 1.4826 * float(np.median(np.abs(values - mid)))
    if spread == 0:  # a feature most people share one value of (e.g. no orders) is not clipped
        return -np.inf, np.inf
    return mid - limit * spread, mid + limit * spread


def load_base(con: duckdb.DuckDBPyConnection, categories: list[str], where: str = "") -> pd.DataFrame:
    """cleaned_users rows (ordered by person_id) with per-category event counts as plain columns."""
    columns = "".join(
        f",\n  coalesce(category_counts[${i + 1}], 0)::DOUBLE AS category_n{i}" for i in range(len(categories))
    )
    sql = f"{BASE_SQL.format(category_columns=columns)} {where} ORDER BY person_id"
    return con.execute(sql, list(categories)).df()


def top_categories(con: duckdb.DuckDBPyConnection, limit: int, where: str = FITTING) -> list[str]:
    """The categories most people touched (at most `limit`), in a stable order."""
    rows = con.execute(
        f"""SELECT category FROM (SELECT unnest(map_keys(category_counts)) AS category FROM cleaned_users {where})
            GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT {int(limit)}"""
    ).fetchall()
    return sorted(r[0] for r in rows)


def fit(
    base: pd.DataFrame,
    categories: list[str],
    scaling: str = "zscore",
    clip_method: str = "mad",
    clip_limit: float = 3.5,
) -> FeatureTransform:
    """Fit the transform on the rows given: the people fit for modelling, loaded with
    `load_base(con, categories)`."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if clip_method not in CLIP_METHODS:
        raise ValueError(f"clip_method must be one of {CLIP_METHODS}, got {clip_method!r}")
    if len(base) < 2:
        raise ValueError(f"need at least 2 people to fit features on, got {len(base)}")
    transform = FeatureTransform(
        scaling=scaling,
        categories=categories,
        clip_lo={},
        clip_hi={},
        center={},
        scale={},
        fitted_rows=len(base),
        clip_method=clip_method,
        clip_limit=clip_limit,
    )
    raw = transform.raw_matrix(base)
    for name in LOG_FEATURES:
        lo, hi = fences(raw[name].to_numpy(), clip_method, clip_limit)
        transform.clip_lo[name], transform.clip_hi[name] = lo, hi
        raw[name] = raw[name].clip(lo, hi)
    for name in raw.columns:
        values = raw[name].to_numpy()
        if scaling == "zscore":
            center, scale = float(values.mean()), float(values.std())
        else:
            center, scale = float(values.min()), float(values.max() - values.min())
        transform.center[name], transform.scale[name] = center, scale if scale > 0 else 1.0
    transform.features = list(raw.columns)
    return transform


@dataclass(frozen=True)
class FeatureOptions:
    """How cleaned_users becomes the modelling matrix."""

    scaling: Literal["zscore", "minmax"] = setting("zscore", "zscore or minmax, after log1p of counts and money.")
    clip_method: Literal["mad", "iqr", "zscore", "none"] = setting(
        "mad", "Fences the heavy-tailed features are clipped to: mad, iqr, zscore or none."
    )
    clip_limit: float = setting(3.5, "Fence width (the cleaning stage's outlier_limit).", gt=0)
    max_categories: int = setting(20, "Categories kept as own columns; the rest is 'other'.", ge=1)

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.clip_method not in CLIP_METHODS:
            raise ValueError(f"clip_method must be one of {CLIP_METHODS}, got {self.clip_method!r}")
        if self.clip_limit <= 0 or self.max_categories < 1:
            raise ValueError("clip_limit must be positive and max_categories at least 1")

    def matches(self, t: FeatureTransform) -> bool:
        return (t.scaling, t.clip_method, t.clip_limit) == (self.scaling, self.clip_method, self.clip_limit) and len(
            t.categories
        ) <= self.max_categories


FEATURES_KIND = "features"


def empty_matrix() -> pd.DataFrame:
    """normalized_features with no rows (nobody to describe yet), typed as the contract says."""
    columns = {"person_id": "string", "used_for_fitting": "bool", "transform_version": "int64"}
    columns.update({name: "float64" for name in (*LOG_FEATURES, *SHARE_FEATURES)})
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


@dataclass
class FeatureResult(StageResult):
    transform: FeatureTransform | None = None  # None: nothing could be fitted (see status)
    reason: str = ""  # why this transform: fitted now, or the saved one
    without_behaviour: int = 0  # people the table leaves out


def build(
    con: duckdb.DuckDBPyConnection, store: ModelStore, opts: FeatureOptions, refit: bool = False, full: bool = False
) -> FeatureResult:
    """Bring `normalized_features` up to date with the saved transform, fitting (and saving) a new one when needed.

    A new transform is fitted on request, when none is saved yet, or when the settings changed;
    otherwise people are scored with the saved one, as the models trained on it expect.
    Incrementally, only the people cleaning changed are scored again. With fewer than two people
    to fit on (no behaviour in the data, say), nothing is fitted: the table is left empty and
    `status` says why.
    """
    saved = store.latest(FEATURES_KIND)
    changed = {} if saved is None else {"settings changed": not opts.matches(saved.payload)}
    why = retrain_reasons(refit, saved is None, changed, what="transform", verb="refit")
    version = (saved.version + 1 if why else saved.version) if saved else 1
    p = refresh.plan(
        con,
        "features",
        {**asdict(opts), "transform_version": version},
        ("normalized_features",),
        full=full or bool(why),
        full_reason="full rebuild asked for" if full else "transform refitted",
    )
    categories = top_categories(con, opts.max_categories) if why else saved.payload.categories
    base = load_base(con, categories, p.where())
    if why:
        fit_rows = base[~base["exclude_from_fitting"]]
        if len(fit_rows) < MIN_FIT_PEOPLE:
            return _not_fitted(con, p, base, not_fitted_status(base))
        transform = fit(fit_rows, categories, opts.scaling, opts.clip_method, opts.clip_limit)
        transform.version = version
        store.save(FEATURES_KIND, transform, transform.to_dict())
    else:
        transform = saved.payload
    _write(con, p, base, transform)
    total = con.execute("SELECT count(*) FROM normalized_features").fetchall()[0][0]
    return FeatureResult(
        mode=p.mode,
        why=p.reason,
        people=total,
        people_recomputed=None if p.full else len(base),
        counts={"normalized_features": total},
        trained=bool(why),
        transform=transform,
        reason="; ".join(why) or f"scored with saved transform v{saved.version}",
        without_behaviour=_without_behaviour(con),
    )


def _write(con: duckdb.DuckDBPyConnection, p: refresh.Plan, base: pd.DataFrame, transform: FeatureTransform) -> None:
    """The matrix of the people with behaviour in `base`: everyone's swapped in, or the scope's spliced in."""
    rows = base[base["behaviour_events"] > 0]
    ids = pd.DataFrame(
        {
            "person_id": rows["person_id"],
            "used_for_fitting": ~rows["exclude_from_fitting"],
            "transform_version": transform.version,
        }
    )
    frame = pd.concat([ids, transform.apply(rows)], axis=1)
    recorded = lambda: refresh.record(con, p, None, len(base))  # noqa: E731
    if p.full:
        replace_frame(con, "normalized_features", frame, before_commit=recorded)
    else:
        splice_frame(con, "normalized_features", frame, p.scope.has(), before_commit=recorded)


def _without_behaviour(con: duckdb.DuckDBPyConnection) -> int:
    """People the table leaves out: those with no behaviour (counted over everyone, every run)."""
    return con.execute("SELECT count(*) FILTER (WHERE behaviour_events = 0) FROM cleaned_users").fetchall()[0][0]


def not_fitted_status(base: pd.DataFrame) -> str:
    """Why no transform could be fitted, in the data's words."""
    with_behaviour = int((base["behaviour_events"] > 0).sum())
    usable = int((~base["exclude_from_fitting"]).sum())
    if with_behaviour == 0:
        return (
            f"not fitted: 0 of {len(base):,} people have behaviour (track, page or screen events); "
            "features and segments left empty"
        )
    return (
        f"not fitted: {usable} of {len(base):,} people have behaviour that can be fitted on "
        f"(at least {MIN_FIT_PEOPLE} needed; bots and excluded outliers do not count); features and segments left empty"
    )


def _not_fitted(con: duckdb.DuckDBPyConnection, p: refresh.Plan, base: pd.DataFrame, status: str) -> FeatureResult:
    replace_frame(
        con, "normalized_features", empty_matrix(), before_commit=lambda: refresh.record(con, p, None, len(base))
    )
    return FeatureResult(
        mode=p.mode,
        why=p.reason,
        people=0,
        status=status,
        reason="nothing to fit on",
        without_behaviour=int((base["behaviour_events"] == 0).sum()),
    )
