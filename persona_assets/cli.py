"""`persona demo|generate|run|retrain|query|sql|profile|forget|merge|unmerge|ui|bench`: the command line over the asset graph and the snapshot.

The commands that only read the snapshot (`query`, `sql`, `profile`, `failures`, `--help`) import
duckdb and little else, so they start in a fraction of a second: Dagster, pandas and the models
are imported inside the commands that run the graph."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from importlib import resources
from pathlib import Path

from persona_assets.home import HOME_ENV, persona_home, snapshot_path

DEMO_PEOPLE = 10_000
DEMO_SEED = 42


class Stop(Exception):
    """A reason the command cannot go on that the user can act on: one line for stderr, and the exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def writable_home() -> Path:
    """PERSONA_HOME, made if missing, after checking this user can write there (a clear Stop if not)."""
    home = persona_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".persona-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise Stop(
            f"{HOME_ENV}={home} is not a folder this user can write ({exc.strerror or exc}); "
            f"set {HOME_ENV} to one that is (default ./data)."
        ) from None
    return home


def dagster_home() -> Path:
    """DAGSTER_HOME (default PERSONA_HOME/dagster), holding the shipped dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or persona_home() / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    shipped = resources.files("persona_assets") / "dagster.yaml"
    target = home / "dagster.yaml"
    if not target.exists() or target.read_text() != shipped.read_text():
        target.write_text(shipped.read_text())
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def materialize(selection: list[str] | None = None, log_level: str = "WARNING", job_name: str | None = None) -> bool:
    """Run the asset graph (a selection, or a named job) in-process, recorded in DAGSTER_HOME so the UI shows it."""
    import dagster as dg

    from persona_assets.definitions import build_definitions

    defs = build_definitions(persona_home())
    job = defs.resolve_job_def(job_name) if job_name else defs.resolve_implicit_global_asset_job_def()
    from persona_assets.automation import not_read_line, reap_dead_runs, record_failure

    known = sorted(key.to_user_string() for key in defs.resolve_all_asset_keys())
    unknown = [s for s in selection or [] if s not in known]
    if unknown:
        raise Stop(f"no asset named {', '.join(unknown)}; the assets are: {', '.join(known)}")

    instance = dg.DagsterInstance.from_config(str(dagster_home()))
    with instance:
        for run_id in reap_dead_runs(instance):  # a killed run's pool slot would block this one forever
            print(f"run {run_id} had died without finishing: marked failed, its pool slot freed", file=sys.stderr)
        target = run_target(defs, selection, named_job=bool(job_name))
        result = job.execute_in_process(
            instance=instance,
            asset_selection=target,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
    for assets, status in stage_statuses(result.all_events):
        print(f"{', '.join(assets)}: {status}")
    not_read = not_read_line(persona_home() / "landing") if dg.AssetKey("raw_events") in (target or ()) else None
    if not_read:
        print(not_read)
    if not result.success:
        # Recorded where the failure sensor records the UI's runs, so `persona failures` lists it.
        steps, error = failed_steps(result.all_events)
        record_failure(persona_home() / "ops.duckdb", result.run_id, job.name, steps, error, None)
        first_line = error.strip().splitlines()[0] if error.strip() else "run failed"
        print(
            f"persona: the run failed at {first_line} (recorded: persona "
            f"failures; the whole run {result.run_id} in persona ui)",
            file=sys.stderr,
        )
    return result.success


def run_target(defs, selection: list[str] | None, named_job: bool):
    """The assets a run materializes, named on the run so the UI's Runs page shows its target
    (a run of every asset recorded without a selection shows an empty Target column); a named
    job's runs show the job's name there, so they need none. A selected asset brings the
    assets made with it (`raw_events` with `ingest_files`): they are computed together."""
    import dagster as dg

    graph = defs.resolve_asset_graph()
    if selection:
        chosen = dg.AssetSelection.assets(*selection).required_multi_asset_neighbors()
        return sorted(chosen.resolve(graph))
    return None if named_job else sorted(graph.materializable_asset_keys)


def failed_steps(events) -> tuple[list[str], str]:
    """The failed steps of a run and the first one's error, as the failure sensor records them."""
    from persona_assets.automation import step_error

    steps = [event.step_key for event in events if event.is_step_failure and event.step_key]
    errors = [e for e in map(step_error, events) if e]
    failure = next((e.message for e in events if e.is_failure and e.message), None)
    return steps, errors[0] if errors else failure or "run failed"


def stage_statuses(events) -> list[tuple[list[str], str]]:
    """([assets], status) for each stage a run materialized that could not fit everything (its
    `status` metadata says what and why), in the order they ran; assets of one status together."""
    out: dict[str, list[str]] = {}
    for event in events:
        if not event.is_step_materialization:
            continue
        materialization = event.step_materialization_data.materialization
        # A stage's `status`, else its `note` (linkage waiting for enough people, say).
        status = materialization.metadata.get("status") or materialization.metadata.get("note")
        if status is not None and status.value != "fitted":
            out.setdefault(str(status.value), []).append(materialization.asset_key.to_user_string())
    return [(assets, status) for status, assets in out.items()]


def use_settings(path: str | None) -> int:
    """Check the settings file in force (the one given, else PERSONA_HOME/persona.yaml) before
    anything runs, and hand it to the run's definitions. 0, or 2 after saying what is wrong."""
    from persona_assets.settings import CONFIG_ENV, SettingsError, load_settings, settings_path

    try:
        load_settings(settings_path(persona_home(), path))
    except SettingsError as exc:
        print(f"persona: {exc}", file=sys.stderr)
        return 2
    if path:
        os.environ[CONFIG_ENV] = str(Path(path).expanduser().resolve())
    return 0


def engine_options(home: Path):
    """The engine settings of the home's settings file (the defaults when it has none or cannot be read:
    the command that reads it for a run says what is wrong)."""
    from persona_assets.core.engine import EngineOptions
    from persona_assets.settings import EngineConfig, SettingsError, load_settings, settings_path

    try:
        return EngineConfig(**load_settings(settings_path(home)).get("engine", {})).options()
    except SettingsError:
        return EngineOptions()


def snapshot_totals() -> tuple[int, int] | None:
    """(files, lines read) the snapshot counts so far, or None when there is no snapshot yet."""
    from persona_assets.core.publish import open_snapshot

    if not snapshot_path().exists():
        return None
    with open_snapshot(snapshot_path()) as con:
        files, lines = con.execute("SELECT count(*), coalesce(sum(lines_read), 0) FROM ingest_files").fetchall()[0]
    return int(files), int(lines)


