"""Stage options declared once: a default, what it does, and its bounds.

Each stage's options are a frozen dataclass in `core/` (which knows no Dagster). A field made
with `setting(...)` carries the description and the bounds the launchpad and the settings file
check; `persona_assets.settings` builds each stage's Dagster config from these fields, so a
default, a description or a choice is written in one place only. Choices are `Literal` types.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, description: str, **bounds: float) -> Any:
    """A stage option: its default, what it does, and bounds (gt, ge, lt, le) on its value."""
    return field(default=default, metadata={"description": description, "bounds": bounds})
