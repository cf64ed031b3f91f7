"""Keeping profiles fresh without clicks: the landing sensor, declarative automation downstream,
the nightly full refresh, and a sensor that records failed runs where people look.

The flow: a file lands → `landing_sensor` starts one ingest run for it (run key = name, size
and modification time, so a restarted daemon never starts it twice) → `raw_events` updates →
every person-level asset is `eager` and waits for its inputs' blocking checks (which run
in the same run and stop what is downstream of a failure) → `user_profiles` and the serving snapshot follow.
"""

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from persona_assets.core.ingest import (
    FORMATS,
    PARTIAL_SUFFIXES,
    checksum,
    file_format,
    landing_files,
    refused_files,
)
from persona_assets.resources import PersonaHome

# Downstream of raw_events everything refreshes as soon as its inputs did (incrementally),
# unless a blocking check on an input failed. One tick requests the whole chain as one run.
EAGER = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()

# How stale user_profiles may get: the nightly refresh keeps it under a day.
PROFILES_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=48), warn_window=timedelta(hours=26))

INGEST_KEYS = ["raw_events", "quarantined_events", "ingest_files"]
ingest_landing_job = dg.define_asset_job(
    "ingest_landing_file",
    selection=dg.AssetSelection.assets(*INGEST_KEYS),
    description="Ingest the landing files named in the config (the landing sensor's runs).",
)


@dataclass(frozen=True)
class Timing:
    """How often the sensors tick (seconds), and how long a landing file must stay unchanged before
    it is read. Read from the environment when Dagster loads the definitions, never at import."""

    landing_interval: int = 15
    landing_settle: float = 10.0
    automation_interval: int = 30
    failure_interval: int = 30

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> "Timing":
        """The defaults, each overridden by its variable in TIMING_ENV when set."""
        values = {}
        for f in fields(cls):
            name, text = TIMING_ENV[f.name], env.get(TIMING_ENV[f.name], "").strip()
            if not text:
                continue
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
            if not seconds >= 0:
                raise ValueError(f"{name} must be a number of seconds, not negative, got {text!r}")
            values[f.name] = type(f.default)(seconds)
        return cls(**values)


TIMING_ENV = {
    "landing_interval": "PERSONA_LANDING_INTERVAL",
    "landing_settle": "PERSONA_LANDING_SETTLE_SECONDS",
    "automation_interval": "PERSONA_AUTOMATION_INTERVAL",
    "failure_interval": "PERSONA_FAILURE_INTERVAL",
}


def _alive(pid: int) -> bool:
    """Whether a local process is running (a zombie, killed and not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark runs whose worker process died (killed, out of memory) as failed and free their
    `duckdb` pool slot. A dead run would otherwise hold the pool's one slot forever and every
    later run would wait for it: Dagster's local run launcher cannot see its workers die."""
    reaped = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
        event = records[0].event_log_entry.dagster_event if records else None
        if event is None or not event.pid or _alive(event.pid):
            continue
        instance.report_run_failed(run, f"its worker process {event.pid} died before the run finished")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


@dataclass(frozen=True)
class Ledger:
    """What the serving snapshot's ingest ledger holds: each file version's name, size and mtime,
    and the checksums of each name and size."""

    stamps: frozenset[tuple[str, int, int]]
    checksums: dict[tuple[str, int], set[str]]

    def holds(self, path: Path, stat: os.stat_result) -> bool:
        """Whether this file is one already ingested: same name, size and mtime, or, copied again
        with a new mtime (`cp` without `-p`), same name, size and content (hashed only then)."""
        if (path.name, stat.st_size, stat.st_mtime_ns) in self.stamps:
            return True
        sums = self.checksums.get((path.name, stat.st_size))
        try:
            return bool(sums) and checksum(path) in sums
        except OSError:
            return False


NO_LEDGER = Ledger(frozenset(), {})