LISTED = 5  # files or reasons the summary names before "and N more"
# What to do about a file none of whose lines were kept, by its commonest quarantine reason.
VOCABULARY = "if it is another vocabulary, map its fields (README: Other vocabularies: mappings)"
NOTHING_KEPT_HINTS = {
    "missing_id": VOCABULARY,
    "missing_timestamp": VOCABULARY,
    "missing_event_name": VOCABULARY,
    "bad_timestamp": VOCABULARY + ", with its timestamp format",
    "unknown_type": VOCABULARY + ", with a default type",
    "timestamp_out_of_range": "ingest.min_event_at and max_event_at set the range kept",
}


def _listed(items: list[str]) -> str:
    return ", ".join(items[:LISTED]) + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def summary(before: tuple[int, int] | None = None) -> str:
    """What the snapshot holds, every run so far; with `before` (`snapshot_totals()` when the
    run started) first what this run added, or that it found nothing new."""
    from persona_assets.core.publish import open_snapshot

    path = snapshot_path()
    with open_snapshot(path) as con:
        lines, kept, quarantined, duplicates, forgotten, files = con.execute(
            "SELECT sum(lines_read), sum(events_kept), sum(lines_quarantined), sum(duplicates), "
            "sum(lines_suppressed + lines_erased), count(*) FROM ingest_files"
        ).fetchall()[0]
        anons, users = con.execute(
            "SELECT count(DISTINCT anonymous_id), count(DISTINCT user_id) FROM raw_events"
        ).fetchall()[0]
        people, sparse, bots = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE is_sparse), count(*) FILTER (WHERE is_bot) FROM cleaned_users"
        ).fetchall()[0]
        reasons = con.execute(
            "SELECT reason, count(*) FROM quarantined_events GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        unreadable = con.execute(
            "SELECT source_file, detail FROM quarantined_events WHERE reason = 'unreadable_file' ORDER BY 1"
        ).fetchall()
        # Files none of whose lines were kept: most often another vocabulary that needs a mapping.
        nothing_kept = con.execute(
            """SELECT f.file_name, f.lines_read, string_agg(q.reason || ' ' || q.n, ', ' ORDER BY q.n DESC, q.reason)
               FROM ingest_files f
               JOIN (SELECT source_file, reason, count(*) AS n FROM quarantined_events GROUP BY 1, 2) q
                 ON q.source_file = f.file_name
               WHERE f.lines_read > 0 AND f.events_kept = 0 AND f.duplicates = 0
               GROUP BY 1, 2 ORDER BY 1"""
        ).fetchall()
        completeness, imputed = con.execute(
            "SELECT round(avg(completeness), 2), count(*) FILTER (WHERE age_bracket_source = 'imputed_model') "
            "FROM user_profiles"
        ).fetchall()[0]
        groups = con.execute(
            "SELECT id || ' ' || name || ' (' || round(100 * share, 1) || '%)' FROM segment_catalog "
            "WHERE level = 'segment' ORDER BY people DESC"
        ).fetchall()
        stamped = con.execute(
            "SELECT count(*) FROM duckdb_columns() WHERE table_name = 'snapshot_info' AND column_name = 'engine'"
        ).fetchall()[0][0]
        engine = con.execute("SELECT engine FROM snapshot_info").fetchall()[0][0] if stamped else "duckdb"
    if before is None:
        this_run = []
    elif files == before[0]:
        this_run = ["No new files in landing; profiles unchanged."]
    else:
        this_run = [f"This run: {files - before[0]} new files, {(lines or 0) - before[1]} lines read."]
    return "\n".join(
        [
            *this_run,
            f"Built on:           {engine}"
            + (" (the event-scale stages; the rest on DuckDB)" if engine != "duckdb" else ""),
            "Totals in the snapshot (every run so far):",
            f"Files ingested:     {files}",
            f"Lines read:         {lines or 0}",
            f"Events kept:        {kept or 0}",
            f"Lines quarantined:  {quarantined or 0}",
            *([f"  by reason: {_listed([f'{r} {n}' for r, n in reasons])}"] if reasons else []),
            *(f"  unreadable: {name} ({detail})" for name, detail in unreadable[:LISTED]),
            *(
                f"  nothing kept of {name}: all {n} lines quarantined ({why})"
                + (f"; {NOTHING_KEPT_HINTS[why.split()[0]]}" if why.split()[0] in NOTHING_KEPT_HINTS else "")
                for name, n, why in nothing_kept[:LISTED]
            ),
            f"Re-delivered copies:{duplicates or 0:>7}",
            *([f"Forgotten people's lines: {forgotten} (suppressed or erased)"] if forgotten else []),
            f"Identities seen:    {anons} anonymousIds, {users} userIds",
            f"People:             {people} ({sparse} sparse, {bots} bots; all kept)",
            f"Profiles:           {people}"
            + (f" (mean completeness {completeness}; {imputed} age brackets imputed)" if people else ""),
            f"Segments:           {len(groups)}",
            *(f"  {g[0]}" for g in groups),
            f"Query the snapshot: {path}",
            '  persona query "SELECT segment_name, age_bracket, count(*) AS people FROM user_profiles '
            'GROUP BY ALL ORDER BY ALL"',
            "  persona profile <person_id, email, phone, userId or anonymousId>",
            "  persona sql        (an interactive read-only SQL shell on the snapshot)",
        ]
    )


