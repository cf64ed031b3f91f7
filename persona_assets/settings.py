"""Every tunable of Persona as typed Dagster config, with defaults the launchpad shows."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path

import dagster as dg
import yaml
from pydantic import Field, create_model, field_validator, model_validator

from persona_assets.core.affinity import AffinityOptions
from persona_assets.core.cleaning import CleaningOptions
from persona_assets.core.engine import EngineOptions, refuse_partial
from persona_assets.core.features import FeatureOptions
from persona_assets.core.identity import IdentityOptions
from persona_assets.core.imputation import ImputationOptions
from persona_assets.core.ingest import IngestOptions
from persona_assets.core.segments import SegmentOptions
from persona_assets.home import HOME_ENV, persona_home

__all__ = ["HOME_ENV", "persona_home"]  # re-exported: they live in the light home module

CONFIG_ENV = "PERSONA_CONFIG"
SETTINGS_FILE = "persona.yaml"


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


def stage_config(name: str, options: type, base: type[PersonaConfig]) -> type[PersonaConfig]:
    """A stage's Dagster config, built from its options dataclass: one field per option declared
    with `setting(...)` (same default, description, bounds and `Literal` choices), on top of
    `base`'s per-run fields. Tuples become lists and datetimes ISO text in the launchpad."""
    hints = typing.get_type_hints(options)
    fields = {}
    for f in dataclasses.fields(options):
        if "description" not in f.metadata:
            continue  # an internal knob, not a setting
        kind, default = hints[f.name], f.default
        if typing.get_origin(kind) is tuple:
            kind, default = list[typing.get_args(kind)[0]], list(default)
        elif kind is datetime:
            kind, default = str, default.isoformat()
        fields[f.name] = (kind, Field(default=default, description=f.metadata["description"], **f.metadata["bounds"]))
    config = create_model(name, __base__=base, __module__=__name__, __doc__=options.__doc__, **fields)
    OPTIONS[config] = options
    return config


# Each generated config's options dataclass.
OPTIONS: dict[type, type] = {}


def _as_options(config: PersonaConfig, **overrides):
    """The options a config's values make: lists back to tuples, ISO text back to datetimes."""
    options = OPTIONS[type(config)]
    hints = typing.get_type_hints(options)
    values = {}
    for name in config.model_fields:
        if name not in hints:
            continue  # a per-run field (full_refresh, retrain...), not an option
        value = getattr(config, name)
        if typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        elif hints[name] is datetime:
            value = datetime.fromisoformat(value)
        values[name] = value
    return options(**(values | overrides))


class _IngestRun(PersonaConfig):
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

    @field_validator("min_event_at", check_fields=False)
    @classmethod
    def _iso_date(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"min_event_at must be an ISO date such as 2010-01-01, got {value!r}") from exc
        return value

    def options(self) -> IngestOptions:
        return _as_options(self)


IngestConfig = stage_config("IngestConfig", IngestOptions, _IngestRun)


class RefreshConfig(PersonaConfig):
    """Person-level stages refresh incrementally unless told otherwise."""

    full_refresh: bool = Field(
        default=False,
        description="Recompute every person instead of only those new events touched (the nightly refresh does).",
    )


class _StageRun(RefreshConfig):
    def options(self):
        return _as_options(self)


class _IdentityRun(_StageRun):
    retrain_linkage: bool = Field(
        default=False, description="Re-estimate the linkage model (m/u parameters) on everyone, then relink in full."
    )


IdentityConfig = stage_config("IdentityConfig", IdentityOptions, _IdentityRun)
CleaningConfig = stage_config("CleaningConfig", CleaningOptions, _StageRun)


class _FeaturesRun(_StageRun):
    refit: bool = Field(
        default=False, description="Fit a new transform (a new version) instead of scoring with the saved one."
    )


FeaturesConfig = stage_config("FeaturesConfig", FeatureOptions, _FeaturesRun)


class _SegmentsRun(_StageRun):
    retrain: bool = Field(default=False, description="Train a new model instead of assigning with the saved one.")


SegmentsConfig = stage_config("SegmentsConfig", SegmentOptions, _SegmentsRun)


def shipped_enrichment() -> Path:
    """The sample enrichment table: PERSONA_HOME's own copy if present, else the one in the repository."""
    own = persona_home() / "enrichment" / "postal_areas.csv"
    return own if own.exists() else Path(__file__).resolve().parents[1] / "data" / "enrichment" / "postal_areas.csv"


class _ImputationRun(RefreshConfig):
    retrain: bool = Field(default=False, description="Train new trait models instead of predicting with saved ones.")

    @field_validator("enrichment_path", check_fields=False)
    @classmethod
    def _readable(cls, value: str) -> str:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(f"enrichment_path must name a CSV file that exists, got {value!r}")
        return value

    def options(self) -> ImputationOptions:
        return _as_options(self, enrichment_path=self.enrichment_path or str(shipped_enrichment()))


ImputationConfig = stage_config("ImputationConfig", ImputationOptions, _ImputationRun)
ProfilesConfig = stage_config("ProfilesConfig", AffinityOptions, _StageRun)


class _EngineSection(PersonaConfig):
    def options(self) -> EngineOptions:
        return _as_options(self)


EngineConfig = stage_config("EngineConfig", EngineOptions, _EngineSection)


# --- the settings file: $PERSONA_HOME/persona.yaml (or --config FILE / PERSONA_CONFIG) ---------------