def ingested_files(snapshot: Path) -> Ledger | None:
    """The ledger of files the serving snapshot holds, or None when there is no snapshot to read
    (yet, or being swapped in this instant).

    The snapshot, never the warehouse: DuckDB allows one writer process, and a sensor reading
    the warehouse would block the run that writes it."""
    import duckdb

    from persona_assets.core.publish import open_snapshot

    if not snapshot.is_file():
        return None
    try:
        with open_snapshot(snapshot) as con:
            rows = con.execute("SELECT file_name, size_bytes, mtime_ns, checksum FROM ingest_files").fetchall()
    except (duckdb.Error, OSError):
        return None
    checksums: dict[tuple[str, int], set[str]] = {}
    for name, size, _, digest in rows:
        checksums.setdefault((name, int(size)), set()).add(digest)
    return Ledger(frozenset((name, int(size), int(mtime)) for name, size, mtime, _ in rows), checksums)


NOT_EVENTS = f"not an event file: {', '.join(FORMATS)}"


def unread_files(landing: Path) -> dict[str, str]:
    """Entries in landing Persona never reads, each with why, so they are named instead of
    ignored without a word: files that are not event files (`notes.txt`, `events.json`,
    `data.gz`), and entries with an event file's name that cannot be read (a folder, a FIFO, a
    link out of landing: ingest's refusals). Hidden files and files still being written (`*.tmp`,
    `*.part`) are not listed: they are left alone on purpose."""
    if not landing.is_dir():
        return {}
    out = dict(refused_files(landing))
    for path in sorted(landing.iterdir()):
        if path.name in out or path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIXES) or path.is_dir():
            continue
        if file_format(path) is None:
            out[path.name] = NOT_EVENTS
    return dict(sorted(out.items()))


def not_read_line(landing: Path) -> str | None:
    """`Not read: notes.txt (not an event file: ...)`, or None when landing holds only event files."""
    unread = unread_files(landing)
    if not unread:
        return None
    return "Not read: " + "; ".join(f"{name} ({why})" for name, why in unread.items())


def landing_requests(landing, cursor: dict[str, str], settle_seconds: float, now: float, ingested=None):
    """(run requests, new cursor, files still settling) for the files in `landing`.

    A file is ready when it is complete (not `*.tmp`/`*.part`/hidden) and unchanged for
    `settle_seconds`; the cursor remembers each file's size and mtime once requested. A file
    the cursor does not know but the ledger holds (`ingested`, a callable giving
    `ingested_files`, called at most once; `Ledger.holds` says when) is already ingested:
    remembered, not requested, so a first tick on an up-to-date home (a new DAGSTER_HOME,
    `persona run` before `persona ui`) launches nothing.
    """
    requests, settling, seen = [], [], {}
    ledger: Ledger | None = None
    for path in landing_files(landing):
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        seen[path.name] = stamp
        if cursor.get(path.name) == stamp:
            continue
        if ingested is not None:
            ledger = (ingested() or NO_LEDGER) if ledger is None else ledger
            if ledger.holds(path, stat):
                continue
        if now - stat.st_mtime < settle_seconds:
            settling.append(path.name)
            seen[path.name] = cursor.get(path.name, "")
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{path.name}:{stamp}",
                run_config={"ops": {"ingest_landing": {"config": {"files": [path.name]}}}},
                tags={"persona/landing_file": path.name},
            )
        )
    return requests, {k: v for k, v in seen.items() if v}, settling


def landing_tick(context: dg.SensorEvaluationContext, persona: PersonaHome):
    """One tick of the landing sensor: a run request per new settled file."""
    for run_id in reap_dead_runs(context.instance):
        context.log.warning(f"run {run_id} had died without finishing: marked failed, its pool slot freed")
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, cursor, settling = landing_requests(
        persona.landing,
        cursor,
        persona.landing_settle_seconds,
        time.time(),
        ingested=lambda: ingested_files(persona.serving_path),
    )
    skip = None
    not_read = not_read_line(persona.landing)
    if not requests:
        skip = f"still being written: {', '.join(settling)}" if settling else "no new files in landing"
        skip = f"{skip}. {not_read}" if not_read else skip
    elif not_read:
        context.log.info(not_read)
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor), skip_reason=skip)