def truth_dir(out: Path) -> Path:
    """Where the generator's ground truth goes: beside the event files, never among them (it
    holds raw emails and phones, which must not sit in landing)."""
    out = out.resolve()
    return out.with_name(out.name + "_truth")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.people < 1:
        raise Stop(f"--people must be at least 1, got {args.people}.")
    if args.people_per_file is not None and args.people_per_file < 1:
        raise Stop(f"--people-per-file must be at least 1, got {args.people_per_file}.")
    from persona_assets.datagen import generate

    out = Path(args.out) if args.out else writable_home() / "landing"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Stop(f"cannot write event files to {out} ({exc.strerror or exc}); choose another --out.") from None
    counts = generate(args.people, args.seed, out, args.format, args.people_per_file, truth_dir=truth_dir(out))
    print(f"wrote {counts['lines']} lines ({counts['events']} events) in {counts['files']} files to {out}")
    print(f"ground truth (raw emails and phones, for tests) in {truth_dir(out)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if use_settings(args.config):
        return 2
    home = writable_home()
    selection = [s.strip() for s in args.select.split(",") if s.strip()] if args.select else None
    if not (home / "warehouse.duckdb").exists() and not has_event_files(home / "landing"):
        from persona_assets.automation import not_read_line

        unread = not_read_line(home / "landing")
        where = "is empty" if (home / "landing").is_dir() else "does not exist"
        if unread:
            where = f"holds no event file ({unread})"
        raise Stop(
            f"nothing to build: {home / 'landing'} {where}. Put Segment event files there (JSON lines, "
            "CSV or Parquet), or `persona generate --people 1000` for synthetic ones; then `persona run`.",
            code=1,
        )
    before = snapshot_totals() or (0, 0)
    ok = materialize(selection)
    if ok and snapshot_path().exists():
        print(summary(before))
    return 0 if ok else 1


def has_event_files(landing: Path) -> bool:
    from persona_assets.core.ingest import landing_files

    return bool(landing_files(landing))


def cmd_retrain(args: argparse.Namespace) -> int:
    if use_settings(None):
        return 2
    ok = materialize(job_name="retrain_models")
    if ok:
        print(summary())
    return 0 if ok else 1


def cmd_stream(args: argparse.Namespace) -> int:
    from persona_assets import stream

    server = None
    home = writable_home()
    if args.start_redis:
        server, args.redis = stream.start_redis(home / "redis")
        (home / "redis" / "url").write_text(args.redis)
        print(f"redis-server on {args.redis} (PERSONA_REDIS_URL for other shells; persona publish finds it)")
    client = redis_client(args.redis)
    opts = stream.ConsumerOptions(
        batch=args.batch,
        flush_seconds=args.flush_seconds,
        flush_events=args.flush_events,
        claim_idle_ms=args.claim_idle_ms,
        query_seconds=args.query_seconds,
    )
    name = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
    print(f"consuming {stream.STREAM} as {name}; flushing to {home / 'landing'} every {args.flush_seconds:g} s")
    live = live_audiences(client, home)
    try:
        worker = stream.run(
            client,
            home / "landing",
            home / "serving" / "persona.duckdb",
            name,
            opts,
            max_events=args.max_events,
            audiences=live,
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
            (home / "redis" / "url").unlink(missing_ok=True)
    print(f"applied {worker.applied}, already applied {worker.skipped}, quarantined {worker.quarantined}")
    return 0


def live_audiences(client, home: Path):
    """The audiences the consumer decides per event (None when none can be), said on stdout."""
    from persona_assets.core import audience_definitions
    from persona_assets.settings import SettingsError, settings_path
    from persona_assets.stream_audiences import LiveAudiences

    try:
        definitions = audience_definitions.load(home, settings_path(home))
    except (audience_definitions.DefinitionsError, SettingsError) as exc:
        raise Stop(f"the audience definitions cannot be used:\n{exc}") from None
    live = LiveAudiences(client, definitions)
    if not live.audiences:
        return None
    later = sorted(set(definitions.audiences) - set(live.audiences))
    print(
        f"audiences decided per event: {', '.join(live.audiences)} (entries and exits on persona:audience_changes)"
        + (f"; at the next batch run: {', '.join(later)}" if later else "")
    )
    return live


def redis_client(url: str | None):
    """A client of the Redis at `url` (default: the configured one) that has answered a ping."""
    import redis

    from persona_assets import stream

    url = url or stream.redis_url(persona_home())
    client = stream.connect(url)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        raise Stop(
            f"no Redis answers at {url} ({exc}). Start one with `persona stream --start-redis` "
            "(or `make stream`), or pass --redis URL."
        ) from None
    return client


def cmd_publish(args: argparse.Namespace) -> int:
    from persona_assets import stream

    path = Path(args.file)
    if not path.is_file():
        raise Stop(f"no file {path}: give a JSON-lines file of Segment events (e.g. one in PERSONA_HOME/landing).")
    sent = stream.publish(redis_client(args.redis), path, rate=args.rate, limit=args.limit)
    print(f"published {sent} events to {stream.STREAM}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    if use_settings(None):
        return 2
    ok = materialize(job_name="nightly_refresh")
    if ok:
        print(summary())
    return 0 if ok else 1


def cmd_failures(args: argparse.Namespace) -> int:
    import duckdb

    path = persona_home() / "ops.duckdb"
    if not path.exists():
        print("no failed runs recorded")
        return 0
    with duckdb.connect(str(path), read_only=True) as con:
        result = con.execute(
            "SELECT failed_at, job_name, run_id, failed_steps, landing_file, error FROM run_failures "
            "ORDER BY failed_at DESC LIMIT ?",
            [args.limit],
        )
        columns = [d[0] for d in result.description]
        rows = result.fetchall()
    if not rows:
        print("no failed runs recorded")
    for row in rows:  # one block per run: the error is long, a table would cut it
        for column, value in zip(columns, row, strict=True):
            print(f"{column:<13} {_plain(value)}")
        print()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from persona_assets.datagen import generate

    landing = writable_home() / "landing"
    if not any(landing.glob(f"events-s{args.seed}-*")):
        print(f"Generating {args.people} people (seed {args.seed}) into {landing} ...")
        generate(args.people, args.seed, landing, args.format, truth_dir=truth_dir(landing))
    else:
        print(f"Demo data for seed {args.seed} already in {landing}; ingesting only what is new.")
    before = snapshot_totals() or (0, 0)
    if not materialize():
        return 1
    print(summary(before))
    return 0


def open_snapshot_or_stop(path: Path | None = None):
    """The locked-down snapshot connection, or a Stop saying why there is none."""
    from persona_assets.core.publish import NotASnapshot, open_snapshot

    try:
        return open_snapshot(path or snapshot_path())
    except (FileNotFoundError, NotASnapshot) as exc:
        raise Stop(str(exc)) from None


def sql_error(exc: Exception) -> str:
    """A DuckDB error as one line a user reads: refusals of the locked-down connection said as such."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "disabled by configuration" in message or "disabled through configuration" in message:
        return f"refused: the snapshot connection reads the snapshot only, no other file or extension ({message})"
    if "configuration has been locked" in message:
        return f"refused: settings cannot be changed on the snapshot connection ({message})"
    if "read-only mode" in message:
        return f"refused: the snapshot is read-only ({message})"
    return f"query failed: {message}"


def run_statements(con, sql: str, fmt: str = "table", max_rows: int = 50) -> None:
    """Run each statement of `sql` and print each one's result (a header names the statement
    when there are several). Stop on an empty string or the first error."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise Stop(sql_error(exc)) from None
    if not statements:
        raise Stop('empty query: give a SQL statement, e.g. persona query "SELECT count(*) FROM user_profiles"')
    if len(statements) > 1 and fmt != "table":
        raise Stop(f"{len(statements)} statements given: --format {fmt} prints one result, so give one statement.")
    for statement in statements:
        if len(statements) > 1:
            print(f"-- {statement.query.strip().rstrip(';')};")
        try:
            if fmt == "table":
                result = con.sql(statement.query)  # a relation: DuckDB's own table rendering
                result.show(max_rows=max_rows) if result is not None else print("ok")
            else:
                result = con.execute(statement.query)
                columns = [d[0] for d in result.description or []]
                write_csv(result, columns) if fmt == "csv" else write_json(result, columns)
        except duckdb.Error as exc:
            raise Stop(sql_error(exc)) from None


def write_csv(result, columns: list[str]) -> None:
    import csv

    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(columns)
    while batch := result.fetchmany(10_000):
        out.writerows([safe_cell(v) for v in row] for row in batch)


def write_json(result, columns: list[str]) -> None:
    import json

    rows = [dict(zip(columns, row, strict=True)) for row in result.fetchall()]
    print(json.dumps(rows, default=_json_value, ensure_ascii=False))


def _json_value(value):
    """Dates and times as ISO text, decimals as numbers, anything else as its text."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if type(value).__name__ == "Decimal":
        return float(value)
    return str(value)


def cmd_query(args: argparse.Namespace) -> int:
    with open_snapshot_or_stop(Path(args.snapshot) if args.snapshot else None) as con:
        run_statements(con, args.sql, args.format, args.max_rows)
    return 0


SQL_HELP = """Read-only SQL on the serving snapshot. End each statement with ';'.
  .tables          the tables you can query
  .schema TABLE    a table's columns
  .quit            leave (or Ctrl-D)"""


def cmd_sql(args: argparse.Namespace) -> int:
    """An interactive SQL shell on the snapshot, with the same locked-down connection as
    `persona query`; statements from stdin when it is not a terminal (a script, a pipe)."""
    with open_snapshot_or_stop(Path(args.snapshot) if args.snapshot else None) as con:
        if not sys.stdin.isatty():
            run_statements(con, sys.stdin.read(), "table", args.max_rows)
            return 0
        _shell(con, args.max_rows, Path(args.snapshot) if args.snapshot else snapshot_path())
    return 0


def _shell(con, max_rows: int, path: Path) -> None:
    import contextlib

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    print(f"persona sql on {path} (read-only); .help for help")
    pending = ""
    while True:
        try:
            line = input("persona> " if not pending else "    ...> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            pending = ""
            continue
        command = line.strip()
        if not pending and command.startswith("."):
            if command in (".quit", ".exit", ".q"):
                return
            if command == ".tables":
                pending = "SELECT table_name FROM duckdb_tables() ORDER BY 1;"
            elif command.startswith(".schema "):
                pending = f"DESCRIBE {_quoted(command.split(maxsplit=1)[1].rstrip(';'))};"
            else:
                print(SQL_HELP)
                continue
            line = command = pending
        else:
            pending += line + "\n"
        if command.endswith(";"):
            try:
                run_statements(con, pending, "table", max_rows)
            except Stop as exc:
                print(exc, file=sys.stderr)
            pending = ""


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# A text cell a spreadsheet would run as a formula (=, +, -, @, or a tab or carriage return first).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """A text cell that starts like a formula prefixed by a quote, as spreadsheets expect
    (OWASP's advice against CSV injection); numbers stay numbers."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def spreadsheet_safe(frame):
    """The frame with each text cell made `safe_cell`."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(safe_cell)
    return out


def cmd_profile(args: argparse.Namespace) -> int:
    from persona_assets.core.pii import load_key
    from persona_assets.core.publish import find_person

    with open_snapshot_or_stop(Path(args.snapshot) if args.snapshot else None) as con:
        people = find_person(con, args.who, load_key(persona_home()))
        if not people:
            print(f"no profile found for {args.who!r}", file=sys.stderr)
            return 1
        for person_id in people:
            result = con.execute("SELECT * FROM user_profiles WHERE person_id = ?", [person_id])
            columns = [d[0] for d in result.description]
            found = result.fetchone()
            row = dict(zip(columns, found, strict=True)) if found else {"person_id": person_id}
            row.update(_live(person_id, row))
            width = max(len(c) for c in row)
            for column, value in row.items():
                print(f"{column:<{width}}  {_plain(value)}")
            if args.events:
                print_history(con, person_id, args.events)
            if len(people) > 1:
                print()
    return 0


IDENTIFIERS_SHOWN = 50


def print_history(con, person_id: str, limit: int) -> None:
    """The identifiers merged into a person and their latest `limit` events, newest first (events
    are the person's when one of their userIds or anonymousIds sent them)."""
    ids = con.execute(
        "SELECT identifier_type, identifier FROM identity_map WHERE person_id = ? ORDER BY 1, 2", [person_id]
    ).fetchall()
    print(f"\nidentifiers merged into {person_id} ({len(ids)}; email and phone as keyed hashes):")
    for kind, identifier in ids[:IDENTIFIERS_SHOWN]:
        print(f"  {kind:<13} {identifier}")
    if len(ids) > IDENTIFIERS_SHOWN:
        print(f"  ... and {len(ids) - IDENTIFIERS_SHOWN} more")
    events = con.execute(
        """WITH ids AS (SELECT identifier_type, identifier FROM identity_map WHERE person_id = $person)
           SELECT event_at, event_type, event_name, category, product_id, revenue, page_url, search_query
           FROM raw_events
           WHERE user_id IN (SELECT identifier FROM ids WHERE identifier_type = 'user_id')
              OR anonymous_id IN (SELECT identifier FROM ids WHERE identifier_type = 'anonymous_id')
           ORDER BY event_at DESC, message_id LIMIT $limit""",
        {"person": person_id, "limit": limit},
    ).fetchall()
    print(f"\nlatest {len(events)} events, newest first:")
    for at, kind, name, category, product, revenue, page, search in events:
        what = [
            name or page or "",
            *(
                f"{k}={v}"
                for k, v in (("category", category), ("product", product), ("revenue", revenue), ("search", search))
                if v is not None
            ),
        ]
        print(f"  {at:%Y-%m-%d %H:%M:%S}  {kind:<8}  {'  '.join(w for w in what if w)}")


def _live(person_id: str, batch: dict) -> dict:
    """With a stream configured (PERSONA_REDIS_URL), the hot profile over the batch one: the
    newer of each time, the live session, and category affinity decayed to now."""
    if not os.environ.get("PERSONA_REDIS_URL") and not (persona_home() / "redis" / "url").exists():
        return {}
    import redis

    from persona_assets import stream

    try:  # a client made here, not by stream.connect(), which would import the stage settings (Dagster)
        return live_fields(redis.Redis.from_url(stream.redis_url(persona_home())), person_id, batch)
    except Exception as exc:  # the stream is optional: say so, show the batch profile
        return {"live": f"hot store unreachable: {exc}"}


def live_fields(client, person_id: str, batch: dict) -> dict:
    """The hot profile in `client` over the batch profile `batch` (also the profile API's live fields)."""
    from persona_assets import stream

    hot = stream.hot_profile(client, person_id)
    if not hot:
        return {"live": "no streamed events for this person"}

    def later(a, b):
        return max((v for v in (a, b) if v is not None and v == v), default=None)

    return {
        "last_seen_at": later(batch.get("last_seen_at"), hot["last_seen_at"]),
        "last_order_at": later(batch.get("last_order_at"), hot["last_order_at"]),
        "live_events_streamed": hot["events"],
        "live_orders_streamed": hot["orders"],
        "live_days_since_last_order": hot["days_since_last_order"],
        "live_session_started_at": hot["session_started_at"],
        "live_session_events": hot["session_events"],
        "live_category_affinity": {c: round(v, 6) for c, v in hot["category_affinity"].items()},
        "live_top_category": hot["top_category"],
    }


def _plain(value) -> str:
    """One profile field as a person reads it: maps by weight, lists joined, numbers short."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: -kv[1] if isinstance(kv[1], int | float) else 0)
        return ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in items) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if value is None or value != value:  # NULL or NaN
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the settings in force: the file's values over the defaults, as YAML."""
    import yaml

    from persona_assets.settings import SettingsError, effective_settings, load_settings, settings_path

    try:
        path = settings_path(persona_home(), args.config)
        settings = load_settings(path)
    except SettingsError as exc:
        print(f"persona: {exc}", file=sys.stderr)
        return 2
    print(f"# settings in force: {path or 'the defaults (no ' + str(persona_home() / 'persona.yaml') + ')'}")
    effective = effective_settings(settings)
    for section, values in effective.items():
        changed = settings.get(section, {})
        print(f"{section}:")
        for key, value in values.items():
            mark = "  # from the file" if key in changed else ""
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=200).strip()[1:-1]
            print(f"  {text}{mark}")
    if settings.get("mappings"):
        print("mappings:")
        for mapping in settings["mappings"]:
            print(f"  - files: {mapping.files!r}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`persona serve`: the tracking and profile API (persona_assets/server), until Ctrl-C or SIGTERM."""
    from dataclasses import replace

    from persona_assets.server.app import durability, serve
    from persona_assets.server.config import ServerSettingsError, load

    home = writable_home()
    try:
        settings = load(home, Path(args.config) if args.config else None)
        durability(home, settings)
    except ServerSettingsError as exc:
        raise Stop(str(exc)) from None
    chosen = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = replace(settings, **chosen)
    try:
        serve(home, settings)
    except OSError as exc:
        raise Stop(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}); pass --port (or --host)"
        ) from None
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    if use_settings(args.config):
        return 2
    writable_home()
    home = dagster_home()
    exe = shutil.which("dagster") or str(Path(sys.executable).with_name("dagster"))
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    cmd = [exe, "dev", "-h", args.host, "-p", str(args.port)]
    cmd += ["-w", str(workspace)] if workspace.exists() else ["-m", "persona_assets.definitions"]
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home})")
    os.execv(exe, cmd)
    return 0