# Each section of the file sets one stage's settings (and `engine`, which engine runs them).
SECTIONS: dict[str, type[PersonaConfig]] = {
    "ingest": IngestConfig,
    "identity": IdentityConfig,
    "cleaning": CleaningConfig,
    "features": FeaturesConfig,
    "segments": SegmentsConfig,
    "imputation": ImputationConfig,
    "profiles": ProfilesConfig,
    "engine": EngineConfig,
}
SECTION_OF = {config: name for name, config in SECTIONS.items()}
# Sections that are not a stage's settings.
OTHER_SECTIONS = ("mappings", "server")
# Audience definitions (core.audience_definitions reads and checks them, with their line numbers,
# when a run or command uses them: a mistake there does not stop ingest or the profiles).
AUDIENCE_SECTIONS = ("computed_traits", "audiences", "destinations")
# What a run is asked to do, not how the data is treated: set per run (launchpad, CLI), never in the file.
PER_RUN = ("files", "full_refresh", "refit", "retrain", "retrain_linkage")


class SettingsError(ValueError):
    """A settings file that cannot be used: the message names the file, the key and what it may be."""


def settings_path(home: Path | None = None, explicit: str | Path | None = None) -> Path | None:
    """The settings file in force: the one given (or PERSONA_CONFIG), else PERSONA_HOME/persona.yaml if present."""
    chosen = explicit or os.environ.get(CONFIG_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise SettingsError(f"settings file {path} does not exist")
        return path.resolve()
    default = (home or persona_home()) / SETTINGS_FILE
    return default if default.is_file() else None


def settable(config: type[PersonaConfig]) -> list[str]:
    return [name for name in config.model_fields if name not in PER_RUN]


def load_settings(path: Path | None) -> dict:
    """The file's sections, each checked as a whole: unknown sections and keys, per-run options and
    values a stage cannot use are refused with a SettingsError naming them."""
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: not a readable YAML file: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected sections such as 'cleaning:' at the top, got {type(raw).__name__}")
    allowed = [*SECTIONS, *OTHER_SECTIONS, *AUDIENCE_SECTIONS]
    out: dict = {}
    for section, values in raw.items():
        if section not in allowed:
            raise SettingsError(f"{path}: unknown section {section!r}; allowed: {', '.join(allowed)}")
        if section == "mappings":
            out[section] = _mappings(path, values)
            continue
        if section == "server":  # `persona serve`'s keys and limits, read by the server itself
            out[section] = _server(path, values)
            continue
        if section in AUDIENCE_SECTIONS:
            continue
        config = SECTIONS[section]
        if values is None:
            continue
        if section == "engine" and isinstance(values, str):
            values = {"name": values}  # `engine: spark` is short for `engine: {name: spark}`
        if not isinstance(values, dict):
            raise SettingsError(f"{path}: {section} must hold 'key: value' settings, got {type(values).__name__}")
        # YAML reads an unquoted 1850-01-01 as a date: the settings take dates as text.
        values = {k: v.isoformat() if isinstance(v, date) else v for k, v in values.items()}
        for key in values:
            if key in PER_RUN:
                raise SettingsError(
                    f"{path}: {section}.{key} is chosen per run (launchpad or command line), not in the settings file"
                )
            if key not in config.model_fields:
                raise SettingsError(f"{path}: {section}.{key}: unknown setting; allowed: {', '.join(settable(config))}")
        try:
            config(**values)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise SettingsError(f"{path}: {section}: {plain_errors(exc)}") from None
        out[section] = dict(values)
    refused = refuse_partial(EngineConfig(**out.get("engine", {})).options())
    if refused:
        raise SettingsError(f"{path}: {refused}")
    return out


def _mappings(path: Path, values) -> tuple:
    from persona_assets.core.mappings import parse_mappings

    if values is None:
        return ()
    if not isinstance(values, list):
        raise SettingsError(f"{path}: mappings must be a list of entries, each starting with 'files:'")
    try:
        return parse_mappings(values)
    except ValueError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def _server(path: Path, values) -> dict:
    from persona_assets.server.config import ServerSettingsError, check_section

    try:
        return check_section(values)
    except ServerSettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def plain_errors(exc: ValueError) -> str:
    """A pydantic error as one line per field: 'key: what is wrong'."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        msg = error.get("msg", "").removeprefix("Value error, ")
        value = error.get("input")
        shown = value.isoformat() if isinstance(value, date) else repr(value)
        # A check of the whole section was given the section itself: its message names the keys.
        got = "" if isinstance(value, dict) or shown in msg else f" (got {shown})"
        parts.append(f"{where + ': ' if where else ''}{msg}{got}")
    return "; ".join(parts)


def with_settings(config: PersonaConfig, settings: dict) -> PersonaConfig:
    """`config` with the file's values for every setting the run left at its default (a value set
    in the launchpad wins over the file; the file wins over the built-in default)."""
    values = settings.get(SECTION_OF.get(type(config), ""), {})
    if not values:
        return config
    defaults = type(config)().model_dump()
    current = config.model_dump()
    merged = {k: (values[k] if k in values and current[k] == defaults[k] else v) for k, v in current.items()}
    return type(config)(**merged)


def stage_options(config: PersonaConfig, settings: dict):
    """A stage's options: the run's config over the settings file over the defaults."""
    opts = with_settings(config, settings).options()
    if isinstance(config, IngestConfig) and settings.get("mappings"):
        opts = replace(opts, mappings=settings["mappings"])
    return opts


def effective_settings(settings: dict) -> dict:
    """Every stage setting in force (the file's values over the defaults), by section."""
    out = {}
    for section, config in SECTIONS.items():
        values = with_settings(config(), settings).model_dump()
        out[section] = {k: v for k, v in values.items() if k not in PER_RUN}
    return out
