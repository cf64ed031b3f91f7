"""Persona's Spark stages as an application for `spark-submit`, to run them on a cluster:

    spark-submit --master spark://host:7077 persona_assets/spark_job.py --warehouse /shared/persona/spark

The warehouse is a folder of Parquet tables (one folder a table) that the driver and every
executor can read: a shared filesystem. The stages that run on Spark so far
(`engine.SPARK_STAGES`) read their inputs from it and write their results back, as they do
under `engine: spark` in one process. A stage's settings come from the `persona.yaml` given
with `--settings` (its section for that stage), or are the defaults.

It prints one JSON line: each stage's rows and seconds, and how many executors the
application had, so a caller can see the work was spread.
"""

from __future__ import annotations

import argparse
import json
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


def _cleaning(spark, warehouse: Path, settings: Path | None) -> dict:
    from persona_assets.core.cleaning import clean_on_spark

    result = clean_on_spark(spark, warehouse, _stage_options(settings, "cleaning"))
    return result.counts


STAGES = {"cleaning": _cleaning}


def _executors(spark) -> int:
    """The executors the application holds now (the driver's own block manager not counted)."""
    return spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spark_job.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--warehouse", required=True, help="folder of Parquet tables every executor can read")
    parser.add_argument("--stage", action="append", choices=sorted(STAGES), help="a stage to run (default: all)")
    parser.add_argument("--settings", type=Path, help="a persona.yaml whose stage sections apply")
    args = parser.parse_args(argv)
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("persona").config("spark.sql.session.timeZone", "UTC").getOrCreate()
    report: dict = {"master": spark.sparkContext.master, "stages": {}}
    try:
        for stage in args.stage or list(STAGES):
            started = time.perf_counter()
            rows = STAGES[stage](spark, Path(args.warehouse), args.settings)
            report["stages"][stage] = {"rows": rows, "seconds": round(time.perf_counter() - started, 2)}
        report["executors"] = _executors(spark)
    finally:
        spark.stop()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