def _writer(path: Path, wait_seconds: float):
    """The warehouse's one writer connection, waiting while a run holds it."""
    import time

    import duckdb

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return duckdb.connect(str(path))
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise SystemExit(f"The warehouse is busy ({exc}); try again when the run has finished.") from None
            time.sleep(1.0)


def _forget_redis(home: Path, skip: bool):
    """The Redis that holds this home's hot store: the running one, or (when only its
    append-only files are left) one started on them for the erasure. (client, server or None)."""
    from persona_assets import stream

    if skip:
        return None, None
    url = os.environ.get(stream.REDIS_ENV) or (
        (home / "redis" / "url").read_text().strip() if (home / "redis" / "url").exists() else None
    )
    if url:
        client = stream.connect(url)
        try:
            client.ping()
        except Exception as exc:
            raise SystemExit(
                f"Redis at {url} holds hot profiles but does not answer ({exc}). Start it, "
                "or pass --skip-redis to erase everything else now."
            ) from None
        return client, None
    if (home / "redis").is_dir() and any((home / "redis").iterdir()):
        server, url = stream.start_redis(home / "redis")
        return stream.connect(url), server
    return None, None


def cmd_forget(args: argparse.Namespace) -> int:
    import duckdb

    from persona_assets import stream
    from persona_assets.assets.serving import INDEXED, published_tables
    from persona_assets.core import erasure, spark_stages
    from persona_assets.core.pii import load_key
    from persona_assets.core.publish import publish_snapshot, spare_path

    home = persona_home()
    path = home / "warehouse.duckdb"
    if not path.exists():
        print(f"No warehouse at {path}: nothing to forget.", file=sys.stderr)
        return 1
    key = load_key(home)
    if args.dry_run:
        return forget_plan(path, key, args.who, args.wait)
    client, server = _forget_redis(home, args.skip_redis)
    done = []  # (who, report, Redis counts)
    parquet: list[str] = []  # Spark's Parquet tables rewritten
    parquet_failed = ""
    try:
        con = _writer(path, args.wait)
        try:
            for who in args.who:  # each its own transaction; the snapshot and compaction once at the end
                report = erasure.plan(con, key, who)
                hot = stream.forget(client, key, report) if client is not None else None
                erasure.erase(con, key, report, home / "landing")
                done.append((who, report, hot))
            engine = engine_options(home)
            snapshot = home / "serving" / "persona.duckdb"
            spare_path(snapshot).unlink(missing_ok=True)  # an older snapshot, kept for the next publish
            if snapshot.exists():  # written afresh: no copy of the old file, so no old rows in its free blocks
                publish_snapshot(
                    con, snapshot, published_tables(con), run_id="forget", indexes=INDEXED, engine=engine.name
                )
            # Spark's Parquet warehouse (engine: spark, now or before): the same people gone from it.
            touched = {"ingest_files", *(t for _, report, _ in done for t in report.rows)}
            try:
                parquet = spark_stages.forget_in_parquet(con, engine.warehouse(home), touched)
            except (OSError, duckdb.Error) as exc:
                parquet_failed = f"{engine.warehouse(home)}: {exc}"
        finally:
            con.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    saved = erasure.compact(path) if not args.no_compact else 0
    for who, report, hot in done:
        if not report.people and not report.message_ids:
            print(
                f"Nobody was found for {who!r}: nothing stored was erased. The identifier is logged (as a keyed "
                "hash), so future events from it will be dropped."
            )
            continue
        found = f"{len(report.people)} person(s)" if report.people else "no stored person (logged for suppression)"
        print(
            f"Forgot {who!r}: {found}, {report.identifiers} identifiers, {report.events} events, "
            f"{report.quarantined_lines} quarantined lines, {report.landing_lines} landing lines in "
            f"{report.landing_files} files."
        )
        for table, n in sorted(report.rows.items()):
            print(f"  {table}: {n} rows")
        if hot is not None:
            print(
                f"  Redis: {hot['hot_keys']} hot keys, {hot['stream_entries']} stream entries, {hot['seen']} messageIds"
            )
    if parquet:
        print(f"Spark's Parquet warehouse: {', '.join(parquet)} rewritten without them.")
    if parquet_failed:
        print(
            f"Spark's Parquet warehouse could not be rewritten ({parquet_failed}); the next stage run on "
            "Spark rewrites it before it reads anything.",
            file=sys.stderr,
        )
    if not args.no_compact:
        print(f"Warehouse compacted ({saved / 1e6:.1f} MB freed); snapshot republished.")
    print("Later events for these identifiers are suppressed until one arrives with personalization consent.")
    return 0


