"""Every tunable of Persona as typed Dagster config, with defaults the launchpad shows."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator, model_validator

from persona_assets.core.affinity import AffinityOptions
from persona_assets.core.cleaning import MISSING_ATTRIBUTES, CleaningOptions
from persona_assets.core.features import FeatureOptions
from persona_assets.core.identity import IdentityOptions
from persona_assets.core.imputation import ImputationOptions
from persona_assets.core.ingest import IngestOptions
from persona_assets.core.segments import SegmentOptions

HOME_ENV = "PERSONA_HOME"


def persona_home() -> Path:
    """PERSONA_HOME (default ./data), absolute."""
    return Path(os.environ.get(HOME_ENV, "data")).expanduser().resolve()


class PersonaConfig(dg.Config):
    """A stage's settings, checked as a whole when a run starts: each stage's options refuse
    values they cannot use (unknown choices, min above max, empty subsets) with an error naming
    the setting, before any data is touched."""

    @model_validator(mode="after")
    def _usable(self):
        self.options()  # raises ValueError naming the setting and what it may be
        return self

    def options(self):  # pragma: no cover - every stage's config defines it
        raise NotImplementedError


class IngestConfig(PersonaConfig):
    """How landing files become `raw_events`."""

    min_event_at: str = Field(default="2000-01-01", description="Events stamped before this ISO date are quarantined.")
    max_future_hours: float = Field(
        default=24.0, ge=0, description="Events stamped further than this in the future are quarantined."
    )
    max_line_bytes: int = Field(default=1_000_000, ge=1, description="A longer line is quarantined as line_too_long.")
    max_id_chars: int = Field(
        default=256, ge=1, description="A longer messageId, userId, anonymousId or id is quarantined as field_too_long."
    )
    gmail_rules: bool = Field(default=True, description="Gmail addresses with dots or +tags are the same address.")
    files: list[str] = Field(
        default=[],
        description="Only these landing file names (the landing sensor names the one it saw); empty: every new file.",
    )

    @field_validator("files")
    @classmethod
    def _names_only(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(f"files takes names of files in the landing folder, not paths: got {name!r}")
        return value

    @field_validator("min_event_at")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"min_event_at must be an ISO date such as 2000-01-01, got {value!r}") from exc
        return value

    def options(self) -> IngestOptions:
        return IngestOptions(
            min_event_at=datetime.fromisoformat(self.min_event_at),
            max_future_hours=self.max_future_hours,
            max_line_bytes=self.max_line_bytes,
            max_id_chars=self.max_id_chars,
            gmail_rules=self.gmail_rules,
        )


class RefreshConfig(PersonaConfig):
    """Person-level stages refresh incrementally unless told otherwise."""

    full_refresh: bool = Field(
        default=False,
        description="Recompute every person instead of only those new events touched (the nightly refresh does).",
    )


class IdentityConfig(RefreshConfig):
    """How identifiers become people."""

    max_user_ids_per_identifier: int = Field(
        default=1, ge=1, description="An identifier seen with more userIds than this (a shared tablet) links nobody."
    )
    max_emails_per_identifier: int = Field(
        default=3, ge=1, description="An identifier seen with more emails than this links nobody."
    )
    max_anonymous_ids_per_identifier: int = Field(
        default=20,
        ge=1,
        description="An identifier seen with more anonymousIds than this (test@test.com) links nobody.",
    )

    linkage: bool = Field(
        default=True,
        description="After deterministic stitching, link people who share no identifier by name, birth date, "
        "age, postcode and city (Splink).",
    )
    link_threshold: float = Field(
        default=0.9, gt=0, lt=1, description="Match probability at or above which two people are linked."
    )
    link_across_user_ids: bool = Field(
        default=False, description="Let a probabilistic link join two people with different verified userIds."
    )
    min_link_records: int = Field(
        default=1000, ge=2, description="People with a name or birth date needed before a linkage model is trained."
    )
    retrain_linkage: bool = Field(
        default=False, description="Re-estimate the linkage model (m/u parameters) on everyone, then relink in full."
    )

    def options(self) -> IdentityOptions:
        return IdentityOptions(**self.model_dump(exclude={"full_refresh", "retrain_linkage"}))


class CleaningConfig(RefreshConfig):
    """Sessions, trait cleaning, sparsity and outliers."""

    session_gap_minutes: float = Field(default=30.0, gt=0, description="Inactivity that ends a session.")
    missing_attributes: list[str] = Field(
        default=list(MISSING_ATTRIBUTES), description="Attributes counted for each person's missing_ratio."
    )
    sparse_threshold: float = Field(
        default=0.5, gt=0, le=1, description="Above this missing_ratio a person is sparse: kept, not fitted on."
    )
    outlier_method: str = Field(default="mad", description="zscore, iqr or mad (on log1p of counts and money).")
    outlier_limit: float = Field(default=3.5, gt=0, description="Fence width for person features.")
    session_outlier_limit: float = Field(
        default=5.0, gt=0, description="Fence width for session length and event rate (10-hour sessions, bots)."
    )
    outlier_action: str = Field(default="flag", description="flag, clip (to the fences) or exclude (from fitting).")
    burst_min_events: int = Field(default=30, ge=2, description="A bot burst needs at least this many events.")

    def options(self) -> CleaningOptions:
        values = self.model_dump(exclude={"full_refresh"})
        values["missing_attributes"] = tuple(values["missing_attributes"])
        return CleaningOptions(**values)


class FeaturesConfig(RefreshConfig):
    """How cleaned_users becomes the modelling matrix."""

    scaling: str = Field(default="zscore", description="zscore or minmax, after log1p of counts and money.")
    clip_method: str = Field(
        default="mad", description="Fences the heavy-tailed features are clipped to: mad, iqr, zscore or none."
    )
    clip_limit: float = Field(default=3.5, gt=0, description="Fence width (the cleaning stage's outlier_limit).")
    max_categories: int = Field(default=20, ge=1, description="Categories kept as own columns; the rest is 'other'.")
    refit: bool = Field(
        default=False, description="Fit a new transform (a new version) instead of scoring with the saved one."
    )

    def options(self) -> FeatureOptions:
        return FeatureOptions(
            scaling=self.scaling,
            clip_method=self.clip_method,
            clip_limit=self.clip_limit,
            max_categories=self.max_categories,
        )


class SegmentsConfig(RefreshConfig):
    """Segmentation: k range, sub-segments, noise, embedding and id matching."""

    k_min: int = Field(default=2, ge=2, description="Smallest k tried.")
    k_max: int = Field(default=10, ge=2, description="Largest k tried.")
    silhouette_tolerance: float = Field(
        default=0.02, ge=0, description="The elbow's k stands unless another k's silhouette beats it by more."
    )
    space: str = Field(
        default="auto", description="features, autoencoder, or auto (the one with the better silhouette)."
    )
    embedding_dim: int = Field(default=4, ge=1, description="Width of the autoencoder's bottleneck.")
    sub_k_max: int = Field(default=4, ge=2, description="Most sub-segments per segment (Ward).")
    noise_min_cluster_size: int = Field(default=40, ge=2, description="HDBSCAN: smallest dense group (in the sample).")
    minibatch_above: int = Field(default=100_000, ge=1, description="Use MiniBatchKMeans above this many people.")
    match_max_distance: float = Field(
        default=1.0, gt=0, description="A retrained segment keeps an old id when its profile is this close."
    )
    seed: int = Field(default=0, description="Random seed for samples, k-means and the autoencoder.")
    retrain: bool = Field(default=False, description="Train a new model instead of assigning with the saved one.")

    def options(self) -> SegmentOptions:
        return SegmentOptions(**self.model_dump(exclude={"retrain", "full_refresh"}))


def shipped_enrichment() -> Path:
    """The sample enrichment table: PERSONA_HOME's own copy if present, else the one in the repository."""
    own = persona_home() / "enrichment" / "postal_areas.csv"
    return own if own.exists() else Path(__file__).resolve().parents[1] / "data" / "enrichment" / "postal_areas.csv"