def sensors(timing: Timing) -> list:
    """The landing, automation and failure sensors, ticking as `timing` says; all start running."""
    landing = dg.sensor(
        name="landing_sensor",
        job=ingest_landing_job,
        minimum_interval_seconds=timing.landing_interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Starts one ingest run per new complete file in PERSONA_HOME/landing (files the "
        "serving snapshot's ledger already holds are not new).",
    )(landing_tick)
    automation = dg.AutomationConditionSensorDefinition(
        "persona_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=timing.automation_interval,
        description="Refreshes every asset downstream of new events (AutomationCondition.eager).",
    )
    failures = dg.run_failure_sensor(
        name="failure_sensor",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=timing.failure_interval,
        description="Records each failed run in ops.duckdb `run_failures` and tags the run with what failed.",
    )(record_failed_run)
    return [landing, automation, failures]


FAILURES_DDL = """CREATE TABLE IF NOT EXISTS run_failures (run_id VARCHAR, job_name VARCHAR, failed_at TIMESTAMP,
    failed_steps VARCHAR, error VARCHAR, landing_file VARCHAR)"""


def record_failure(path, run_id: str, job: str, steps: list[str], error: str, landing_file: str | None) -> None:
    """Append a failed run to PERSONA_HOME/ops.duckdb (not the warehouse: a run may hold its lock)."""
    import duckdb

    with duckdb.connect(str(path)) as con:
        con.execute(FAILURES_DDL)
        con.execute(
            "INSERT INTO run_failures VALUES (?, ?, ?, ?, ?, ?)",
            [run_id, job, datetime.now(UTC).replace(tzinfo=None), ",".join(steps), error[:2000], landing_file],
        )


def step_error(event: dg.DagsterEvent) -> str | None:
    """`step: the error that failed it`, the innermost cause (Dagster wraps the user's error in
    "Error occurred while executing op ..."), or None for an event without one."""
    data = event.step_failure_data if event.is_step_failure else None
    if not data or not data.error:
        return None
    error = data.error
    while error.cause is not None:
        error = error.cause
    return f"{event.step_key}: {error.message.strip()}"


def record_failed_run(context: dg.RunFailureSensorContext, persona: PersonaHome):
    """The failure sensor's work: the run, its failed steps and the innermost error, in ops.duckdb."""
    run = context.dagster_run
    steps = [event.step_key for event in context.get_step_failure_events() if event.step_key]
    error = next(filter(None, map(step_error, context.get_step_failure_events())), None)
    error = error or context.failure_event.message or "run failed"
    record_failure(
        persona.root / "ops.duckdb", run.run_id, run.job_name, steps, error, run.tags.get("persona/landing_file")
    )
    context.instance.add_run_tags(
        run.run_id, {"persona/failed_steps": ",".join(steps) or "run", "persona/failure": error[:200]}
    )


# A run with this tag rebuilds every person-level stage in full (the nightly refresh's runs carry it).
FULL_REFRESH_TAG = "persona/full_refresh"


def full_refresh(context: dg.AssetExecutionContext, config) -> bool:
    """Whether a stage rebuilds everyone: asked in its own config, or for the whole run by its tag."""
    return bool(config.full_refresh) or context.run.tags.get(FULL_REFRESH_TAG) == "true"


nightly_refresh = dg.define_asset_job(
    "nightly_refresh",
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*INGEST_KEYS),
    description="Recompute every person from all events with the saved models (full refresh): the same result "
    "the incremental refreshes reach, and drift measured on everyone.",
    tags={FULL_REFRESH_TAG: "true"},
)

nightly_schedule = dg.ScheduleDefinition(
    name="nightly",
    job=nightly_refresh,
    cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="02:00: full refresh of every person-level table and the serving snapshot.",
)