def forget_plan(path: Path, key: bytes, who: list[str], wait: float) -> int:
    """`persona forget --dry-run`: what forgetting each identifier would erase, with nothing changed
    (the plan is made in a transaction that is rolled back)."""
    from persona_assets.core import erasure

    con = _writer(path, wait)
    try:
        for value in who:
            con.execute("BEGIN TRANSACTION")
            try:
                report = erasure.plan(con, key, value)
                quarantined = con.execute("SELECT count(*) FROM _forget_quarantine").fetchall()[0][0]
            finally:
                con.execute("ROLLBACK")
            if not report.people and not report.message_ids:
                print(
                    f"Nobody was found for {value!r}: nothing stored would be erased; forgetting it would log "
                    "the identifier so that future events from it are dropped."
                )
                continue
            print(
                f"Would forget {value!r}: {len(report.people)} person(s) ({', '.join(report.people)}), "
                f"{report.identifiers} identifiers, {len(report.message_ids)} events, {quarantined} quarantined "
                "lines, and their lines in landing files."
            )
    finally:
        con.close()
    print("Dry run: nothing was changed.")
    return 0


def person_assets() -> list[str]:
    """The assets identity feeds, down to the snapshot: what a merge or unmerge rebuilds."""
    import dagster as dg

    from persona_assets.definitions import build_definitions

    graph = build_definitions(persona_home()).resolve_asset_graph()
    return sorted(k.to_user_string() for k in dg.AssetSelection.assets("deduped_users").downstream().resolve(graph))


