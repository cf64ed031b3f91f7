"""Persona's Spark stages as an application for `spark-submit`, to run them on a cluster:

    spark-submit --master spark://host:7077 persona_assets/spark_job.py --warehouse /shared/persona/spark

The warehouse is a folder of Parquet tables (one folder a table) that the driver and every
executor can read: a shared filesystem. The stages that run on Spark so far
(`engine.SPARK_STAGES`) read their inputs from it and write their results back, as they do
under `engine: spark` in one process; with `--landing`, ingest reads the landing files first.
A stage's settings come from the `persona.yaml` given with `--settings` (its section for that
stage), or are the defaults.

It prints one JSON line: each stage's rows and seconds, and how many executors the
application had, so a caller can see the work was spread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml


def _stage_options(settings: Path | None, section: str):
    """A stage's options from the settings file's section, checked as `persona run` checks them."""
    from persona_assets.settings import SECTIONS, plain_errors

    values = {}
    if settings is not None:
        try:
            raw = yaml.safe_load(settings.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SystemExit(f"{settings}: not a readable YAML file: {exc}") from None
        values = (raw.get(section) if isinstance(raw, dict) else None) or {}
    try:
        return SECTIONS[section](**values).options()
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise SystemExit(f"{settings}: {section}: {plain_errors(exc)}") from None


def _ingest(spark, job: argparse.Namespace) -> dict:
    """The landing folder's files into raw_events, quarantined_events and ingest_files, their
    identifiers hashed with the installation's key (PERSONA_HASH_KEY, or --home's key file)."""
    from persona_assets.core.ingest_spark import SparkIngestRefused, ingest_on_spark
    from persona_assets.core.pii import load_key

    key = load_key(Path(job.home or "."))  # PERSONA_HASH_KEY first; without it --home is required (checked)
    try:
        report = ingest_on_spark(
            spark, Path(job.landing), Path(job.warehouse), key, _stage_options(job.settings, "ingest")
        )
    except SparkIngestRefused as exc:
        raise SystemExit(str(exc)) from None
    return {
        "lines_read": report.total("lines_read"),
        "raw_events": report.total("events_kept"),
        "quarantined_events": report.total("lines_quarantined"),
        "duplicates": report.total("duplicates"),
    }


def _identity(spark, job: argparse.Namespace) -> dict:
    """identity_map, deduped_users, identity_guard and person_id_history from raw_events, with
    deterministic links only: the settings must say `identity: {linkage: false}` (checked before
    Spark starts), so no run silently links fewer people than the same settings would on DuckDB.
    Probabilistic linkage keeps its model and clusters on the driver's DuckDB warehouse: it runs
    on Spark through the graph (`persona run`, Dagster), not in this application."""
    from persona_assets.core.identity import resolve_on_spark

    report = resolve_on_spark(spark, Path(job.warehouse), _stage_options(job.settings, "identity"))
    return {"identifiers": report.identifiers, **report.counts}


def _cleaning(spark, job: argparse.Namespace) -> dict:
    from persona_assets.core.cleaning import clean_on_spark

    result = clean_on_spark(spark, Path(job.warehouse), _stage_options(job.settings, "cleaning"))
    return result.counts


def _scores(spark, job: argparse.Namespace) -> dict:
    """category_scores (profiles' event-scale part), with the profiles section's weights and half-life."""
    from persona_assets.core.profiles import category_scores_on_spark

    return {
        "category_scores": category_scores_on_spark(
            spark, Path(job.warehouse), _stage_options(job.settings, "profiles")
        )
    }


# In the graph's order; a stage reads what the ones before it wrote to the warehouse.
STAGES = {"ingest": _ingest, "identity": _identity, "cleaning": _cleaning, "scores": _scores}
INPUTS = {
    "ingest": (),
    "identity": ("raw_events",),
    "cleaning": ("raw_events", "identity_map", "deduped_users"),
    "scores": ("raw_events", "identity_map", "cleaned_users"),
}
OUTPUTS = {
    "ingest": ("raw_events", "quarantined_events", "ingest_files"),
    "identity": ("identity_map", "deduped_users", "identity_guard", "person_id_history"),
    "cleaning": ("sessions", "cleaned_users"),
    "scores": ("category_scores",),
}


def _executors(spark) -> int:
    """The executors the application holds now (the driver's own block manager not counted)."""
    return spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1


def _refuse_before_starting(stages: list[str], job: argparse.Namespace) -> None:
    """What would stop a stage half-way through the chain, said before Spark starts: identity's
    settings must turn probabilistic linkage off (here: see `_identity`)."""
    from persona_assets.core.identity import LINKAGE_ON_SPARK
    from persona_assets.core.pii import KEY_ENV

    if "identity" in stages and _stage_options(job.settings, "identity").linkage:
        raise SystemExit(f"{job.settings or 'no --settings'}: {LINKAGE_ON_SPARK}")
    if "ingest" in stages and not (job.home or os.environ.get(KEY_ENV)):
        # A key made up here would hash identifiers unlike the installation's: no one could be found.
        raise SystemExit(f"ingest hashes identifiers with the installation's key: set {KEY_ENV} or pass --home")
    if job.landing and not Path(job.landing).is_dir():
        raise SystemExit(f"--landing {job.landing}: no such folder")
    made: set[str] = set()
    for stage in sorted(stages, key=list(STAGES).index):
        missing = [t for t in INPUTS[stage] if t not in made and not (Path(job.warehouse) / t).is_dir()]
        if missing:
            raise SystemExit(
                f"{stage} reads {', '.join(missing)} from the warehouse {job.warehouse}, which has no such "
                "table: run the stages before it (or pass --landing to start from the landing files)"
            )
        made.update(OUTPUTS[stage])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spark_job.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--warehouse", required=True, help="folder of Parquet tables every executor can read")
    parser.add_argument("--stage", action="append", choices=sorted(STAGES), help="a stage to run (default: all)")
    parser.add_argument("--settings", type=Path, help="a persona.yaml whose stage sections apply")
    parser.add_argument("--landing", help="folder of landing files every executor can read (for ingest)")
    parser.add_argument("--home", help="the PERSONA_HOME whose hashing key ingest uses (or PERSONA_HASH_KEY)")
    args = parser.parse_args(argv)
    from persona_assets.core.engine import warehouse_path

    try:
        args.warehouse = str(warehouse_path(args.warehouse))
    except ValueError as refused:
        parser.error(str(refused))
    stages = args.stage or [stage for stage in STAGES if stage != "ingest" or args.landing]
    if "ingest" in stages and not args.landing:
        parser.error("--stage ingest needs --landing")
    _refuse_before_starting(stages, args)
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("persona").config("spark.sql.session.timeZone", "UTC").getOrCreate()
    report: dict = {"master": spark.sparkContext.master, "stages": {}}
    try:
        for stage in sorted(stages, key=list(STAGES).index):
            started = time.perf_counter()
            rows = STAGES[stage](spark, args)
            report["stages"][stage] = {"rows": rows, "seconds": round(time.perf_counter() - started, 2)}
        report["executors"] = _executors(spark)
    finally:
        spark.stop()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
