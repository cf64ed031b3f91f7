"""Segmentation: k-means with k and feature space chosen by bootstrap stability (among the ks from
the elbow to the best silhouette), features that move together counted as one, Ward sub-segments, HDBSCAN noise, an autoencoder embedding as
an alternative space, readable names and ids kept across retrains.

Works on the normalized feature matrix (one row per person, pandas/numpy); everything that
scales with people is either a nearest-centroid assignment or fitted on a sample.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import duckdb
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPRegressor

from persona_assets.contracts import SegmentCatalog, Segments
from persona_assets.core import refresh
from persona_assets.core.features import CATEGORY_PREFIX
from persona_assets.core.models import ModelStore
from persona_assets.core.options import setting
from persona_assets.core.stage import StageResult, retrain_reasons
from persona_assets.core.warehouse import replace_frames, splice_frame, table_exists

SPACES = ("auto", "features", "autoencoder")


@dataclass(frozen=True)
class SegmentOptions:
    """Segmentation: k range, sub-segments, noise, embedding and id matching."""

    k_min: int = setting(2, "Smallest k tried.", ge=2)
    k_max: int = setting(10, "Largest k tried.", ge=2)
    scan_sample: int = 20_000
    silhouette_sample: int = 4_000
    stability_tolerance: float = setting(
        0.03, "k and space are chosen among those this close to the most stable under bootstrap resampling.", ge=0
    )
    stability_rounds: int = 4
    redundancy_correlation: float = setting(
        0.75,
        "Features correlated at least this much (in absolute value) count as one in the segment space.",
        ge=0,
        le=1,
    )
    stability_sample: int = 4_000
    minibatch_above: int = setting(100_000, "Use MiniBatchKMeans above this many people.", ge=1)
    sub_k_max: int = setting(4, "Most sub-segments per segment (Ward).", ge=2)
    sub_sample: int = 2_000
    min_subsegment_people: int = 60
    noise_sample: int = 5_000
    noise_min_cluster_size: int = setting(40, "HDBSCAN: smallest dense group (in the sample).", ge=2)
    noise_min_samples: int = 10
    space: Literal["auto", "features", "autoencoder"] = setting(
        "auto", "features, autoencoder, or auto (the more stable under bootstrap resampling)."
    )
    embedding_dim: int = setting(4, "Width of the autoencoder's bottleneck.", ge=1)
    autoencoder_sample: int = 20_000
    match_max_distance: float = setting(
        1.0, "A retrained segment keeps an old id when its profile is this close.", gt=0
    )
    seed: int = setting(0, "Random seed for samples, k-means and the autoencoder.")

    def __post_init__(self) -> None:
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got {self.k_min}..{self.k_max}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.sub_k_max < 2 or self.embedding_dim < 1:
            raise ValueError("sub_k_max must be at least 2 and embedding_dim at least 1")

    def model_settings(self) -> dict:
        """The options a saved model depends on (changing one means retraining)."""
        return {k: v for k, v in asdict(self).items() if k != "match_max_distance"}


@dataclass
class Group:
    """One segment or sub-segment: id, readable name, centroid in the model space, feature profile."""

    id: str
    name: str
    centroid: np.ndarray
    profile: np.ndarray  # mean normalized features of its fitted members (for naming and matching)
    size: int
    explanation: list[dict] = field(default_factory=list)
    parent: str | None = None


@dataclass
class SegmentModel:
    version: int
    feature_version: int
    features: list[str]
    space: str
    encoder: list[tuple[np.ndarray, np.ndarray]] | None
    segments: list[Group]
    subsegments: list[Group]
    noise_points: np.ndarray  # non-noise sample points in model space
    noise_reach: np.ndarray  # each point's core distance: within it, a person is not noise
    curves: pd.DataFrame
    chosen_k: int
    knee: int
    reason: str
    scores: dict[str, float]
    settings: dict
    matching: pd.DataFrame | None = None
    # Each feature's weight in the model space (see `redundancy_weights`); None in models saved before it.
    weights: np.ndarray | None = None
    together: list[list[str]] = field(default_factory=list)


def redundancy_weights(
    X: np.ndarray, features: list[str], min_correlation: float
) -> tuple[np.ndarray, list[list[str]]]:
    """Each feature's weight, so that features which move together count as one.

    Standardized features each add one unit of variance to a distance, so four measures of the
    same thing (order count, revenue, order value, conversion) weigh four times as much as one
    measure of anything else, and k-means splits people along that one thing first: the few who
    buy become a segment of their own, cut out of every behaviour group. Features whose absolute
    correlation reaches `min_correlation` (directly or through a chain) form a group, and each
    member of a group of n is weighted 1/sqrt(n), so the group adds one unit of variance in all.
    Returns the weights and the groups of two or more, by name."""
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.nan_to_num(np.corrcoef(X, rowvar=False)) if X.shape[1] > 1 else np.ones((1, 1))
    linked = np.abs(np.atleast_2d(correlation)) >= min_correlation
    _, group = connected_components(linked, directed=False)
    sizes = np.bincount(group)
    together = [[f for f, g in zip(features, group) if g == j] for j in np.flatnonzero(sizes > 1)]
    return 1 / np.sqrt(sizes[group]), together


def model_space(Xn: np.ndarray, model: SegmentModel) -> np.ndarray:
    """The normalized features as the model sees them: weighted, then encoded when it uses the autoencoder."""
    return encode(Xn if model.weights is None else Xn * model.weights, model.encoder)


def encode(X: np.ndarray, encoder: list[tuple[np.ndarray, np.ndarray]] | None) -> np.ndarray:
    """Map features into the model space (identity, or the autoencoder's bottleneck)."""
    if encoder is None:
        return X
    out = X
    for weights, bias in encoder:
        out = np.tanh(out @ weights + bias)
    return out


def train_autoencoder(X: np.ndarray, opts: SegmentOptions) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """An MLP taught to reproduce its input through a narrow middle layer; returns the encoder half and its R²."""
    rng = np.random.default_rng(opts.seed)
    rows = X[rng.choice(len(X), min(len(X), opts.autoencoder_sample), replace=False)]
    hidden = max(2 * opts.embedding_dim, min(32, X.shape[1]))
    net = MLPRegressor(
        hidden_layer_sizes=(hidden, opts.embedding_dim, hidden),
        activation="tanh",
        max_iter=500,
        early_stopping=len(rows) >= 100,  # its validation split needs people to hold out
        random_state=opts.seed,
    )
    # Not converging within max_iter is reported (as its R²), not raised: the embedding is
    # only used when its clustering beats the raw features on silhouette.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        net.fit(rows, rows)
    encoder = [(net.coefs_[i], net.intercepts_[i]) for i in range(2)]
    return encoder, float(net.score(rows, rows))


def knee(ks: list[int], inertia: list[float]) -> int:
    """The elbow of a falling inertia curve: the k farthest below the chord from first to last point."""
    if len(ks) < 3:
        return ks[0]
    x = (np.asarray(ks) - ks[0]) / (ks[-1] - ks[0])
    y = np.asarray(inertia, dtype=float)
    y = (y - y[-1]) / (y[0] - y[-1]) if y[0] != y[-1] else np.zeros_like(y)
    return ks[int(np.argmax((1 - x) - y))]


def _kmeans(Z: np.ndarray, k: int, opts: SegmentOptions, n_init: int = 4):
    if len(Z) > opts.minibatch_above:
        return MiniBatchKMeans(k, n_init=n_init, batch_size=4096, random_state=opts.seed).fit(Z)
    return KMeans(k, n_init=n_init, random_state=opts.seed).fit(Z)


def scan_k(Z: np.ndarray, opts: SegmentOptions) -> pd.DataFrame:
    """Inertia (per person) and silhouette for each k, on samples."""
    rng = np.random.default_rng(opts.seed)
    rows = Z[rng.choice(len(Z), min(len(Z), opts.scan_sample), replace=False)]
    probe = rng.choice(len(rows), min(len(rows), opts.silhouette_sample), replace=False)
    out = []
    for k in range(opts.k_min, min(opts.k_max, len(rows) - 1) + 1):
        km = _kmeans(rows, k, opts)
        labels = km.labels_[probe]
        sil = silhouette_score(rows[probe], labels) if len(set(labels)) > 1 else -1.0
        out.append({"k": k, "inertia": km.inertia_ / len(rows), "silhouette": float(sil)})
    return pd.DataFrame(out)


def stability(Z: np.ndarray, k: int, opts: SegmentOptions) -> float:
    """How well k-means with this k reproduces itself: the mean adjusted Rand index between the
    labels two fits on independent bootstrap samples give the same probe people.

    A k that matches real structure finds the same groups from any sample (near 1); a k that
    cuts a blob where the cut happens to fall, or splits a group in two, does not. The index
    needs no distances, so candidates from different spaces are scored on one scale."""
    rng = np.random.default_rng(opts.seed)
    probe = Z[rng.choice(len(Z), min(len(Z), opts.silhouette_sample), replace=False)]
    size = min(len(Z), opts.stability_sample)
    agreement = []
    for r in range(opts.stability_rounds):
        with warnings.catch_warnings():  # a resample of a small population may hold fewer distinct rows than k
            warnings.simplefilter("ignore", ConvergenceWarning)
            a, b = (
                KMeans(k, n_init=3, random_state=opts.seed + 2 * r + i).fit(Z[rng.choice(len(Z), size, replace=True)])
                for i in range(2)
            )
        agreement.append(adjusted_rand_score(a.predict(probe), b.predict(probe)))
    return float(np.mean(agreement))


@dataclass(frozen=True)
class Candidate:
    space: str
    k: int
    stability: float
    reason: str


def pick_k(candidates: list[Candidate], tolerance: float) -> Candidate:
    """Within one space: the largest k as stable as the most stable one (within `tolerance`).
    A k that splits a real group, or cuts a blob, reproduces itself worse; merging two real
    groups stays stable, so of the equally stable the largest is the one that merged none.
    k = 2 stands only when nothing larger is near as stable (any data splits in two the same way)."""
    best = max(c.stability for c in candidates)
    near = [c for c in candidates if c.stability >= best - tolerance]
    return max(near, key=lambda c: c.k)


def pick_space(picks: list[Candidate], tolerance: float) -> Candidate:
    """Across spaces (one pick each): the most stable; within `tolerance`, the fewest segments, then the
    raw feature space (the simpler model)."""
    best = max(c.stability for c in picks)
    near = [c for c in picks if c.stability >= best - tolerance]
    return min(near, key=lambda c: (c.k, c.space != "features"))


# Readable words for a feature far above (+) or below (-) the average.
PHRASES = {
    ("total_revenue", 1): "High-Value",
    ("total_revenue", -1): "Low-Spend",
    ("avg_order_value", 1): "Big-Basket",
    ("order_count", 1): "Frequent Buyers",
    ("order_count", -1): "Non-Buyers",
    ("conversion_rate", 1): "Converters",
    ("conversion_rate", -1): "Browsers",
    ("session_count", 1): "Regulars",
    ("session_count", -1): "Occasional",
    ("sessions_per_week", 1): "Habitual",
    ("events_per_session", 1): "Deep Browsers",
    ("events_per_session", -1): "Quick Visitors",
    ("avg_session_seconds", 1): "Long Sessions",
    ("avg_session_seconds", -1): "Short Sessions",
    ("event_count", 1): "Highly Active",
    ("event_count", -1): "Light Users",
    ("mobile_share", 1): "Mobile-First",
    ("desktop_share", 1): "Desktop",
    ("tablet_share", 1): "Tablet",
    ("night_share", 1): "Night Owls",
    ("morning_share", 1): "Morning",
    ("afternoon_share", 1): "Afternoon",
    ("evening_share", 1): "Evening",
}


def _phrase(feature: str, sign: int) -> str | None:
    if feature.startswith(CATEGORY_PREFIX):
        category = feature[len(CATEGORY_PREFIX) :]
        return f"{category.replace('_', ' ').title()} Fans" if sign > 0 and category != "other" else None
    return PHRASES.get((feature, sign))


def describe(
    profile: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    features: list[str],
    taken: set[str],
    words: int = 2,
    fallback: str = "Average",
) -> tuple[str, list[dict]]:
    """A name from the features farthest from the reference, and the explanation rows behind it."""
    diff = (profile - mean) / np.where(std > 0, std, 1.0)
    order = np.argsort(-np.abs(diff))
    explanation = [
        {"feature": features[i], "difference_in_sd": round(float(diff[i]), 2)} for i in order[:5] if abs(diff[i]) > 0
    ]
    phrases = [p for i in order if abs(diff[i]) >= 0.25 and (p := _phrase(features[i], int(np.sign(diff[i]))))]
    phrases = list(dict.fromkeys(phrases)) or [fallback]
    for n in range(words, len(phrases) + 1):
        name = " · ".join(phrases[:n])
        if name not in taken:
            return name, explanation
    name, suffix = " · ".join(phrases[:words]), 2
    while f"{name} ({suffix})" in taken:
        suffix += 1
    return f"{name} ({suffix})", explanation


SUBSEGMENT_STICKINESS = 0.05  # silhouette a new sub-split must gain over the previous one to replace it


def _subsegments(
    X: np.ndarray, parent: Group, opts: SegmentOptions, features: list[str], previous: list[Group] = ()
) -> list[Group]:
    """Ward clusters within one segment, on a sample; the sub-k with the best silhouette wins.

    Always in the normalized feature space (whichever space the segments use), so a
    retrain that changes the autoencoder leaves the sub-segments of a segment alone.

    The sample is the people whose feature rows hash lowest, not a random draw: a retrain of
    an unchanged segment samples the same people and so finds the same sub-segments."""
    row_hashes = pd.util.hash_pandas_object(pd.DataFrame(X), index=False).to_numpy()
    idx = np.sort(np.argsort(row_hashes, kind="stable")[: opts.sub_sample])
    xs = X[idx]
    best_labels, best_sil = np.zeros(len(xs), dtype=int), -1.0
    if len(xs) >= 2 * opts.min_subsegment_people:
        for k in range(2, opts.sub_k_max + 1):
            labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(xs)
            if np.bincount(labels).min() < opts.min_subsegment_people * len(xs) / len(X):
                continue
            sil = silhouette_score(xs, labels)
            if sil > best_sil:
                best_labels, best_sil = labels, sil
        if len(previous) >= 2:
            # A retrain keeps the segment's previous sub-segments (people to their nearest old
            # centroid) unless a new split is clearly better: sub-segments should not churn
            # because a few people moved between segments.
            old = np.stack([g.centroid for g in previous])
            kept_labels = np.linalg.norm(xs[:, None, :] - old[None], axis=2).argmin(axis=1)
            if len(np.unique(kept_labels)) >= 2:
                kept_sil = silhouette_score(xs, kept_labels)
                if kept_sil >= best_sil - SUBSEGMENT_STICKINESS:
                    best_labels, best_sil = np.unique(kept_labels, return_inverse=True)[1], kept_sil
    mean, std = xs.mean(axis=0), xs.std(axis=0)
    groups, taken = [], set()
    for j in range(best_labels.max() + 1):
        members = best_labels == j
        profile = xs[members].mean(axis=0)
        # Named against the parent segment: what sets this part apart within it ("Core" if nothing).
        name, explanation = describe(profile, mean, std, features, taken, words=1, fallback="Core")
        taken.add(name)
        groups.append(
            Group(
                id=f"{parent.id}.{j + 1}",
                name=name,
                centroid=profile,
                profile=profile,
                size=int(round(members.sum() * len(X) / len(xs))),
                explanation=explanation,
                parent=parent.id,
            )
        )
    return groups


def _noise_reference(Z: np.ndarray, opts: SegmentOptions) -> tuple[np.ndarray, np.ndarray]:
    """HDBSCAN on a sample: the points in dense groups, each with its core distance."""
    rng = np.random.default_rng(opts.seed)
    rows = Z[rng.choice(len(Z), min(len(Z), opts.noise_sample), replace=False)]
    labels = HDBSCAN(
        min_cluster_size=min(opts.noise_min_cluster_size, max(2, len(rows) // 10)),
        min_samples=min(opts.noise_min_samples, len(rows) - 1),
        copy=True,
    ).fit_predict(rows)
    dense = rows[labels >= 0]
    if len(dense) <= opts.noise_min_samples:
        return rows, np.full(len(rows), np.inf)
    dist, _ = NearestNeighbors(n_neighbors=opts.noise_min_samples + 1).fit(rows).kneighbors(dense)
    return dense, dist[:, -1]


def is_noise(Z: np.ndarray, model: SegmentModel) -> np.ndarray:
    """A person is noise when no dense sample point reaches them within its core distance."""
    dist, idx = NearestNeighbors(n_neighbors=1).fit(model.noise_points).kneighbors(Z)
    return dist[:, 0] > model.noise_reach[idx[:, 0]]


def _match(previous: list[Group], current: list[Group], max_distance: float) -> tuple[dict[int, str], pd.DataFrame]:
    """Hungarian matching of new groups to old ones by profile distance; close pairs keep the old id."""
    if not previous:
        return {}, pd.DataFrame()
    cost = np.linalg.norm(
        np.stack([g.profile for g in current])[:, None, :] - np.stack([g.profile for g in previous])[None], axis=2
    )
    rows, cols = linear_sum_assignment(cost)
    kept, report = {}, []
    for r, c in zip(rows, cols):
        ok = cost[r, c] <= max_distance
        if ok:
            kept[r] = previous[c].id
        report.append(
            {
                "new": r,
                "previous_id": previous[c].id,
                "distance": round(float(cost[r, c]), 3),
                "kept_id": ok,
            }
        )
    return kept, pd.DataFrame(report)


def _numbered(kept: dict[int, str], count: int, previous_ids: list[str], prefix: str) -> list[str]:
    used = [int(i.split(".")[-1][len(prefix) :] if prefix else i.split(".")[-1]) for i in previous_ids]
    next_no = max(used, default=0) + 1
    ids = []
    for j in range(count):
        if j in kept:
            ids.append(kept[j])
        else:
            ids.append(f"{prefix}{next_no}")
            next_no += 1
    return ids


def distinct_rows(X: np.ndarray) -> int:
    return len(np.unique(np.round(X, 9), axis=0)) if len(X) else 0


def min_people(opts: SegmentOptions) -> int:
    return max(10, opts.k_min + 1)


def untrainable(X: np.ndarray, opts: SegmentOptions) -> str | None:
    """Why no segment model can be fitted on these rows, or None when one can."""
    if len(X) < min_people(opts):
        return (
            f"{len(X):,} people with behaviour to fit on; segmentation needs at least {min_people(opts)} "
            f"(k_min {opts.k_min})"
        )
    if distinct_rows(X) <= opts.k_min:
        return (
            f"people's behaviour is too alike to segment: {distinct_rows(X)} different behaviour profiles among "
            f"{len(X):,} people, k_min is {opts.k_min}"
        )
    return None


def _candidates(space: str, Z: np.ndarray, curve: pd.DataFrame) -> list[int]:
    """A space's proposals: every k from the elbow of the inertia curve to the best silhouette."""
    elbow = knee(curve["k"].tolist(), curve["inertia"].tolist())
    best = int(curve.loc[curve["silhouette"].idxmax(), "k"])
    return list(range(min(elbow, best), max(elbow, best) + 1))


def _pick_reason(chosen: Candidate, picks: list[Candidate], together: list[list[str]], min_correlation: float) -> str:
    other = ", ".join(f"{c.space} space k={c.k} ({c.stability:.2f})" for c in picks if c != chosen)
    groups = "; ".join(" + ".join(g) for g in together)
    return (
        f"{chosen.space} space, k={chosen.k}: stability under bootstrap resampling {chosen.stability:.2f} "
        f"(adjusted Rand index between k-means fits on two samples); {chosen.reason}, the largest as stable "
        f"as the best{'; other space: ' + other if other else ''}"
        f"{f'; counted as one (correlated {min_correlation:g} or more): {groups}' if groups else ''}"
    )


@dataclass
class _Choice:
    """Which space and k a model is trained with, and the figures that chose them."""

    spaces: dict[str, tuple[np.ndarray, object]]
    curves: list[pd.DataFrame]
    chosen: Candidate
    elbow: int
    reason: str
    scores: dict[str, float]


def _choose(Xn: np.ndarray, opts: SegmentOptions, together: list[list[str]]) -> _Choice:
    """Each space proposes every k from its elbow to its best silhouette; the most stable under
    bootstrap resampling wins (see `pick_k`, `pick_space`). `Xn` is already weighted."""
    spaces: dict[str, tuple[np.ndarray, object]] = {"features": (Xn, None)} if opts.space != "autoencoder" else {}
    scores: dict[str, float] = {}
    if opts.space in ("auto", "autoencoder"):
        encoder, r2 = train_autoencoder(Xn, opts)
        spaces["autoencoder"] = (encode(Xn, encoder), encoder)
        scores["autoencoder_reconstruction_r2"] = round(r2, 3)
    curves, candidates, elbows = [], [], {}
    for name, (Z, _) in spaces.items():
        if opts.space not in ("auto", name):
            continue
        curve = scan_k(Z, opts).assign(space=name)
        curves.append(curve)
        elbows[name] = knee(curve["k"].tolist(), curve["inertia"].tolist())
        ks = _candidates(name, Z, curve)
        tried = f"k={ks[0]}..{ks[-1]} tried, from the elbow (k={elbows[name]}) to the best silhouette"
        proposals = [Candidate(name, k, stability(Z, k, opts), tried) for k in ks]
        best = pick_k(proposals, opts.stability_tolerance)
        scores[f"silhouette_{name}"] = round(float(curve.set_index("k").loc[best.k, "silhouette"]), 3)
        scores[f"stability_{name}"] = round(best.stability, 3)
        candidates.append(best)
    chosen = pick_space(candidates, opts.stability_tolerance)
    reason = _pick_reason(chosen, candidates, together, opts.redundancy_correlation)
    return _Choice(spaces, curves, chosen, elbows[chosen.space], reason, scores)


def _name_segments(
    segments: list[Group], previous: SegmentModel | None, Xn: np.ndarray, features: list[str], opts: SegmentOptions
) -> pd.DataFrame:
    """Give each segment its id (an old one where its profile matched) and a readable name;
    returns how the old segments were matched."""
    kept, matching = _match(previous.segments if previous else [], segments, opts.match_max_distance)
    ids = _numbered(kept, len(segments), [g.id for g in previous.segments] if previous else [], "S")
    mean, std = Xn.mean(axis=0), Xn.std(axis=0)
    taken: set[str] = set()
    for j in sorted(range(len(segments)), key=lambda j: -segments[j].size):
        segments[j].id = ids[j]
        segments[j].name, segments[j].explanation = describe(segments[j].profile, mean, std, features, taken)
        taken.add(segments[j].name)
    if len(matching):
        matching["new"] = [f"{segments[r].id} {segments[r].name}" for r in matching["new"]]
    return matching


def _all_subsegments(
    segments: list[Group],
    labels: np.ndarray,
    Xn: np.ndarray,
    previous: SegmentModel | None,
    features: list[str],
    opts: SegmentOptions,
) -> list[Group]:
    """Each segment's sub-segments (Ward), keeping old ids where their profiles matched."""
    subsegments: list[Group] = []
    for j, seg in enumerate(segments):
        old = [g for g in (previous.subsegments if previous else []) if g.parent == seg.id]
        subs = _subsegments(Xn[labels == j], seg, opts, features, old)
        sub_kept, _ = _match(old, subs, opts.match_max_distance)
        for sub, sub_id in zip(subs, _numbered(sub_kept, len(subs), [g.id for g in old], "")):
            sub.id = sub_id if "." in sub_id else f"{seg.id}.{sub_id}"
        subsegments.extend(subs)
    return subsegments


def train(
    X: pd.DataFrame, opts: SegmentOptions, feature_version: int, version: int, previous: SegmentModel | None = None
) -> SegmentModel:
    """Fit a segment model on the fit rows of the normalized matrix."""
    features = list(X.columns)
    Xn = X.to_numpy(dtype=float)
    problem = untrainable(Xn, opts)
    if problem:
        raise ValueError(problem)
    settings = opts.model_settings()
    # k cannot exceed the number of different behaviour profiles (a small or uniform population).
    opts = replace(opts, k_max=min(opts.k_max, distinct_rows(Xn) - 1))
    weights, together = redundancy_weights(Xn, features, opts.redundancy_correlation)
    choice = _choose(Xn * weights, opts, together)
    space, k = choice.chosen.space, choice.chosen.k
    Z, encoder = choice.spaces[space]
    km = _kmeans(Z, k, opts, n_init=10)
    labels = km.labels_
    segments = [
        Group(
            id="",
            name="",
            centroid=km.cluster_centers_[j],
            profile=Xn[labels == j].mean(axis=0),
            size=int((labels == j).sum()),
        )
        for j in range(k)
    ]
    # Profiles are comparable only over the same features (a new category means new ids).
    if previous is not None and previous.features != features:
        previous = None
    matching = _name_segments(segments, previous, Xn, features, opts)
    subsegments = _all_subsegments(segments, labels, Xn, previous, features, opts)
    points, reach = _noise_reference(Z, opts)
    return SegmentModel(
        version=version,
        feature_version=feature_version,
        features=features,
        space=space,
        encoder=encoder,
        segments=segments,
        subsegments=subsegments,
        noise_points=points,
        noise_reach=reach,
        curves=pd.concat(choice.curves, ignore_index=True),
        chosen_k=k,
        knee=choice.elbow,
        reason=choice.reason,
        scores=choice.scores,
        settings=settings,
        matching=matching,
        weights=weights,
        together=together,
    )


SEGMENT_COLUMNS = (
    "segment_id",
    "segment_name",
    "segment_distance",
    "segment_confidence",
    "subsegment_id",
    "subsegment_name",
    "is_noise",
)


def assign(model: SegmentModel, X: pd.DataFrame) -> pd.DataFrame:
    """Segment, sub-segment and noise for every row by nearest centroid in the model's space."""
    Xn = X[model.features].to_numpy(dtype=float)
    Z = model_space(Xn, model)
    centroids = np.stack([g.centroid for g in model.segments])
    dist = euclidean_distances(Z, centroids)
    order = np.argsort(dist, axis=1)
    nearest = order[:, 0]
    d1 = dist[np.arange(len(Z)), nearest]
    d2 = dist[np.arange(len(Z)), order[:, 1]] if len(centroids) > 1 else d1
    out = pd.DataFrame(
        {
            "segment_id": [model.segments[j].id for j in nearest],
            "segment_name": [model.segments[j].name for j in nearest],
            "segment_distance": d1,
            # 0 on the border between two segments, near 1 at a centroid.
            "segment_confidence": np.where(d2 > 0, 1 - d1 / np.where(d2 > 0, d2, 1), 1.0),
        },
        index=X.index,
    )
    out["subsegment_id"] = None
    out["subsegment_name"] = None
    for j, seg in enumerate(model.segments):
        subs = [g for g in model.subsegments if g.parent == seg.id]
        rows = np.flatnonzero(nearest == j)
        if not len(rows) or not subs:
            continue
        # Sub-segment centroids live in the feature space (see _subsegments).
        sub_dist = euclidean_distances(Xn[rows], np.stack([g.centroid for g in subs]))
        pick = sub_dist.argmin(axis=1)
        out.iloc[rows, out.columns.get_loc("subsegment_id")] = [subs[p].id for p in pick]
        out.iloc[rows, out.columns.get_loc("subsegment_name")] = [subs[p].name for p in pick]
    out["is_noise"] = is_noise(Z, model)
    return out


def catalog(model: SegmentModel, people: pd.DataFrame) -> pd.DataFrame:
    """One row per segment and sub-segment: name, size now, share, and why (top features vs average)."""
    total = max(len(people), 1)
    rows = []
    for level, groups, key in (
        ("segment", model.segments, "segment_id"),
        ("subsegment", model.subsegments, "subsegment_id"),
    ):
        counts = people[key].value_counts()
        for g in groups:
            rows.append(
                {
                    "level": level,
                    "id": g.id,
                    "parent_id": g.parent,
                    "name": g.name,
                    "people": int(counts.get(g.id, 0)),
                    "share": round(int(counts.get(g.id, 0)) / total, 4),
                    "explanation": "; ".join(
                        f"{e['feature']} {'+' if e['difference_in_sd'] > 0 else ''}{e['difference_in_sd']} sd"
                        for e in g.explanation
                    ),
                }
            )
    return pd.DataFrame(rows)


SEGMENTS_KIND = "segments"


def _matrix(con: duckdb.DuckDBPyConnection, scope: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The normalized matrix of the people with behaviour (or those of them `scope` names), and
    their flags (person_id, used_for_fitting), in person_id order."""
    table = con.execute(
        f"SELECT * FROM normalized_features {'WHERE ' + scope if scope else ''} ORDER BY person_id"
    ).df()
    return table, table[["person_id", "used_for_fitting"]].astype({"used_for_fitting": bool})


def unsegmented(person_ids) -> pd.DataFrame:
    """Rows for people with no segment (no behaviour to place them by, or no model)."""
    n = len(person_ids)
    return pd.DataFrame(
        {
            "person_id": pd.Series(person_ids, dtype=object),
            **{c: pd.Series([None] * n, dtype=object) for c in ("segment_id", "segment_name")},
            "segment_distance": np.full(n, np.nan),
            "segment_confidence": np.zeros(n),
            **{c: pd.Series([None] * n, dtype=object) for c in ("subsegment_id", "subsegment_name")},
            "is_noise": np.zeros(n, dtype=bool),
            "low_confidence": np.ones(n, dtype=bool),
            "model_version": pd.Series([None] * n, dtype="Int64"),
        }
    )


@dataclass
class SegmentResult(StageResult):
    model: SegmentModel | None = None  # None: no model could be fitted (see status)
    catalog: pd.DataFrame = field(default_factory=pd.DataFrame)
    moved_share: float | None = None  # share of people re-assigned who changed segment
    noise_share: float = 0.0
    low_confidence: int = 0
    unsegmented: int = 0  # people without a segment (no behaviour)


def build(
    con: duckdb.DuckDBPyConnection, store: ModelStore, opts: SegmentOptions, retrain: bool = False, full: bool = False
) -> SegmentResult:
    """Assign segments with the saved model, training (and saving) a new one when needed.

    Everyone cleaning kept gets a row: people with behaviour their nearest segment, people with
    none (identify calls only) an empty segment. When no model can be fitted (nobody with
    behaviour, too few people, everyone alike) every segment is left empty and `status` says why.
    Incrementally, only the people whose features changed are assigned again; the catalog's
    sizes are then counted over everyone.
    """
    version = con.execute("SELECT max(transform_version) FROM normalized_features").fetchall()[0][0]
    saved = store.latest(SEGMENTS_KIND)
    previous: SegmentModel | None = saved.payload if saved else None
    changed = (
        {}
        if previous is None
        else {
            "features were refitted": previous.feature_version != version,
            "segmentation settings changed": previous.settings != opts.model_settings(),
        }
    )
    why = retrain_reasons(retrain, previous is None, changed)
    model_version = (saved.version if saved else 0) + 1 if why else saved.version
    p = refresh.plan(
        con,
        "segments",
        {**opts.model_settings(), "model_version": model_version},
        ("segments", "segment_catalog"),
        full=full or bool(why),
        full_reason="full rebuild asked for" if full else "model retrained",
    )
    scope = "" if p.full else p.scope.has()
    everyone = con.execute(
        f"SELECT person_id FROM cleaned_users {'WHERE ' + scope if scope else ''} ORDER BY person_id"
    ).fetchall()
    matrix, flags = _matrix(con, scope) if version is not None else (pd.DataFrame(), pd.DataFrame())
    model, status = (None, None) if why else (previous, None)
    if version is None:
        status = "not fitted: no behaviour features to segment by (see normalized_features); segments left empty"
    elif why:
        model, status = _fit(store, matrix, flags, opts, version, model_version, previous)
    assigned = _assign_everyone(model, matrix, flags, [r[0] for r in everyone])
    moved = _moved_share(con, assigned, scope)
    _write(con, p, model, assigned)
    return _result(con, p, model, status, why, moved, len(assigned))


def _fit(
    store: ModelStore,
    matrix: pd.DataFrame,
    flags: pd.DataFrame,
    opts: SegmentOptions,
    version: int,
    model_version: int,
    previous: SegmentModel | None,
) -> tuple[SegmentModel | None, str | None]:
    """Train and save a model on the people fitted on, or say why none can be."""
    fit_rows = matrix.loc[flags["used_for_fitting"].to_numpy(), _feature_columns(matrix)]
    problem = untrainable(fit_rows.to_numpy(dtype=float), opts)
    if problem:
        return None, f"not fitted: {problem}; segments left empty"
    model = train(fit_rows, opts, version, model_version, previous)
    store.save(SEGMENTS_KIND, model, summary(model))
    return model, None


def _write(con: duckdb.DuckDBPyConnection, p: refresh.Plan, model: SegmentModel | None, assigned: pd.DataFrame) -> None:
    """Everyone's assignments and the catalog swapped in, or the scope's spliced in and the
    catalog's sizes counted again over everyone."""

    def finish() -> None:
        counts = con.execute("SELECT segment_id, subsegment_id FROM segments").df()
        groups = catalog(model, counts).assign(model_version=model.version) if model else empty_catalog()
        con.register("_catalog_frame", groups)
        con.execute("DELETE FROM segment_catalog")
        con.execute("INSERT INTO segment_catalog BY NAME SELECT * FROM _catalog_frame")
        con.unregister("_catalog_frame")
        refresh.record(con, p, None, len(assigned))

    if p.full:
        groups = catalog(model, assigned).assign(model_version=model.version) if model else empty_catalog()
        replace_frames(
            con,
            [(Segments, "segments", assigned), (SegmentCatalog, "segment_catalog", groups)],
            before_commit=lambda: refresh.record(con, p, None, len(assigned)),
        )
    else:
        splice_frame(con, "segments", assigned, p.scope.has(), before_commit=finish)


def _result(
    con: duckdb.DuckDBPyConnection,
    p: refresh.Plan,
    model: SegmentModel | None,
    status: str | None,
    why: list[str],
    moved: float | None,
    assigned: int,
) -> SegmentResult:
    people, noise, low, unsegmented = con.execute(
        "SELECT count(*), coalesce(avg(is_noise::INT), 0), count(*) FILTER (WHERE low_confidence), "
        "count(*) FILTER (WHERE segment_id IS NULL) FROM segments"
    ).fetchall()[0]
    return SegmentResult(
        mode=p.mode,
        why="; ".join(why) or f"assigned with saved model v{model.version}",
        people=people,
        people_recomputed=None if p.full else assigned,
        counts={"segments": people},
        status=status or "fitted",
        trained=bool(why) and model is not None,
        model=model,
        moved_share=moved,
        catalog=con.execute("SELECT * FROM segment_catalog").df(),
        noise_share=float(noise),
        low_confidence=int(low),
        unsegmented=int(unsegmented),
    )


def _feature_columns(matrix: pd.DataFrame) -> list[str]:
    return [c for c in matrix.columns if c not in ("person_id", "used_for_fitting", "transform_version")]


def _assign_everyone(
    model: SegmentModel | None, matrix: pd.DataFrame, flags: pd.DataFrame, person_ids: list[str]
) -> pd.DataFrame:
    """Segment rows for `person_ids`: the model's assignment for those with features, empty ones for the rest."""
    if model is None or not len(matrix):
        return unsegmented(person_ids)
    assigned = assign(model, matrix)
    assigned.insert(0, "person_id", flags["person_id"].to_numpy())
    assigned["low_confidence"] = ~flags["used_for_fitting"].to_numpy(dtype=bool)
    assigned["model_version"] = model.version
    rest = sorted(set(person_ids) - set(flags["person_id"]))
    if not rest:
        return assigned.reset_index(drop=True)
    return pd.concat([assigned, unsegmented(rest)], ignore_index=True)


def _moved_share(con: duckdb.DuckDBPyConnection, assigned: pd.DataFrame, scope: str) -> float | None:
    """The share of people (in scope) whose segment changed."""
    if not table_exists(con, "segments"):
        return None
    before = con.execute(
        f"SELECT person_id, segment_id AS before FROM segments {'WHERE ' + scope if scope else ''}"
    ).df()
    both = assigned[["person_id", "segment_id"]].merge(before, on="person_id")
    if not len(both):
        return None
    return float((both["segment_id"].fillna("") != both["before"].fillna("")).mean())


def empty_catalog() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "level": pd.Series(dtype=object),
            "id": pd.Series(dtype=object),
            "parent_id": pd.Series(dtype=object),
            "name": pd.Series(dtype=object),
            "people": pd.Series(dtype="int64"),
            "share": pd.Series(dtype="float64"),
            "explanation": pd.Series(dtype=object),
            "model_version": pd.Series(dtype="int64"),
        }
    )


def summary(model: SegmentModel) -> dict:
    return {
        "version": model.version,
        "feature_version": model.feature_version,
        "space": model.space,
        "chosen_k": model.chosen_k,
        "knee": model.knee,
        "reason": model.reason,
        "scores": model.scores,
        "counted_together": model.together,
        "segments": [{"id": g.id, "name": g.name, "size": g.size} for g in model.segments],
        "subsegments": [{"id": g.id, "name": g.name, "size": g.size} for g in model.subsegments],
        "settings": model.settings,
    }


def curves_png(model: SegmentModel) -> bytes:
    """Inertia and silhouette by k for each feature space, the chosen k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    for space, curve in model.curves.groupby("space"):
        axes[0].plot(curve["k"], curve["inertia"] / curve["inertia"].iloc[0], marker="o", label=space)
        axes[1].plot(curve["k"], curve["silhouette"], marker="o", label=space)
    for ax, title in zip(axes, ("inertia (relative to smallest k)", "silhouette (sample)")):
        ax.axvline(model.chosen_k, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("k")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