def apply_decision(args: argparse.Namespace, decide) -> int:
    """`persona merge` and `persona unmerge`: record the decision with the warehouse's one writer
    connection (waiting while a run holds it), then rebuild the affected people in every person
    table and republish the snapshot, as a run of the assets identity feeds (identity finds them)."""
    import getpass

    from persona_assets.core import overrides
    from persona_assets.core.pii import load_key
    from persona_assets.core.publish import open_snapshot

    if use_settings(None):
        return 2
    home = persona_home()
    path = home / "warehouse.duckdb"
    if not path.exists():
        raise Stop(f"No warehouse at {path}: nobody to merge or split yet. Run `persona run` first.", code=1)
    key = load_key(home)
    con = _writer(path, args.wait)
    try:
        decision = decide(con, key, args.by or getpass.getuser())
    except overrides.OverrideError as exc:
        raise Stop(str(exc), code=1) from None
    finally:
        con.close()
    print(decision_text(decision))
    print("Rebuilding the people it touches in every person table and the snapshot...")
    if not materialize(person_assets()):
        print(
            f"persona: decision #{decision.override_id} is recorded and applies on the next run (persona run).",
            file=sys.stderr,
        )
        return 1
    with open_snapshot(snapshot_path()) as snap:
        now = overrides.where_now(snap, decision)
        changes = overrides.changes_since(snap, decision, [decision.person_id, *{p for _, _, p in now if p}])
    print(outcome_text(decision, now, changes))
    return 0


def decision_text(decision) -> str:
    undoes = f" It undoes decision {', '.join(f'#{i}' for i in decision.revoked)}." if decision.revoked else ""
    if decision.action == "take_out":
        what = f"{_shown(*decision.parts[0])} is taken out of {decision.person_id} and will link nobody again"
    elif decision.action == "keep_apart":
        what = (
            f"{decision.person_id} is split into its {len(decision.parts)} groups of identifiers seen together; "
            "no match or merge will join them again"
        )
    else:
        what = f"{_shown(*decision.parts[0])} and {_shown(*decision.parts[1])} are one person from now on"
    return f"Decision #{decision.override_id} ({decision.kind}): {what}.{undoes}"


def outcome_text(decision, now: list[tuple[str, str, str | None]], changes: list[tuple]) -> str:
    people = sorted({p for _, _, p in now if p})
    lines = [f"  {old} -> {new}: {change}, {n} identifier(s) moved" for old, new, change, n in changes]
    lines = ["person_id_history:", *lines] if lines else []
    lines.append("Now, in the snapshot:")
    for kind, identifier, person in now:
        lines.append(f"  {_shown(kind, identifier)}: {person or 'nobody (kept out of linking)'}")
    if decision.action == "join":
        lines.append(f"Undo with: persona unmerge {people[0]}" if len(people) == 1 else "")
    elif decision.action == "keep_apart" and len(people) > 1:
        lines.append(
            f"Undo with: persona merge {people[0]} {people[1]}" + (" (and the others)" if len(people) > 2 else "")
        )
    return "\n".join(line for line in lines if line)


def _shown(kind: str, identifier: str) -> str:
    return f"{kind}:{identifier}" if kind not in ("email", "phone") else f"{kind} (keyed hash {identifier[:12]}...)"


