"""`persona bench`: ingestion time and peak memory on generated data, against a DuckDB floor.

Each measured step runs in its own process so its peak memory is its own; the floor and
the ingestion run in the same bench run so their ratio is fair on a noisy machine.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from persona_assets.settings import persona_home

EVENTS_PER_PERSON = 32  # what the generator makes on average
STAGES = ("identity", "cleaning", "segmentation", "profiles", "serving")


FLOOR = """
import duckdb, sys
con = duckdb.connect()
sql = (
    "SELECT count(*) FROM (SELECT anonymousId, count(*) FROM read_json(?, format='newline_delimited', "
    "ignore_errors=true, columns={'anonymousId': 'VARCHAR'}) GROUP BY 1)"
)
print(con.execute(sql, [sys.argv[1]]).fetchall()[0][0])
"""

INGEST = """
import duckdb, sys, json
from pathlib import Path
from persona_assets.core.ingest import ingest
from persona_assets.core.warehouse import connection_config
con = duckdb.connect(sys.argv[2], config=connection_config())
r = ingest(con, Path(sys.argv[1]), b"bench-key")
print(json.dumps({"lines": r.total("lines_read"), "kept": r.total("events_kept"),
                  "quarantined": r.total("lines_quarantined"), "duplicates": r.total("duplicates")}))
"""


STAGE = """
import duckdb, sys
from pathlib import Path
from persona_assets.assets.serving import APPEND_ONLY, published_tables
from persona_assets.core import features, imputation, profiles, segments
from persona_assets.core.cleaning import clean
from persona_assets.core.identity import resolve
from persona_assets.core.models import ModelStore
from persona_assets.core.publish import publish_snapshot
from persona_assets.core.warehouse import connection_config
from persona_assets.settings import shipped_enrichment
con = duckdb.connect(sys.argv[1], config=connection_config())
store = ModelStore(Path(sys.argv[1]).with_name("bench-models"))
full = sys.argv[3] == "full"  # a full build trains the models; a refresh uses them
traits = imputation.ImputationOptions(enrichment_path=str(shipped_enrichment()))
steps = {
    "identity": lambda: resolve(con, full=full).mode,
    "cleaning": lambda: clean(con, full=full)["mode"],
    "segmentation": lambda: (features.build(con, store, features.FeatureOptions(), refit=full, full=full),
                             segments.build(con, store, segments.SegmentOptions(), retrain=full, full=full))[1]["mode"],
    "profiles": lambda: (imputation.impute(con, store, traits, retrain=full, full=full),
                         profiles.build(con, full=full))[1]["mode"],
    "serving": lambda: publish_snapshot(con, Path(sys.argv[1]).with_name("bench-serving.duckdb"), published_tables(),
                                        append=APPEND_ONLY),
}
if sys.argv[2] == "refresh":  # every stage in one process, as one Dagster run executes them
    import json, time
    took = {}
    for name in steps:
        started = time.perf_counter()
        steps[name]()
        took[name] = time.perf_counter() - started
    print(json.dumps(took))
else:
    print(steps[sys.argv[2]]())
"""

# Splits a generated data set: the newest `share` of events (by timestamp) become one new
# landing file, the rest the base. Lines without a readable timestamp stay in the base.
SPLIT = """
import re, sys
from pathlib import Path
source, base, new, share = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
stamp = re.compile(rb'"timestamp":"([^"]+)"')
files = sorted(source.glob("*.jsonl"))
sample = []
for f in files:
    with open(f, "rb") as fh:
        for i, line in enumerate(fh):
            if i % 50 == 0 and (m := stamp.search(line)):
                sample.append(m.group(1))
sample.sort()
cutoff = sample[int(len(sample) * (1 - share))]
base.mkdir(parents=True, exist_ok=True)
new.parent.mkdir(parents=True, exist_ok=True)
kept = moved = 0
with open(new, "wb") as out_new:
    for f in files:
        with open(f, "rb") as fh, open(base / f.name, "wb") as out_base:
            for line in fh:
                m = stamp.search(line)
                if m and m.group(1) >= cutoff:
                    out_new.write(line)
                    moved += 1
                else:
                    out_base.write(line)
                    kept += 1