class ImputationConfig(RefreshConfig):
    """Filling gaps: enrichment, inference, trait models, statistical fallback."""

    model_traits: list[str] = Field(
        default=["age_bracket", "gender"], description="Traits predicted with LightGBM (age_bracket, gender, country)."
    )
    statistical_fallback: list[str] = Field(
        default=["country"],
        description="Traits that, still missing, get the most frequent value (or the median age, for 'age').",
    )
    confidence_threshold: float = Field(
        default=0.5, ge=0, le=1, description="A model's prediction is kept only at or above this probability."
    )
    min_lift: float = Field(
        default=0.0, ge=0, description="A model must beat the majority baseline's accuracy and macro-F1 by more."
    )
    holdout_share: float = Field(default=0.25, gt=0, lt=1, description="Stratified holdout for the model scores.")
    max_training_rows: int = Field(default=100_000, ge=100, description="LightGBM trains on at most this many people.")
    product_components: int = Field(default=16, ge=2, description="Width of the product-interest embedding (SVD).")
    min_labelled_people: int = Field(
        default=200, ge=10, description="A trait is modelled only when at least this many people state it."
    )
    enrichment_path: str = Field(
        default="", description="CSV of third-party attributes (default: the shipped data/enrichment sample)."
    )
    enrichment_keys: list[str] = Field(
        default=["country", "postal_prefix"], description="Join columns (country, postal_code, postal_prefix)."
    )
    enriched_confidence: float = Field(default=0.8, ge=0, le=1, description="Confidence given to enriched values.")
    intent_window_days: float = Field(default=7.0, gt=0, description="Recent activity counted in intent_score.")
    seed: int = Field(default=0, description="Random seed for splits and models.")
    retrain: bool = Field(default=False, description="Train new trait models instead of predicting with saved ones.")

    @field_validator("enrichment_path")
    @classmethod
    def _readable(cls, value: str) -> str:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(f"enrichment_path must name a CSV file that exists, got {value!r}")
        return value

    def options(self) -> ImputationOptions:
        values = self.model_dump(exclude={"retrain", "full_refresh"})
        for key in ("model_traits", "statistical_fallback", "enrichment_keys"):
            values[key] = tuple(values[key])
        values["enrichment_path"] = self.enrichment_path or str(shipped_enrichment())
        return ImputationOptions(**values)


class ProfilesConfig(RefreshConfig):
    """Category affinity: the same weights and half-life the real-time path uses."""

    view_weight: float = Field(default=1.0, ge=0, description="Weight of a product view.")
    add_to_cart_weight: float = Field(default=3.0, ge=0, description="Weight of an add-to-cart.")
    purchase_weight: float = Field(default=5.0, ge=0, description="Weight of a purchased product.")
    half_life_days: float = Field(default=30.0, gt=0, description="An interaction counts half after this many days.")

    def options(self) -> AffinityOptions:
        return AffinityOptions(**self.model_dump(exclude={"full_refresh"}))