def cmd_unmerge(args: argparse.Namespace) -> int:
    from persona_assets.core import overrides

    return apply_decision(
        args, lambda con, key, by: overrides.unmerge(con, key, args.person, args.identifier, by=by, reason=args.reason)
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from persona_assets.core import overrides

    return apply_decision(
        args, lambda con, key, by: overrides.merge(con, key, args.first, args.second, by=by, reason=args.reason)
    )


def _audience_definitions(con):
    """The audience definitions in force, checked against the snapshot's events and segments (a Stop if not usable)."""
    from persona_assets.core import audience_definitions
    from persona_assets.core.audiences import vocabulary
    from persona_assets.settings import SettingsError, settings_path

    try:
        settings = settings_path(persona_home())
        return audience_definitions.load(persona_home(), settings, vocabulary(con))
    except (audience_definitions.DefinitionsError, SettingsError) as exc:
        raise Stop(f"the audience definitions cannot be used:\n{exc}") from None


def _has_tables(con, *tables: str) -> bool:
    found = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    return set(tables) <= found


def cmd_audience(args: argparse.Namespace) -> int:
    from persona_assets.core.audiences import explain

    with open_snapshot_or_stop(Path(args.snapshot) if args.snapshot else None) as con:
        definitions = _audience_definitions(con)
        if args.name not in definitions.audiences:
            raise Stop(f"no audience named {args.name!r}; audiences: {', '.join(definitions.audiences) or '(none)'}")
        if not _has_tables(con, "audience_members", "audience_runs", "computed_traits", "user_profiles"):
            raise Stop("the snapshot has no audiences yet: run `persona run` first")
        audience = definitions.audiences[args.name]
        last = con.execute(
            "SELECT evaluated_at, size, entered, exited, definition FROM audience_runs WHERE audience = ? "
            "ORDER BY evaluated_at DESC LIMIT 1",
            [args.name],
        ).fetchall()
        print(f"{args.name}: {audience.description or '(no description)'}  [{definitions.source}:{audience.line}]")
        if not last:
            print("not evaluated yet: run `persona run`")
            return 0
        at, size, entered, exited, used = last[0]
        print(f"{size} members at the run of {at:%Y-%m-%d %H:%M:%S} UTC ({entered} entered, {exited} exited)")
        if used != audience.definition_json():
            print("note: the definition changed since that run; the explanation below uses the file as it is now")
        if args.person:
            return _explain_people(con, definitions, args.name, args.person, explain)
        rows = con.execute(
            "SELECT person_id, entered_at FROM audience_members WHERE audience = ? ORDER BY entered_at, person_id "
            "LIMIT ?",
            [args.name, args.limit],
        ).fetchall()
        for person_id, entered_at in rows:
            print(f"  {person_id}  since {entered_at:%Y-%m-%d %H:%M:%S}")
        if size > len(rows):
            print(f"  ... and {size - len(rows)} more (--limit N)")
    return 0


def _explain_people(con, definitions, name: str, who: str, explain) -> int:
    from persona_assets.core.pii import load_key
    from persona_assets.core.publish import find_person

    people = find_person(con, who, load_key(persona_home()))
    if not people:
        print(f"no profile found for {who!r}", file=sys.stderr)
        return 1
    for person_id in people:
        member = con.execute(
            "SELECT entered_at FROM audience_members WHERE audience = ? AND person_id = ?", [name, person_id]
        ).fetchall()
        print(f"{person_id} is {'IN since ' + f'{member[0][0]:%Y-%m-%d %H:%M:%S}' if member else 'OUT'}:")
        for reason in explain(con, definitions, name, person_id):
            value = "" if reason.value is None and "trait" not in reason.text else f"  (value: {_plain(reason.value)})"
            print(f"{'  ' * reason.depth}{'holds' if reason.holds else 'fails'}  {reason.text}{value}")
    return 0


def cmd_destinations(args: argparse.Namespace) -> int:
    from persona_assets.core.destinations import lag

    with open_snapshot_or_stop(Path(args.snapshot) if args.snapshot else None) as con:
        definitions = _audience_definitions(con)
        if not definitions.destinations:
            print("no destinations defined (audiences.yaml destinations:)")
            return 0
        if not _has_tables(con, "destination_deliveries", "destination_dead_letters", "audience_changes"):
            raise Stop("the snapshot has no deliveries yet: run `persona run` first")
        for row in lag(con, definitions):
            success = f"{row['last_success_at']:%Y-%m-%d %H:%M:%S}" if row["last_success_at"] else "never"
            print(
                f"{row['destination']} ({row['kind']}): {row['delivered']} delivered, {row['pending']} pending "
                f"(oldest {row['lag_seconds']:.0f} s), {row['failed_attempts']} failed attempts, "
                f"{row['dead_letters']} dead letters, last success {success}"
            )
            if row["last_error"]:
                print(f"  last error: {row['last_error']}")
    return 0


def _counts(text: str) -> list[int]:
    """A comma-separated list of positive counts (argparse says which is not one)."""
    counts = [int(part) for part in text.split(",") if part.strip()]
    if any(count <= 0 for count in counts):
        raise ValueError(text)
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write synthetic Segment events with ground truth")
    p.add_argument("--people", type=int, default=DEMO_PEOPLE)
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--out", help="folder for the event files (default PERSONA_HOME/landing)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "jsonl.gz", "csv", "parquet"])
    p.add_argument("--people-per-file", type=int)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("run", help="materialize the asset graph in-process")
    p.add_argument("--select", help="comma-separated asset keys (default: all)")
    p.add_argument("--config", help="settings file (default PERSONA_HOME/persona.yaml when present)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("config", help="print the settings in force (the settings file over the defaults)")
    p.add_argument("--config", help="settings file (default PERSONA_HOME/persona.yaml when present)")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser(
        "retrain", help="refit the feature transform and retrain the models now (as the weekly schedule)"
    )
    p.set_defaults(fn=cmd_retrain)

    p = sub.add_parser("stream", help="consume the Redis stream: hot profiles per event, flushed to landing")
    p.add_argument("--redis", help="redis URL (default PERSONA_REDIS_URL, the one --start-redis started, or :6379)")
    p.add_argument("--consumer", help="consumer name in the group (default host-pid)")
    p.add_argument("--start-redis", action="store_true", help="start Debian's redis-server on a free port first")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--flush-seconds", type=float, default=10.0)
    p.add_argument("--flush-events", type=int, default=50_000)
    p.add_argument("--max-events", type=int, help="stop after this many events (for tests and benchmarks)")
    p.add_argument("--claim-idle-ms", type=int, default=30_000, help="claim other consumers' entries pending this long")
    p.add_argument(
        "--query-seconds",
        type=float,
        default=0.5,
        help="longest wait of events the plain check leaves to the contract query (sooner when quiet)",
    )
    p.set_defaults(fn=cmd_stream)

    p = sub.add_parser("publish", help="push a JSON-lines file's events to the Redis stream")
    p.add_argument("file")
    p.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    p.add_argument("--limit", type=int)
    p.add_argument("--redis", help="redis URL (default PERSONA_REDIS_URL, the one --start-redis started, or :6379)")
    p.set_defaults(fn=cmd_publish)

    p = sub.add_parser("refresh", help="recompute every person from all events now (as the nightly schedule)")
    p.set_defaults(fn=cmd_refresh)

    p = sub.add_parser("failures", help="list failed runs the failure sensor recorded (PERSONA_HOME/ops.duckdb)")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(fn=cmd_failures)

    p = sub.add_parser("demo", help="generate demo data (once), materialize everything, print a summary")
    p.add_argument("--people", type=int, default=DEMO_PEOPLE)
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--format", default="jsonl", choices=["jsonl", "jsonl.gz", "csv", "parquet"])
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("query", help="run SQL on the read-only serving snapshot")
    p.add_argument("sql")
    p.add_argument(
        "--format",
        default="table",
        choices=["table", "csv", "json"],
        help="table: DuckDB's rendering, fitted to the terminal; csv or json: every column and row",
    )
    p.add_argument("--max-rows", type=int, default=50)
    p.add_argument("--snapshot", help="path of the snapshot (default PERSONA_HOME/serving/persona.duckdb)")
    p.set_defaults(fn=cmd_query)

    p = sub.add_parser("sql", help="an interactive read-only SQL shell on the serving snapshot (stdin when piped)")
    p.add_argument("--max-rows", type=int, default=50)
    p.add_argument("--snapshot", help="path of the snapshot (default PERSONA_HOME/serving/persona.duckdb)")
    p.set_defaults(fn=cmd_sql)

    p = sub.add_parser("profile", help="print one profile, by person_id, email, phone, userId, anonymousId or device")
    p.add_argument("who")
    p.add_argument(
        "--events",
        type=int,
        default=0,
        metavar="N",
        help="also the identifiers merged into the person and their latest N events",
    )
    p.add_argument("--snapshot", help="path of the snapshot (default PERSONA_HOME/serving/persona.duckdb)")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("forget", help="erase people everywhere (by email, phone, userId, anonymousId or person_id)")
    p.add_argument("who", nargs="+", help="one or more identifiers, each erasing the person it belongs to")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a running run to let go")
    p.add_argument("--skip-redis", action="store_true", help="leave the hot store alone (it is unreachable)")
    p.add_argument("--dry-run", action="store_true", help="print what would be erased; change nothing")
    p.add_argument(
        "--no-compact",
        action="store_true",
        help="skip rewriting the warehouse file (faster; "
        "deleted rows may stay in its free blocks until the next compaction)",
    )
    p.set_defaults(fn=cmd_forget)

    p = sub.add_parser("unmerge", help="split a person wrongly merged (a match, a merge, or one identifier), for good")
    p.add_argument("person", help="the person: person_id, or an identifier as TYPE:VALUE (user_id:u1, email:...)")
    p.add_argument(
        "--identifier",
        metavar="TYPE:VALUE",
        help="take only this identifier out of the person (e.g. a shared device_id:...)",
    )
    p.add_argument("--reason", help="why, kept with the decision")
    p.add_argument("--by", help="who decided (default: this user's login name)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a running run to let go")
    p.set_defaults(fn=cmd_unmerge)

    p = sub.add_parser("merge", help="make two people one, for good (person_ids or TYPE:VALUE identifiers)")
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--reason", help="why, kept with the decision")
    p.add_argument("--by", help="who decided (default: this user's login name)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a running run to let go")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("serve", help="collect events from Segment SDKs over HTTP and serve profiles (127.0.0.1:8080)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1, or server.host in persona.yaml)")
    p.add_argument("--port", type=int, help="port (default 8080, or server.port; 0 picks a free one)")
    p.add_argument("--config", help="settings file (default PERSONA_HOME/persona.yaml when present)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("audience", help="an audience's members, or why one person is in or out of it")
    p.add_argument("name")
    p.add_argument("person", nargs="?", help="person_id, email, phone, userId or anonymousId: explain their membership")
    p.add_argument("--limit", type=int, default=20, help="members listed (default 20)")
    p.add_argument("--snapshot", help="path of the snapshot (default PERSONA_HOME/serving/persona.duckdb)")
    p.set_defaults(fn=cmd_audience)

    p = sub.add_parser("destinations", help="each destination's deliveries: pending changes, lag, failures")
    p.add_argument("--snapshot", help="path of the snapshot (default PERSONA_HOME/serving/persona.duckdb)")
    p.set_defaults(fn=cmd_destinations)

    p = sub.add_parser("ui", help="start the Dagster webserver and daemon")
    p.add_argument(
        "--config",
        help="settings file for every run the UI, sensors and schedules start "
        "(default PERSONA_HOME/persona.yaml when present)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser(
        "bench", help="time the whole graph, a refresh, look-ups (and stream, linkage) on generated data"
    )
    p.add_argument(
        "--scale",
        choices=["small", "1m", "20m"],
        help="a preset (events, linkage, segmentation) that also writes docs/benchmarks.md",
    )
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument(
        "--profile", action="store_true", help="sample each full-build stage with pyinstrument (docs/profiles/<scale>/)"
    )
    p.add_argument("--format", default="jsonl", choices=["jsonl", "jsonl.gz", "csv", "parquet"])
    p.add_argument("--workdir", help="where to generate and keep bench data (default PERSONA_HOME/bench)")
    p.add_argument(
        "--segment-people",
        type=_counts,
        default=[],
        help="resample the people to these counts (comma-separated, e.g. 1000000,4000000) and time the "
        "person-level stages (features, segments, imputation, profiles, serving) at each",
    )
    p.add_argument("--no-stream", dest="stream", action="store_false", help="skip the Redis stream benchmark")
    p.add_argument(
        "--server",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time persona serve against its floor (default: with --scale)",
    )
    p.add_argument("--keep", action="store_true", help="keep the bench warehouse and snapshot for inspection")
    p.add_argument(
        "--only",
        help="only these parts, comma-separated: server, stream (the server's reads use the "
        "snapshot a --keep run left in the workdir); with --scale, their figures replace that scale's",
    )
    p.add_argument(
        "--engine",
        choices=["duckdb", "spark"],
        default="duckdb",
        help="spark: also time the stages that run on Spark (local[*]) on the same inputs, beside DuckDB's",
    )
    p.add_argument(
        "--spark-stages",
        default="",
        help="with --engine spark: only these Spark stages, comma-separated (ingest, identity, cleaning, scores); "
        "default all",
    )
    p.add_argument(
        "--snapshot-copies",
        type=int,
        default=1,
        help="with --only server: each person of the kept snapshot this many times over (new person_ids "
        "and identifiers) before timing reads, for a bigger scale's identity map without building it",
    )
    p.add_argument(
        "--link-records",
        type=int,
        default=0,
        help="also time identity with probabilistic linkage on this many sign-ups",
    )
    p.add_argument(
        "--refresh-share",
        type=float,
        default=0.01,
        help="hold back this share of the newest events and time an incremental refresh with them (0: skip)",
    )
    p.set_defaults(fn=lambda a: __import__("persona_assets.bench", fromlist=["run"]).run(a))

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Stop as exc:
        print(f"persona: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # The reader went away (`persona profile ... | head`): nothing more to say. Point stdout
        # at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