print(kept, moved)
"""


# One consumer process draining `n` entries: events/s from its first read, and the
# event-to-hot-profile latency of each event (from the millisecond Redis added it).
CONSUME = """
import json, sys, time
import numpy as np
from pathlib import Path
from persona_assets import stream
client = stream.connect(sys.argv[1])
n = int(sys.argv[2])
worker = stream.Consumer(client, stream.RedisStreamSource(client, "bench"), Path(sys.argv[3]),
                         stream.ConsumerOptions(block_ms=5, flush_seconds=5.0))
worker.step()
print("ready", flush=True)
started = None
while worker.applied + worker.skipped + worker.quarantined < n:
    if worker.step() and started is None:
        started = time.perf_counter()
seconds = time.perf_counter() - started
worker.flush()
lat = np.array(worker.latencies)
print(json.dumps({"events": n, "seconds": seconds, "p50_ms": float(np.percentile(lat, 50)),
                  "p99_ms": float(np.percentile(lat, 99))}))
"""


LINK = """
import duckdb, json, sys
import pandas as pd
from persona_assets.core.identity import IdentityOptions, resolve
from persona_assets.core.warehouse import connection_config
con = duckdb.connect(sys.argv[1], config=connection_config())
report = resolve(con, IdentityOptions(linkage=sys.argv[2] == "on"), full=True)
truth = pd.read_parquet(sys.argv[3]).set_index("anonymous_id").person_key
people = con.execute("SELECT identifier, person_id FROM identity_map WHERE identifier_type = 'anonymous_id'").df()
people["truth"] = people.identifier.map(truth)
pairs = lambda keys: int(people.groupby(keys).size().map(lambda n: n * (n - 1) // 2).sum())
true, found, correct = pairs("truth"), pairs("person_id"), pairs(["truth", "person_id"])
p, r = correct / max(found, 1), correct / max(true, 1)
l = report.links
print(json.dumps({"records": l.records, "candidate_pairs": l.candidate_pairs, "links": l.links, "merges": l.merges,
                  "precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-12), 4)}))
"""


def link_bench(work: Path, records: int) -> dict:
    """Identity over `records` sign-ups sharing no identifier: deterministic only, then with linkage."""
    from persona_assets.datagen import identify_records

    data = work / f"signups-{records}"
    if not (data / "_truth" / "records.parquet").exists():
        print(f"generating {records} sign-up records into {data} ...", flush=True)
        identify_records(records, 1, data)
    warehouse = work / "link-warehouse.duckdb"
    warehouse.unlink(missing_ok=True)
    ingest_s, _, _ = measure(INGEST, str(data), str(warehouse))
    truth = str(data / "_truth" / "records.parquet")
    plain_s, _, _ = measure(LINK, str(warehouse), "off", truth)
    link_s, link_gb, out = measure(LINK, str(warehouse), "on", truth)
    found = json.loads(out.splitlines()[-1])
    warehouse.unlink(missing_ok=True)
    return {
        "link_records": records,
        "link_ingest_seconds": round(ingest_s, 2),
        "link_identity_without_linkage_seconds": round(plain_s, 2),
        "link_identity_with_linkage_seconds": round(link_s, 2),
        "link_peak_gb": round(link_gb, 2),
        **{f"link_{k}": v for k, v in found.items() if k != "records"},
    }


def stream_bench(work: Path, people: int = 3000, rate: float = 2000.0, seconds: float = 15.0) -> dict:
    """Throughput of one consumer on a full stream, then latency with events offered at `rate`/s."""
    from persona_assets import stream
    from persona_assets.assets.serving import published_tables
    from persona_assets.core.cleaning import clean
    from persona_assets.core.identity import resolve
    from persona_assets.core.ingest import ingest, landing_files
    from persona_assets.core.publish import publish_snapshot
    from persona_assets.datagen import generate

    root = work / "stream-bench"
    shutil.rmtree(root, ignore_errors=True)
    generate(people, 3, root / "landing", "jsonl")
    with duckdb.connect(str(root / "warehouse.duckdb")) as con:  # the identity map the consumer resolves with
        ingest(con, root / "landing", b"bench-key")
        resolve(con)
        clean(con)
        publish_snapshot(con, root / "snapshot.duckdb", {"identity_map": published_tables()["identity_map"]})
    server, url = stream.start_redis(root / "redis")
    try:
        client = stream.connect(url)
        stream.load_identity(client, root / "snapshot.duckdb")
        total = sum(stream.publish(client, path) for path in landing_files(root / "landing"))
        _, _, out = measure(CONSUME, url, str(total), str(root / "flushed"))
        full = json.loads(out.splitlines()[-1])
        # Latency: a fresh stream, events offered at `rate` while the consumer keeps up.
        client.flushall()
        stream.load_identity(client, root / "snapshot.duckdb")
        offered = int(rate * seconds)
        consumer = subprocess.Popen(
            [sys.executable, "-c", CONSUME, url, str(offered), str(root / "flushed")], stdout=subprocess.PIPE, text=True
        )
        assert consumer.stdout.readline().strip() == "ready"  # imported and in the group
        publish_path = root / "offered.jsonl"
        with open(publish_path, "w") as fh:
            for path in landing_files(root / "landing"):
                fh.write(path.read_text())
        stream.publish(client, publish_path, rate=rate, limit=offered)
        out, _ = consumer.communicate(timeout=300)
        paced = json.loads(out.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "stream_events": total,
        "stream_events_per_second": round(total / full["seconds"]),
        "stream_offered_per_second": rate,
        "stream_latency_p50_ms": round(paced["p50_ms"], 1),
        "stream_latency_p99_ms": round(paced["p99_ms"], 1),
    }


# The child reports its own high-water mark: ru_maxrss from wait4 would start from the
# parent's size at fork (Linux keeps it across exec).
PEAK = (
    "\nimport re as _re\nprint('PEAK_KB', _re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
)


def measure(code: str, *args: str) -> tuple[float, float, str]:
    """Run `code` in a fresh Python; returns wall seconds, its peak RSS in GB, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code + PEAK, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bench step failed: {code.strip().splitlines()[0]} ...")
    lines = out.strip().splitlines()
    peak_kb = usage.ru_maxrss
    if lines and lines[-1].startswith("PEAK_KB "):
        peak_kb = int(lines.pop().split()[1])
    return seconds, peak_kb / 1024 / 1024, "\n".join(lines)


def resample_people(warehouse: Path, people: int) -> int:
    """Grow (or shrink) cleaned_users to `people` rows by resampling its rows under new person ids.

    Segmentation reads only person-level tables, so its cost at a million people can be
    measured without generating and ingesting 32 million events; the rows keep the
    generated population's distribution.
    """
    with duckdb.connect(str(warehouse)) as con:
        have = con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]
        copies = -(-people // max(have, 1))
        con.execute(
            f"""CREATE OR REPLACE TABLE cleaned_users AS
                SELECT * REPLACE ('p' || left(sha256(person_id || '-' || copy), 16) AS person_id)
                FROM cleaned_users, range({copies}) AS r(copy)
                ORDER BY hash(person_id, copy) LIMIT {people}"""
        )
        return con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]


def run(args) -> int:

    work = Path(args.workdir) if args.workdir else persona_home() / "bench"
    people = max(100, args.events // EVENTS_PER_PERSON)
    data = work / f"landing-{people}-{args.format.replace('.', '')}"
    if not (data / "_truth" / "counts.json").exists():
        print(f"generating about {args.events} events ({people} people) into {data} ...", flush=True)
        t = time.perf_counter()
        # In its own process: a child's peak-memory figure starts from its parent's size at
        # fork, so the bench process itself must stay small.
        cmd = [sys.executable, "-m", "persona_assets.cli", "generate", "--people", str(people), "--seed", "1"]
        subprocess.run([*cmd, "--out", str(data), "--format", args.format], check=True, stdout=subprocess.DEVNULL)
        print(f"  generated in {time.perf_counter() - t:.0f} s", flush=True)
    counts = json.loads((data / "_truth" / "counts.json").read_text())
    increment = None
    if args.refresh_share and args.format == "jsonl":
        # The refresh figure: the newest share of events lands after a full build of the rest.
        tag = f"{args.refresh_share:g}".replace(".", "p")
        base, increment = work / f"{data.name}-base-{tag}", work / f"{data.name}-new-{tag}" / "newest.jsonl"
        if not increment.exists():
            print(f"splitting off the newest {args.refresh_share:.1%} of events ...", flush=True)
            subprocess.run([sys.executable, "-c", SPLIT, str(data), str(base), str(increment),
                            str(args.refresh_share)], check=True)  # fmt: skip
        data = base
    pattern = str(data / ("*." + args.format))
    warehouse = work / "bench-warehouse.duckdb"
    for leftover in (warehouse, warehouse.with_name(warehouse.name + ".wal")):
        leftover.unlink(missing_ok=True)

    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "events": counts["events"],
        "lines": counts["lines"],
        "format": args.format,
    }
    if args.format in ("jsonl", "jsonl.gz"):
        floor_s, floor_gb, _ = measure(FLOOR, pattern)
        results["floor_seconds"] = round(floor_s, 2)
        results["floor_peak_gb"] = round(floor_gb, 2)
    ingest_s, ingest_gb, out = measure(INGEST, str(data), str(warehouse))
    ingested = json.loads(out.splitlines()[-1])
    results.update(
        ingest_seconds=round(ingest_s, 2),
        ingest_peak_gb=round(ingest_gb, 2),
        ingest_events_per_second=round(ingested["lines"] / ingest_s),
        **{f"ingest_{k}": v for k, v in ingested.items()},
    )
    if "floor_seconds" in results:
        results["ratio_to_floor"] = round(ingest_s / floor_s, 2)
    shutil.rmtree(work / "bench-models", ignore_errors=True)
    for stage in STAGES:
        stage_s, stage_gb, _ = measure(STAGE, str(warehouse), stage, "full")
        results[f"{stage}_seconds"] = round(stage_s, 2)
        results[f"{stage}_peak_gb"] = round(stage_gb, 2)
    results["full_build_seconds"] = round(ingest_s + sum(results[f"{s}_seconds"] for s in STAGES), 2)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        results["people"] = con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]
    if increment is not None:
        refresh_s, _, out = measure(INGEST, str(increment.parent), str(warehouse))
        results["refresh_new_events"] = json.loads(out.splitlines()[-1])["kept"]
        results["refresh_ingest_seconds"] = round(refresh_s, 2)
        stages_s, stages_gb, out = measure(STAGE, str(warehouse), "refresh", "incremental")
        for stage, seconds in json.loads(out.splitlines()[-1]).items():
            results[f"refresh_{stage}_seconds"] = round(seconds, 2)
        results["refresh_stages_wall_seconds"] = round(stages_s, 2)  # the stages plus one process start
        results["refresh_peak_gb"] = round(stages_gb, 2)
        refresh_s += stages_s
        with duckdb.connect(str(warehouse), read_only=True) as con:
            results["refresh_people_recomputed"] = con.execute(
                "SELECT people FROM refresh_state WHERE stage = 'cleaning'"
            ).fetchall()[0][0]
        results["refresh_seconds"] = round(refresh_s, 2)
        results["refresh_share_of_full_build"] = round(refresh_s / results["full_build_seconds"], 3)
    if args.segment_people:
        # Last: it replaces cleaned_users with resampled people that have no events.
        results["resampled_people"] = resample_people(warehouse, args.segment_people)
        stage_s, stage_gb, _ = measure(STAGE, str(warehouse), "segmentation")
        results["resampled_segmentation_seconds"] = round(stage_s, 2)
        results["resampled_segmentation_peak_gb"] = round(stage_gb, 2)
    if not args.keep:
        warehouse.unlink(missing_ok=True)
        work.joinpath("bench-serving.duckdb").unlink(missing_ok=True)
    if args.stream:
        results.update(stream_bench(work))
    if args.link_records:
        results.update(link_bench(work, args.link_records))
    out_file = work / f"bench-{people}-{args.format.replace('.', '')}.json"
    out_file.write_text(json.dumps(results, indent=2))
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(f"(written to {out_file})")
    return 0
