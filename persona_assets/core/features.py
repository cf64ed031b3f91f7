"""normalized_features: the modelling matrix — log1p on heavy tails, clipping at robust fences, then scaling.

The fitted parameters form a `FeatureTransform`, saved with a version so people who arrive
later are scored with exactly the transform the segment and trait models were trained on.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import duckdb
import numpy as np
import pandas as pd

from persona_assets.core.models import ModelStore
from persona_assets.core.warehouse import replace_frame

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
SELECT person_id, is_sparse, exclude_from_fitting,
  event_count::DOUBLE AS event_count, session_count::DOUBLE AS session_count,
  coalesce(avg_session_seconds, 0) AS avg_session_seconds,
  event_count / greatest(session_count, 1) AS events_per_session,
  sessions_per_week, order_count::DOUBLE AS order_count, total_revenue,
  coalesce(avg_order_value, 0) AS avg_order_value,
  order_count / greatest(session_count, 1) AS conversion_rate,
  mobile_share, desktop_share, tablet_share, night_share, morning_share, afternoon_share, evening_share,
  category_counts
FROM cleaned_users
"""


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
        shares = category_shares(base["category_counts"], self.categories)
        for col, values in zip(self.category_columns(), shares.T):
            out[col] = values
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


def category_shares(counts: pd.Series, categories: list[str]) -> np.ndarray:
    """Each person's share of category events, one column per known category plus "other"."""
    index = {c: i for i, c in enumerate(categories)}
    out = np.zeros((len(counts), len(categories) + 1))
    for row, mapping in enumerate(counts):
        for key, n in _entries(mapping):
            out[row, index.get(key, len(categories))] += n
    totals = out.sum(axis=1, keepdims=True)
    return np.divide(out, totals, out=np.zeros_like(out), where=totals > 0)


def _entries(mapping) -> list[tuple[str, float]]:
    """(category, count) pairs of a MAP value as DuckDB hands it to pandas (a dict, or missing)."""
    return list(mapping.items()) if isinstance(mapping, dict) else []


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


def load_base(con: duckdb.DuckDBPyConnection, where: str = "") -> pd.DataFrame:
    return con.execute(f"{BASE_SQL} {where} ORDER BY person_id").df()


def top_categories(base: pd.DataFrame, limit: int) -> list[str]:
    """The categories most people touched (at most `limit`), in a stable order."""
    seen: dict[str, int] = {}
    for mapping in base["category_counts"]:
        for key, _ in _entries(mapping):
            seen[key] = seen.get(key, 0) + 1
    ranked = sorted(seen, key=lambda k: (-seen[k], k))[:limit]
    return sorted(ranked)


def fit(
    base: pd.DataFrame,
    scaling: str = "zscore",
    clip_method: str = "mad",
    clip_limit: float = 3.5,
    max_categories: int = 20,
) -> FeatureTransform:
    """Fit the transform on the rows given (callers pass the people fit for modelling)."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if clip_method not in CLIP_METHODS:
        raise ValueError(f"clip_method must be one of {CLIP_METHODS}, got {clip_method!r}")
    if len(base) < 2:
        raise ValueError(f"need at least 2 people to fit features on, got {len(base)}")
    transform = FeatureTransform(
        scaling=scaling,
        categories=top_categories(base, max_categories),
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
    scaling: str = "zscore"
    clip_method: str = "mad"
    clip_limit: float = 3.5
    max_categories: int = 20

    def matches(self, t: FeatureTransform) -> bool:
        return (t.scaling, t.clip_method, t.clip_limit) == (self.scaling, self.clip_method, self.clip_limit) and len(
            t.categories
        ) <= self.max_categories


FEATURES_KIND = "features"


def build(con: duckdb.DuckDBPyConnection, store: ModelStore, opts: FeatureOptions, refit: bool = False) -> dict:
    """Rebuild `normalized_features` with the saved transform, fitting (and saving) a new one when needed.

    A new transform is fitted on request, when none is saved yet, or when the settings changed;
    otherwise new people are scored with the saved one, as the models trained on it expect.
    """
    base = load_base(con)
    fit_rows = base[~base["is_sparse"] & ~base["exclude_from_fitting"]]
    saved = store.latest(FEATURES_KIND)
    if refit or saved is None or not opts.matches(saved.payload):
        reason = "refit on request" if refit else "no saved transform" if saved is None else "settings changed"
        transform = fit(fit_rows, opts.scaling, opts.clip_method, opts.clip_limit, opts.max_categories)
        transform.version = (saved.version if saved else 0) + 1
        store.save(FEATURES_KIND, transform, transform.to_dict())
    else:
        reason, transform = f"scored with saved transform v{saved.version}", saved.payload
    rows = base[~base["is_sparse"]]
    matrix = transform.apply(rows)
    frame = pd.concat(
        [
            pd.DataFrame(
                {
                    "person_id": rows["person_id"],
                    "used_for_fitting": ~rows["exclude_from_fitting"],
                    "transform_version": transform.version,
                }
            ),
            matrix,
        ],
        axis=1,
    )
    replace_frame(con, "normalized_features", frame)
    return {"transform": transform, "reason": reason, "rows": len(frame), "fitted_rows": len(fit_rows),
            "sparse_people": int(base["is_sparse"].sum())}  # fmt: skip
