"""Where Persona keeps its files (PERSONA_HOME), with nothing heavy imported: the everyday
commands that only read the snapshot start from here, not from Dagster's settings."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "PERSONA_HOME"


def persona_home() -> Path:
    """PERSONA_HOME (default ./data), absolute."""
    return Path(os.environ.get(HOME_ENV, "data")).expanduser().resolve()


def snapshot_path() -> Path:
    """The serving snapshot users query: PERSONA_HOME/serving/persona.duckdb."""
    return persona_home() / "serving" / "persona.duckdb"
