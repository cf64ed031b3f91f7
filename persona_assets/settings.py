"""Every tunable of Persona as typed Dagster config, with defaults the launchpad shows."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator

from persona_assets.core.ingest import IngestOptions

HOME_ENV = "PERSONA_HOME"


def persona_home() -> Path:
    """PERSONA_HOME (default ./data), absolute."""
    return Path(os.environ.get(HOME_ENV, "data")).expanduser().resolve()


class IngestConfig(dg.Config):
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
