"""The server's settings: keys from the environment or persona.yaml's `server:` section, limits.

Read with nothing heavier than PyYAML, so `persona serve` starts without importing Dagster;
`settings.load_settings` calls `check_section` so a run refuses a bad `server:` section too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, get_args

WRITE_KEY_ENV = "PERSONA_WRITE_KEY"
READ_KEY_ENV = "PERSONA_READ_KEY"
ADMIN_KEY_ENV = "PERSONA_ADMIN_KEY"
SECTION = "server"
MIN_KEY_CHARS = 8
Durable = Literal["disk", "stream"]  # where an accepted event is made durable before its 200
CHOICES = {"durable": get_args(Durable)}


class ServerSettingsError(ValueError):
    """A setting the server cannot start with; the message says how to fix it."""


@dataclass(frozen=True)
class ServerSettings:
    """Everything `persona serve` is told. Limits follow Segment's tracking API."""

    host: str = "127.0.0.1"
    port: int = 8080
    write_key: str = ""
    read_key: str = ""
    admin_key: str = ""  # the explorer's actions (merge, unmerge, forget); off without one
    event_bytes: int = 32 * 1024  # one event, as Segment limits it
    batch_bytes: int = 500 * 1024  # one request to /v1/batch
    batch_events: int = 2_500
    max_requests_per_second: float = 2_000.0  # collection requests; 0 turns the limit off
    burst: int = 2_000  # requests allowed at once before the rate applies
    # A spool moves into landing this often: as often as the stream consumer flushes, so the
    # landing sensor (every 15 s) finds a few files a run, not one a second.
    rotate_seconds: float = 10.0
    rotate_bytes: int = 16 * 1024 * 1024
    # With a Redis stream configured (PERSONA_REDIS_URL, or `persona stream --start-redis`'s), valid
    # events also go onto it for the hot profiles, and profiles show the live fields; false: never.
    stream: bool = True
    # Where a valid event is durable before its 200: `disk` (the spool, fsync'd on this machine) or
    # `stream` (XADDed to the Redis stream, as durable as Redis makes it; the consumer lands it). Unset:
    # `stream` when events go onto a stream, else `disk`. Refused events are fsync'd in the spool either way.
    durable: Durable | None = None
    gmail_rules: bool = True  # as ingest normalizes emails (persona.yaml ingest.gmail_rules)

    def __repr__(self) -> str:  # keys never reach a log or a traceback
        shown = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.endswith("_key")}
        return f"ServerSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())}, keys hidden)"


# gmail_rules follows ingest's own setting, so an email is hashed here exactly as ingest hashes it.
FILE_KEYS = tuple(f.name for f in fields(ServerSettings) if f.name != "gmail_rules")


def check_section(values: object) -> dict:
    """The `server:` section of persona.yaml as settings, or a ServerSettingsError naming the key."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ServerSettingsError(f"server must hold 'key: value' settings, got {type(values).__name__}")
    defaults = ServerSettings()
    out = {}
    for key, value in values.items():
        if key not in FILE_KEYS:
            raise ServerSettingsError(f"server.{key}: unknown setting; allowed: {', '.join(FILE_KEYS)}")
        if key in CHOICES:
            if value not in CHOICES[key]:
                raise ServerSettingsError(f"server.{key}: one of {', '.join(CHOICES[key])}, got {value!r}")
            out[key] = value
            continue
        want = type(getattr(defaults, key))
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ServerSettingsError(f"server.{key}: expected {want.__name__}, got {type(value).__name__}")
        if want in (int, float) and value < 0:
            raise ServerSettingsError(f"server.{key}: must be 0 or more")
        out[key] = value
    return out


def _file_sections(path: Path | None) -> dict:
    import yaml

    if path is None or not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ServerSettingsError(f"{path}: not a readable YAML file: {exc}") from None
    return raw if isinstance(raw, dict) else {}


def load(home: Path, config: Path | None = None) -> ServerSettings:
    """persona.yaml's `server:` section (and ingest.gmail_rules) over the defaults, the environment's
    keys over the file's. Refuses to go on without a write key, or with a read key equal to it."""
    path = config or Path(os.environ.get("PERSONA_CONFIG") or home / "persona.yaml")
    sections = _file_sections(path)
    try:
        values = check_section(sections.get(SECTION))
    except ServerSettingsError as exc:
        raise ServerSettingsError(f"{path}: {exc}") from None
    ingest = sections.get("ingest") or {}
    if isinstance(ingest, dict) and isinstance(ingest.get("gmail_rules"), bool):
        values["gmail_rules"] = ingest["gmail_rules"]
    settings = replace(ServerSettings(), **values)
    env = {
        "write_key": os.environ.get(WRITE_KEY_ENV, ""),
        "read_key": os.environ.get(READ_KEY_ENV, ""),
        "admin_key": os.environ.get(ADMIN_KEY_ENV, ""),
    }
    settings = replace(settings, **{k: v for k, v in env.items() if v})
    return _usable(settings)


def _usable(settings: ServerSettings) -> ServerSettings:
    if not settings.write_key:
        raise ServerSettingsError(
            f"no write key is set, so no SDK could send events: set {WRITE_KEY_ENV} (for example "
            f"`export {WRITE_KEY_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')`) "
            "or write_key under server: in persona.yaml"
        )
    keys = (("write key", settings.write_key), ("read key", settings.read_key), ("admin key", settings.admin_key))
    for name, value in keys:
        if value and len(value) < MIN_KEY_CHARS:
            raise ServerSettingsError(f"the {name} is shorter than {MIN_KEY_CHARS} characters: choose a longer one")
    if settings.read_key and settings.read_key == settings.write_key:
        raise ServerSettingsError(
            "the read key equals the write key: a write key ships in every web page, so profiles need their own "
            f"key ({READ_KEY_ENV})"
        )
    if settings.admin_key and settings.admin_key in (settings.read_key, settings.write_key):
        raise ServerSettingsError(
            f"the admin key equals the read or the write key: actions (merge, unmerge, forget) need their own key "
            f"({ADMIN_KEY_ENV})"
        )
    return settings
