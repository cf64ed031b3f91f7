"""A versioned store for fitted artifacts (feature transforms, segment and trait models).

Each save writes `models/<kind>/v0001.joblib` beside a readable `v0001.json` summary, both
written aside and renamed into place, so a killed run never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib


@dataclass(frozen=True)
class Saved:
    version: int
    path: Path
    payload: Any

    @property
    def tag(self) -> str:
        return f"v{self.version:04d}"


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, kind: str) -> Path:
        return self.root / kind

    def versions(self, kind: str) -> list[int]:
        folder = self._dir(kind)
        if not folder.exists():
            return []
        return sorted(int(p.stem[1:]) for p in folder.glob("v*.joblib") if p.stem[1:].isdigit())

    def save(self, kind: str, payload: Any, summary: dict | None = None) -> Saved:
        folder = self._dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        version = (self.versions(kind) or [0])[-1] + 1
        path = folder / f"v{version:04d}.joblib"
        # The summary lands first: a .json without its .joblib is ignored by versions().
        for target, write in (
            (path.with_suffix(".json"), lambda p: p.write_text(json.dumps(summary or {}, indent=2, default=str))),
            (path, lambda p: joblib.dump(payload, p)),
        ):
            tmp = target.with_name(target.name + ".tmp")
            write(tmp)
            os.replace(tmp, target)
        return Saved(version, path, payload)

    def latest(self, kind: str) -> Saved | None:
        versions = self.versions(kind)
        return self.load(kind, versions[-1]) if versions else None

    def load(self, kind: str, version: int) -> Saved:
        path = self._dir(kind) / f"v{version:04d}.joblib"
        return Saved(version, path, joblib.load(path))
