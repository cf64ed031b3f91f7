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

from persona_assets.core.publish import spare_path
from persona_assets.settings import persona_home

EVENTS_PER_PERSON = 32  # what the generator makes on average
STAGES = ("identity", "cleaning", "features", "segments", "imputation", "profiles", "serving")
# The stages that read per person (the people's tables) rather than per event: timed on resampled people.
PERSON_STAGES = STAGES[2:]


FLOOR = """
import duckdb, sys
con = duckdb.connect()
sql = (
    "SELECT count(*) FROM (SELECT anonymousId, count(*) FROM read_json(?, format='newline_delimited', "
    "ignore_errors=true, columns={'anonymousId': 'VARCHAR'}) GROUP BY 1)"
)
print(con.execute(sql, [sys.argv[1]]).fetchall()[0][0])
"""

# A bound under any ingest that keeps every field: DuckDB's own reader with the events' full
# schema (all fields as text), stored in a table, with no validation, quarantine, hashing,
# duplicate check or ledger. Bad lines are skipped, which ingest may not do.
ALL_FIELDS = """
import duckdb, sys, tempfile
from pathlib import Path
from persona_assets.core.events import FIELDS
tree = {}
for f in FIELDS:
    for path in f.paths:
        node, parts = tree, path.removeprefix("$.").split(".")
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = "JSON" if f.kind == "json" else "VARCHAR"
kind = lambda v: "STRUCT(" + ", ".join(f'"{k}" {kind(w)}' for k, w in v.items()) + ")" if isinstance(v, dict) else v
columns = "{" + ", ".join(f"'{k}': '{kind(v)}'" for k, v in tree.items()) + "}"
with tempfile.TemporaryDirectory(dir=Path(sys.argv[2])) as tmp:
    con = duckdb.connect(str(Path(tmp) / "bound.duckdb"))
    con.execute("SET enable_progress_bar = false")
    con.execute("CREATE TABLE events AS SELECT * FROM read_json(?, format='newline_delimited', ignore_errors=true, "
                f"columns={columns})", [sys.argv[1]])
    con.execute("CHECKPOINT")
    print(con.execute("SELECT count(*) FROM events").fetchall()[0][0])
    con.close()
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
import duckdb, importlib, json, sys
from pathlib import Path
from persona_assets.core.warehouse import connection_config
con = duckdb.connect(sys.argv[1], config=connection_config())
full = sys.argv[3] == "full"  # a full build trains the models; a refresh uses them
models = Path(sys.argv[1]).with_name("bench-models")
snapshot = Path(sys.argv[1]).with_name("bench-serving.duckdb")
count = lambda table: con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
# Each stage imports only what it uses, as a long-lived Dagster process would have imported
# everything once: a fresh process per stage should not charge every stage for LightGBM and Dagster.
core = lambda name: importlib.import_module(f"persona_assets.core.{name}")
store = lambda: core("models").ModelStore(models)
def traits():
    from persona_assets.settings import shipped_enrichment
    return core("imputation").ImputationOptions(enrichment_path=str(shipped_enrichment()))
def publish():
    from persona_assets.assets.serving import APPEND_ONLY, INDEXED, published_tables
    return core("publish").publish_snapshot(con, snapshot, published_tables(con), append=APPEND_ONLY,
                                            indexes=INDEXED)
steps = {  # name: (run it, rows in, rows out)
    "identity": (lambda: core("identity").resolve(con, full=full), "raw_events", "deduped_users"),
    "cleaning": (lambda: core("cleaning").clean(con, full=full), "deduped_users", "cleaned_users"),
    "features": (lambda: core("features").build(con, store(), core("features").FeatureOptions(), refit=full,
                                                full=full), "cleaned_users", "normalized_features"),
    "segments": (lambda: core("segments").build(con, store(), core("segments").SegmentOptions(), retrain=full,
                                                full=full), "normalized_features", "segments"),
    "imputation": (lambda: core("imputation").impute(con, store(), traits(), retrain=full, full=full),
                   "cleaned_users", "imputed_attributes"),
    "profiles": (lambda: core("profiles").build(con, full=full), "cleaned_users", "user_profiles"),
    "serving": (publish, None, None),
}
if sys.argv[2] == "refresh":  # every stage in one process, as one Dagster run executes them
    import time
    took = {}
    for name, (step, _, _) in steps.items():
        started = time.perf_counter()
        step()
        took[name] = time.perf_counter() - started
    print(json.dumps(took))
else:
    step, rows_in, rows_out = steps[sys.argv[2]]
    before = count(rows_in) if rows_in else None
    result = step()
    if rows_out is None:  # the snapshot: rows published
        before = rows_after = sum(result.values())
    else:
        rows_after = count(rows_out)
    print(json.dumps({"rows_in": before, "rows_out": rows_after}))
"""

# Profile look-ups as `persona profile` does them, on the snapshot: by userId, anonymousId
# and person_id, with the connection open (the look-up itself) and from a cold open.
LOOKUP = """
import json, random, sys, time
from pathlib import Path
import numpy as np
from persona_assets.core.profiles import find_person
from persona_assets.core.publish import open_snapshot
path, n = Path(sys.argv[1]), int(sys.argv[2])
con = open_snapshot(path)
keys = [r[0] for r in con.execute(
    "SELECT identifier FROM identity_map WHERE identifier_type IN ('user_id', 'anonymous_id') "
    "USING SAMPLE reservoir(2000 ROWS) REPEATABLE (7)").fetchall()]
keys += [r[0] for r in con.execute("SELECT person_id FROM user_profiles USING SAMPLE reservoir(1000 ROWS) REPEATABLE (7)").fetchall()]
random.Random(7).shuffle(keys)
def lookup(c, who):
    return [c.execute("SELECT * FROM user_profiles WHERE person_id = ?", [p]).fetchall() for p in find_person(c, who, b"k")]
for who in keys[:50]:  # warm the file cache, as a serving process would be
    lookup(con, who)
warm = []
for who in keys[:n]:
    t = time.perf_counter(); lookup(con, who); warm.append((time.perf_counter() - t) * 1000)
con.close()
cold = []
for who in keys[:50]:
    t = time.perf_counter()
    with open_snapshot(path) as c:
        lookup(c, who)
    cold.append((time.perf_counter() - t) * 1000)
print(json.dumps({"lookups": len(warm), "p50_ms": float(np.percentile(warm, 50)), "p99_ms": float(np.percentile(warm, 99)),
                  "cold_p50_ms": float(np.percentile(cold, 50)), "cold_p99_ms": float(np.percentile(cold, 99))}))
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
live = None
if len(sys.argv) > 4:  # audiences decided per event
    from persona_assets.core.audience_definitions import parse, read_sections
    from persona_assets.stream_audiences import LiveAudiences
    live = LiveAudiences(client, parse(read_sections(Path(sys.argv[4])), sys.argv[4]))
worker = stream.Consumer(client, stream.RedisStreamSource(client, "bench"), Path(sys.argv[3]),
                         stream.ConsumerOptions(block_ms=5, flush_seconds=5.0), audiences=live)
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


# Ten audiences over five computed traits, the profile and each other: what the audience
# figure measures (DESIGN.md section 11).
BENCH_AUDIENCES = """
computed_traits:
  orders_30d:   {count: {event: Order Completed, within_days: 30}}
  views_7d:     {count: {event: Product Viewed, within_days: 7}}
  spend:        {sum: {event: Order Completed, property: revenue}}
  favourite:    {most_frequent: {event: Product Viewed, property: category}}
  categories:   {unique_count: {event: Product Viewed, property: category}}
audiences:
  buyers_30d:   {where: {trait: orders_30d, gte: 1}}
  repeat_30d:   {where: {event: Order Completed, count: {gte: 2}, within_days: 30}}
  browsers:     {where: {all: [{trait: views_7d, gte: 3}, {not: {audience: buyers_30d}}]}}
  big_spenders: {where: {trait: spend, gte: 500}}
  book_fans:    {where: {any: [{trait: favourite, eq: books}, {trait: category_affinity.books, gte: 3}]}}
  explorers:    {where: {trait: categories, gte: 5}}
  lapsed:       {where: {all: [{trait: order_count, gte: 1}, {trait: days_since_last_order, gt: 60}]}}
  carted:       {where: {event: Product Added, count: {gte: 1}, within_days: 14, where: {price: {gte: 20}}}}
  mobile_young: {where: {all: [{trait: primary_device, eq: mobile}, {trait: age_bracket, in: ["<25", "25-34"]}]}}
  vip_lapsing:  {where: {all: [{audience: big_spenders}, {not: {audience: buyers_30d}}]}}
"""

# Computed traits and the ten audiences on the full build's warehouse, in full.
AUDIENCES = """
import duckdb, json, sys, tempfile, time
from pathlib import Path
from persona_assets.core import audience_definitions, audiences, computed_traits
from persona_assets.core.warehouse import connection_config
con = duckdb.connect(sys.argv[1], config=connection_config())
with tempfile.TemporaryDirectory() as home:
    Path(home, "audiences.yaml").write_text(sys.argv[2])
    started = time.perf_counter()
    d = audience_definitions.load(Path(home), None, audiences.vocabulary(con))
    traits = computed_traits.build(con, d, full=True)
    traits_s = time.perf_counter() - started
    sizes = {name: audiences.evaluate(con, d, name, "bench").size for name in d.audiences}
    total = time.perf_counter() - started
print(json.dumps({"traits_seconds": traits_s, "audiences_seconds": total - traits_s, "seconds": total,
                  "traits": traits.traits, "audiences": len(sizes), "members": sum(sizes.values())}))
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
        live = _paced_with_audiences(client, url, root, publish_path, rate, offered)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "stream_events": total,
        "stream_events_per_second": round(total / full["seconds"]),
        "stream_offered_per_second": rate,
        "stream_latency_p50_ms": round(paced["p50_ms"], 1),
        "stream_latency_p99_ms": round(paced["p99_ms"], 1),
        "stream_audiences_latency_p50_ms": round(live["p50_ms"], 1),
        "stream_audiences_latency_p99_ms": round(live["p99_ms"], 1),
    }


def _paced_with_audiences(client, url: str, root: Path, publish_path: Path, rate: float, offered: int) -> dict:
    """The paced latency run again, the consumer deciding BENCH_AUDIENCES' live audiences per event."""
    from persona_assets import stream

    client.flushall()
    stream.load_identity(client, root / "snapshot.duckdb")
    definitions = root / "audiences.yaml"
    definitions.write_text(BENCH_AUDIENCES)
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUME, url, str(offered), str(root / "flushed"), str(definitions)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert consumer.stdout.readline().strip() == "ready"
    stream.publish(client, publish_path, rate=rate, limit=offered)
    out, _ = consumer.communicate(timeout=300)
    return json.loads(out.strip().splitlines()[-1])


# The server's workloads (`server_bench`): collection in batches of 100 as fast as answers come,
# one /v1/track offered at 1,000 requests/s, profile reads offered at 500/s; each also against
# the floor, the same stack answering an empty 200, and the floor of two other stacks. Collection
# is measured with each durability: `disk` (fsync'd in the spool) and `stream` (on Redis).
SERVER_SECONDS = 5.0
FLOOR_STACKS = {  # name: (http, loop, app) for loadgen.FLOOR; the first is persona serve's own stack
    "asgi-httptools-uvloop": ("httptools", "uvloop", "bare"),
    "starlette-httptools-uvloop": ("httptools", "uvloop", "starlette"),
    "starlette-h11-asyncio": ("h11", "asyncio", "starlette"),
}
OWN_STACK = next(iter(FLOOR_STACKS))
BENCH_WRITE_KEY, BENCH_READ_KEY = "bench-write-key", "bench-read-key"


def _event_template() -> bytes:
    """A typical track call as an SDK sends it, its messageId to be filled in per request."""
    at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return json.dumps(
        {
            "type": "track",
            "event": "Product Viewed",
            "userId": "bench-user",
            "anonymousId": "bench-anon",
            "messageId": "@ID@",
            "timestamp": at,
            "sentAt": at,
            "properties": {"product_id": "sku-123", "category": "garden", "price": 19.99, "currency": "EUR"},
            "context": {
                "device": {"id": "dev-1", "type": "mobile"},
                "os": {"name": "iOS"},
                "locale": "de-DE",
                "timezone": "Europe/Berlin",
                "page": {"url": "https://shop.example/p/sku-123"},
                "library": {"name": "analytics-python", "version": "2.4.0"},
            },
        }
    ).encode()


def _server_workloads(host: str, users: list[str]) -> dict:
    import base64

    from persona_assets.server.loadgen import http_request

    def auth(key: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}

    one = _event_template()
    batch = b'{"batch":[' + b",".join(one.replace(b"@ID@", b"@ID@-%d" % i) for i in range(100)) + b"]}"
    post = {"Content-Type": "application/json", **auth(BENCH_WRITE_KEY)}
    return {
        "batch": lambda n: http_request("POST", "/v1/batch", host, batch.replace(b"@ID@", b"b%d" % n), post),
        "track": lambda n: http_request("POST", "/v1/track", host, one.replace(b"@ID@", b"t%d" % n), post),
        "read": lambda n: http_request(
            "GET", f"/v1/profiles/{users[n % len(users)]}/traits", host, headers=auth(BENCH_READ_KEY)
        ),
    }


def _load_server(port: int, workloads: dict, seconds: float, reads: bool = True) -> dict:
    from persona_assets.server import loadgen

    batch = loadgen.run(loadgen.closed_loop("127.0.0.1", port, workloads["batch"], 8, seconds))
    track = loadgen.run(loadgen.open_loop("127.0.0.1", port, workloads["track"], 1000.0, seconds))
    out = {
        "events_per_second": round(batch.per_second * 100),
        "batch_errors": batch.errors,
        "track_p50_ms": round(track.percentile(0.5), 2),
        "track_p99_ms": round(track.percentile(0.99), 2),
        "track_errors": track.errors,
    }
    if reads:
        read = loadgen.run(loadgen.open_loop("127.0.0.1", port, workloads["read"], 500.0, seconds))
        out.update(
            read_p50_ms=round(read.percentile(0.5), 2),
            read_p99_ms=round(read.percentile(0.99), 2),
            read_errors=read.errors,
        )
    return out


def _floor(port: int, stack: tuple[str, str, str]) -> subprocess.Popen:
    from persona_assets.server.loadgen import FLOOR

    proc = subprocess.Popen([sys.executable, "-c", FLOOR, str(port), *stack], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    _wait_port(port)
    return proc


def _wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_bench(work: Path, snapshot: Path, seconds: float = SERVER_SECONDS) -> dict:
    """`persona serve` on a copy of the bench snapshot, with `durable: disk` and with `durable: stream`
    (a redis-server as `persona stream --start-redis` runs it, no consumer reading meanwhile),
    against the floor of its own stack and two others."""
    from persona_assets import stream

    root = work / "server-bench"
    shutil.rmtree(root, ignore_errors=True)
    (root / "landing").mkdir(parents=True)
    (root / "serving").mkdir()
    shutil.copyfile(snapshot, root / "serving" / "persona.duckdb")
    with duckdb.connect(str(snapshot), read_only=True) as con:
        sizes = con.execute(
            "SELECT (SELECT count(*) FROM user_profiles), (SELECT count(*) FROM identity_map)"
        ).fetchall()
        # As many different people's identifiers as reads are made: each read is a first read
        # (the server keeps what it read from a snapshot, so repeats would measure its cache).
        users = [
            f"{t}:{i}"
            for t, i in con.execute(
                "SELECT identifier_type, identifier FROM identity_map WHERE identifier_type IN ('user_id', 'anonymous_id') "
                "QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY identifier) = 1 ORDER BY hash(identifier) "
                "LIMIT $n",
                {"n": int(500 * seconds)},
            ).fetchall()
        ]
    env = {
        **os.environ,
        "PERSONA_HOME": str(root),
        "PERSONA_WRITE_KEY": BENCH_WRITE_KEY,
        "PERSONA_READ_KEY": BENCH_READ_KEY,
    }
    env.pop("PERSONA_REDIS_URL", None)
    (root / "persona.yaml").write_text("server:\n  max_requests_per_second: 0\n  stream: false\n")
    results: dict = {"snapshot": {"people": sizes[0][0], "identifiers": sizes[0][1]}}
    results["persona"] = _persona_served(env, users, seconds, reads=True)
    results["events_landed"] = _landed(root / "landing", remove=True)
    (root / "persona.yaml").write_text("server:\n  max_requests_per_second: 0\n  durable: stream\n")
    redis_server, url = stream.start_redis(root / "redis")
    try:
        results["persona_stream"] = _persona_served({**env, "PERSONA_REDIS_URL": url}, users, seconds, reads=False)
        results["events_streamed"] = stream.connect(url).xlen(stream.STREAM)
        results["events_spooled_with_stream"] = _landed(root / "landing", remove=True)  # Redis did not take them
    finally:
        redis_server.kill()
        redis_server.wait()
    for name, stack in FLOOR_STACKS.items():
        port = _free_port()
        floor = _floor(port, stack)
        try:
            main = name == OWN_STACK
            results[name] = _load_server(port, _server_workloads(f"127.0.0.1:{port}", users), seconds, reads=main)
        finally:
            floor.terminate()
            floor.wait(timeout=60)
    results["floor_stack"] = OWN_STACK
    shutil.rmtree(root, ignore_errors=True)
    return results


def _persona_served(env: dict, users: list[str], seconds: float, reads: bool) -> dict:
    """The workloads against `persona serve` started with `env` (its home's persona.yaml as written)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "persona_assets.cli", "serve", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, 120)
        warm_seconds = _wait_warm(port, users[0])
        figures = _load_server(port, _server_workloads(f"127.0.0.1:{port}", users), seconds, reads=reads)
        return figures | {"warm_seconds": round(warm_seconds, 1)}
    finally:
        server.terminate()
        server.wait(timeout=60)


def _wait_warm(port: int, user: str, timeout: float = 300.0) -> float:
    """Seconds until the server has opened its snapshot: the reader's one thread opens it first
    (and builds what it holds in memory) before any read, so the first read's answer marks it.
    Measured from there: at 20M events the opening took ~40 s, and collection meanwhile ran at
    5,400 events/s against 19,400 after (the opening holds the interpreter)."""
    import http.client

    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", f"/v1/profiles/{user}/traits", headers={"Authorization": f"Bearer {BENCH_READ_KEY}"})
        conn.getresponse().read()
    finally:
        conn.close()
    return time.monotonic() - started


def _landed(landing: Path, remove: bool = False) -> int:
    """Lines in the server's landing files (removed after counting with `remove`)."""
    count = 0
    for path in landing.glob("http-*.jsonl"):
        with open(path, "rb") as fh:
            count += sum(1 for _ in fh)
        if remove:
            path.unlink()
    return count


# The child reports its own high-water mark: ru_maxrss from wait4 would start from the
# parent's size at fork (Linux keeps it across exec).
# One Spark stage of persona_assets/spark_job.py on a warehouse of Parquet tables, in its own
# process: the session's start and the stage timed apart, and the JVM's peak memory (the
# driver's Python and the JVM are two processes; the JVM does the work).
SPARK_STAGE = """
import argparse, json, os, re, sys, time
from pathlib import Path
from persona_assets.core.engine import EngineOptions
from persona_assets.resources import spark_resource
from persona_assets.spark_job import STAGES
started = time.perf_counter()
# local[*] is one JVM: the driver's memory is the executors'; shuffles in 2 partitions a core
# (Spark's default of 200 makes hundreds of tiny tasks on two cores).
settings = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false", "spark.driver.memory": "6g",
            "spark.sql.shuffle.partitions": str(2 * os.cpu_count())}
spark = spark_resource(EngineOptions(name="spark", spark_master=sys.argv[3]), **settings).spark_session
spark.sparkContext.setLogLevel("ERROR")
session_s = time.perf_counter() - started
started = time.perf_counter()
os.environ["PERSONA_HASH_KEY"] = "bench-key"  # the key the DuckDB build's ingest hashed with
job = argparse.Namespace(warehouse=sys.argv[1], landing=sys.argv[4], home=None, settings=Path(sys.argv[5]))
rows = STAGES[sys.argv[2]](spark, job)
stage_s = time.perf_counter() - started
jvm = spark.sparkContext._gateway.proc.pid
jvm_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open(f"/proc/{jvm}/status").read()).group(1))
spark.stop()
print(json.dumps({"session_seconds": session_s, "seconds": stage_s, "rows": rows, "jvm_peak_kb": jvm_kb}))
"""

PEAK = (
    "\nimport re as _re\nprint('PEAK_KB', _re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
)


# CPU seconds (user + system) of each measured step, by the order it ran: on this shared 2-core
# machine other work can double a step's wall time, while its CPU time stays near what it needs.
CPU: list[float] = []


def measure(code: str, *args: str, profile: Path | None = None) -> tuple[float, float, str]:
    """Run `code` in a fresh Python; returns wall seconds, its peak RSS in GB, and its stdout
    (its CPU seconds are appended to CPU). With `profile`, the run is sampled by pyinstrument and
    its call tree written there."""
    if profile:
        code = (
            "from pyinstrument import Profiler as _Profiler\n_profiler = _Profiler(interval=0.01)\n_profiler.start()\n"
            + code
            + f"\n_profiler.stop()\nopen({str(profile)!r}, 'w').write(_profiler.output_text(unicode=False, color=False))"
        )
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code + PEAK, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    CPU.append(usage.ru_utime + usage.ru_stime)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bench step failed: {code.strip().splitlines()[0]} ...")
    lines = out.strip().splitlines()
    peak_kb = usage.ru_maxrss
    if lines and lines[-1].startswith("PEAK_KB "):
        peak_kb = int(lines.pop().split()[1])
    return seconds, peak_kb / 1024 / 1024, "\n".join(lines)


# A Spark stage with no DuckDB stage of its own is set beside the DuckDB stage that does its work:
# category scores are computed inside DuckDB's profiles stage (which also builds the profiles, so
# the ratio flatters Spark).
DUCKDB_STAGE_OF = {"scores": "profiles"}


def spark_bench(
    landing: Path,
    warehouse: Path,
    work: Path,
    duckdb_stages: dict,
    master: str = "local[*]",
    only: tuple[str, ...] = (),
) -> dict:
    """Each stage that runs on Spark (`spark_job.STAGES`, or those of them in `only`), on the landing files and the inputs the
    DuckDB build made (exported to Parquet, not timed), in its own process: seconds without the session's start,
    the session's start, peak memory of the driver and the JVM together, rows out, and the ratio
    to the same stage on DuckDB in this run."""
    from persona_assets.spark_job import INPUTS, OUTPUTS, STAGES

    chosen = [s for s in STAGES if not only or s in only]
    parquet = work / "spark-warehouse"
    shutil.rmtree(parquet, ignore_errors=True)
    parquet.mkdir(parents=True)  # (all stages chosen: nothing to export, the settings file still goes here)
    # The chosen stages' inputs that no chosen stage before them makes, as the DuckDB build made them (not timed).
    inputs: set[str] = set()
    made: set[str] = set()
    for stage in chosen:
        inputs |= set(INPUTS[stage]) - made
        made |= set(OUTPUTS[stage])
    with duckdb.connect(str(warehouse), read_only=True) as con:
        for table in sorted(inputs):
            (parquet / table).mkdir(parents=True)
            con.execute(
                "COPY (SELECT * FROM query_table($t)) TO $f (FORMAT parquet)",
                {"t": table, "f": str(parquet / table / "part-0.parquet")},
            )
    # Identity runs on Spark without probabilistic linkage (DuckDB's figure in this run is with it).
    settings = parquet / "persona.yaml"
    settings.write_text("identity:\n  linkage: false\n")
    out: dict = {"master": master, "stages": {}}
    for stage in chosen:
        against = DUCKDB_STAGE_OF.get(stage, stage)
        _, driver_gb, printed = measure(SPARK_STAGE, str(parquet), stage, master, str(landing), str(settings))
        got = json.loads(printed.splitlines()[-1])
        seconds = got["seconds"]
        out["stages"][stage] = {
            "seconds": round(seconds, 2),
            "session_seconds": round(got["session_seconds"], 2),
            "peak_gb": round(driver_gb + got["jvm_peak_kb"] / 1024 / 1024, 2),
            "rows_out": got["rows"],
            "ratio_to_duckdb": round(seconds / duckdb_stages[against]["seconds"], 2),
            "duckdb_stage": against,
        }
    shutil.rmtree(parquet, ignore_errors=True)
    return out


def spark_markdown(sp: dict, duckdb_stages: dict) -> list[str]:
    return [
        f"- On Spark ({sp['master']}, this machine; the session's start apart): "
        + "; ".join(
            f"{stage}{' (without linkage)' if stage == 'identity' else ''} {st['seconds']:.1f} s against "
            f"DuckDB's {_duckdb_name(stage)}{duckdb_stages[DUCKDB_STAGE_OF.get(stage, stage)]['seconds']:.1f} s "
            f"(**{st['ratio_to_duckdb']}x**), session start {st['session_seconds']:.0f} s, peak {st['peak_gb']} GB "
            f"(driver and JVM, a 6 GB heap allowed)"
            for stage, st in sp["stages"].items()
        )
        + "."
    ]


def _duckdb_name(stage: str) -> str:
    other = DUCKDB_STAGE_OF.get(stage)
    return f"{other} stage (scores and profiles together) " if other else ""


def replicate_snapshot(snapshot: Path, copies: int) -> dict:
    """Each person in a serving snapshot `copies` times over, in place: copy n of a person has a new
    person_id and its identifiers carry a "-n" suffix (copy 0 keeps them), in every table with a
    person_id. The profile API's reads can so be timed against the identity map and profile count
    of a 20M-event run built from a small one; the rows keep the small run's distribution."""
    with duckdb.connect(str(snapshot)) as con:
        before = con.execute("SELECT count(*) FROM user_profiles").fetchall()[0][0]
        tables = [
            t
            for (t,) in con.execute(
                "SELECT table_name FROM duckdb_columns() WHERE schema_name = 'main' AND column_name = 'person_id'"
            ).fetchall()
        ]
        for table in tables:
            columns = {c for (c,) in con.execute(f"SELECT name FROM pragma_table_info('{table}')").fetchall()}
            changed = ["'p' || left(sha256(person_id || '-' || copy), 16) AS person_id"]
            order = "person_id"
            if "identifier" in columns:
                changed.append("identifier || CASE WHEN copy = 0 THEN '' ELSE '-' || copy END AS identifier")
                order = "identifier_type, identifier"  # as publish sorts it
            con.execute(
                f"""CREATE OR REPLACE TABLE "{table}" AS
                    SELECT * EXCLUDE (copy) REPLACE ({", ".join(changed)})
                    FROM "{table}", range({int(copies)}) AS r(copy) ORDER BY {order}"""
            )
        con.execute("CHECKPOINT")
    return {"copies": int(copies), "from_people": before}


def resample_people(warehouse: Path, people: int) -> int:
    """Grow (or shrink) the people to `people` by resampling them under new person ids, in
    deduped_users and cleaned_users alike (a resampled person has both rows, and no events).

    The person-level stages read these tables per person, so their cost at millions of people
    can be measured without generating and ingesting hundreds of millions of events; the rows
    keep the generated population's distribution. What those stages read of the events
    (imputation's context and products, the profiles' sessions and scores) stays at the
    build's size.
    """
    with duckdb.connect(str(warehouse)) as con:
        have = con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]
        copies = -(-people // max(have, 1))
        con.execute(
            f"""CREATE TEMP TABLE _resampled AS
                SELECT person_id, 'p' || left(sha256(person_id || '-' || r.copy), 16) AS new_id
                FROM cleaned_users, range({copies}) AS r(copy)
                ORDER BY hash(person_id, r.copy) LIMIT {int(people)}"""
        )
        for table in ("deduped_users", "cleaned_users"):
            con.execute(
                f"""CREATE OR REPLACE TABLE {table} AS
                    SELECT t.* REPLACE (x.new_id AS person_id)
                    FROM {table} t JOIN _resampled x USING (person_id) ORDER BY x.new_id"""
            )
        return con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]


SCALES = {  # make bench SCALE=...: events generated, sign-ups linked, people resampled for segmentation
    "small": {"events": 100_000, "link_records": 10_000, "segment_people": []},
    "1m": {"events": 1_000_000, "link_records": 100_000, "segment_people": []},
    "20m": {"events": 20_000_000, "link_records": 1_000_000, "segment_people": [1_000_000]},
}
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _check_spark_stages(names: str) -> None:
    """--spark-stages names only Spark stages: said before anything is built."""
    from persona_assets.spark_job import STAGES

    unknown = [s.strip() for s in names.split(",") if s.strip() and s.strip() not in STAGES]
    if unknown:
        raise SystemExit(f"--spark-stages: no Spark stage {', '.join(unknown)}; the stages: {', '.join(STAGES)}")


def run(args) -> int:
    if args.scale:
        for key, value in SCALES[args.scale].items():
            setattr(args, key, value)
    work = Path(args.workdir) if args.workdir else persona_home() / "bench"
    _check_spark_stages(getattr(args, "spark_stages", ""))
    if getattr(args, "only", None):
        return run_only(args.only, work, args.scale, getattr(args, "snapshot_copies", 1))
    people = max(100, args.events // EVENTS_PER_PERSON)
    data = work / f"landing-{people}-{args.format.replace('.', '')}"
    truth_dir = data.with_name(data.name + "_truth")  # where `persona generate` puts it: beside, never in
    if not (truth_dir / "counts.json").exists():
        print(f"generating about {args.events} events ({people} people) into {data} ...", flush=True)
        t = time.perf_counter()
        # In its own process: a child's peak-memory figure starts from its parent's size at
        # fork, so the bench process itself must stay small.
        cmd = [sys.executable, "-m", "persona_assets.cli", "generate", "--people", str(people), "--seed", "1"]
        subprocess.run([*cmd, "--out", str(data), "--format", args.format], check=True, stdout=subprocess.DEVNULL)
        print(f"  generated in {time.perf_counter() - t:.0f} s", flush=True)
    counts = json.loads((truth_dir / "counts.json").read_text())
    increment = None
    if args.refresh_share and args.format == "jsonl":
        # The refresh figure: the newest share of events lands after a full build of the rest.
        tag = f"{args.refresh_share:g}".replace(".", "p")
        base, increment = work / f"{data.name}-base-{tag}", work / f"{data.name}-new-{tag}" / "newest.jsonl"
        if not increment.exists():
            print(f"splitting off the newest {args.refresh_share:.1%} of events ...", flush=True)
            subprocess.run(
                [sys.executable, "-c", SPLIT, str(data), str(base), str(increment), str(args.refresh_share)], check=True
            )
        data = base
    pattern = str(data / ("*." + args.format))
    warehouse, snapshot = work / "bench-warehouse.duckdb", work / "bench-serving.duckdb"
    # The full build starts from nothing: no warehouse, and no snapshot (or spare) to append to.
    scratch = (warehouse, warehouse.with_name(warehouse.name + ".wal"), snapshot, spare_path(snapshot))
    for leftover in scratch:
        leftover.unlink(missing_ok=True)

    results: dict[str, object] = {
        "scale": args.scale or f"{args.events} events",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "events": counts["events"],
        "lines": counts["lines"],
        "format": args.format,
        "profiled": bool(args.profile),  # pyinstrument sampling adds a little to each stage
    }
    stages: dict[str, dict] = {}
    if args.format in ("jsonl", "jsonl.gz"):
        floor_s, floor_gb, _ = measure(FLOOR, pattern)
        results["floor_seconds"] = round(floor_s, 2)
        results["floor_cpu_seconds"] = round(CPU[-1], 2)
        results["floor_peak_gb"] = round(floor_gb, 2)
        bound_s, _, _ = measure(ALL_FIELDS, pattern, str(work))
        results["all_fields_seconds"] = round(bound_s, 2)
        results["all_fields_cpu_seconds"] = round(CPU[-1], 2)
        results["all_fields_ratio_to_floor"] = round(bound_s / floor_s, 2)
    print("full build ...", flush=True)
    profiles = None
    if args.profile:
        profiles = DOCS / "profiles" / (args.scale or "custom")
        profiles.mkdir(parents=True, exist_ok=True)
    ingest_s, ingest_gb, out = measure(INGEST, str(data), str(warehouse), profile=_profile_path(profiles, "ingest"))
    ingested = json.loads(out.splitlines()[-1])
    stages["ingest"] = _stage(ingest_s, ingest_gb, ingested["lines"], ingested["kept"], CPU[-1])
    results.update(
        ingest_events_per_second=round(ingested["lines"] / ingest_s),
        **{f"ingest_{k}": v for k, v in ingested.items()},
    )
    shutil.rmtree(work / "bench-models", ignore_errors=True)
    for stage in STAGES:
        stage_s, stage_gb, out = measure(STAGE, str(warehouse), stage, "full", profile=_profile_path(profiles, stage))
        rows = json.loads(out.splitlines()[-1])
        stages[stage] = _stage(stage_s, stage_gb, rows["rows_in"], rows["rows_out"], CPU[-1])
        print(f"  {stage}: {stage_s:.1f} s", flush=True)
    results["stages"] = stages
    results["full_build_seconds"] = round(sum(s["seconds"] for s in stages.values()), 2)
    results["full_build_peak_gb"] = max(s["peak_gb"] for s in stages.values())
    if "floor_seconds" in results:
        results["ingest_ratio_to_floor"] = round(ingest_s / floor_s, 2)
        results["full_build_ratio_to_floor"] = round(results["full_build_seconds"] / floor_s, 2)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        results["people"] = con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]
    if getattr(args, "engine", "duckdb") == "spark":
        print("the Spark stages on the same inputs ...", flush=True)
        only = tuple(s.strip() for s in getattr(args, "spark_stages", "").split(",") if s.strip())
        results["spark"] = spark_bench(data, warehouse, work, stages, only=only)
    print("audiences ...", flush=True)
    audience_s, audience_gb, out = measure(AUDIENCES, str(warehouse), BENCH_AUDIENCES)
    results["audiences"] = {
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in json.loads(out.splitlines()[-1]).items()},
        "peak_gb": round(audience_gb, 2),
        "share_of_full_build": round(audience_s / results["full_build_seconds"], 3),
    }
    if increment is not None:
        print("incremental refresh ...", flush=True)
        refresh_s, _, out = measure(INGEST, str(increment.parent), str(warehouse))
        refresh = {"new_events": json.loads(out.splitlines()[-1])["kept"], "ingest_seconds": round(refresh_s, 2)}
        stages_s, stages_gb, out = measure(STAGE, str(warehouse), "refresh", "incremental")
        for stage, seconds in json.loads(out.splitlines()[-1]).items():
            refresh[f"{stage}_seconds"] = round(seconds, 2)
        refresh["stages_wall_seconds"] = round(stages_s, 2)  # the stages plus one process start
        refresh["peak_gb"] = round(stages_gb, 2)
        refresh_s += stages_s
        with duckdb.connect(str(warehouse), read_only=True) as con:
            refresh["people_recomputed"] = con.execute(
                "SELECT people FROM refresh_state WHERE stage = 'cleaning'"
            ).fetchall()[0][0]
        refresh["seconds"] = round(refresh_s, 2)
        refresh["share_of_full_build"] = round(refresh_s / results["full_build_seconds"], 3)
        results["refresh"] = refresh
    print("profile look-ups ...", flush=True)
    _, _, out = measure(LOOKUP, str(snapshot), "2000")
    results["lookup"] = {k: round(v, 2) for k, v in json.loads(out.splitlines()[-1]).items()}
    print("command start-up ...", flush=True)
    results["startup"] = cli_startup(snapshot)
    if args.server if args.server is not None else bool(args.scale):
        print("server (persona serve against its floor) ...", flush=True)
        results["server"] = server_bench(work, snapshot)
    if args.segment_people:
        # Last: it replaces the people with resampled ones that have no events.
        results["people_scaling"] = []
        for count in sorted(args.segment_people):
            print(f"person-level stages on {count:,} resampled people ...", flush=True)
            row: dict = {"people": resample_people(warehouse, count)}
            for stage in PERSON_STAGES:
                stage_s, stage_gb, _ = measure(STAGE, str(warehouse), stage, "full")
                row[stage] = {"seconds": round(stage_s, 2), "peak_gb": round(stage_gb, 2)}
            results["people_scaling"].append(row)
    if not args.keep:
        for leftover in scratch:
            leftover.unlink(missing_ok=True)
    if args.stream:
        print("stream ...", flush=True)
        results["stream"] = stream_bench(work)
    if args.link_records:
        print("linkage ...", flush=True)
        results["linkage"] = link_bench(work, args.link_records)
    out_file = work / f"bench-{people}-{args.format.replace('.', '')}.json"
    out_file.write_text(json.dumps(results, indent=2))
    print(report_markdown(results))
    print(f"(written to {out_file})")
    if args.scale:
        DOCS.joinpath("benchmarks").mkdir(parents=True, exist_ok=True)
        DOCS.joinpath("benchmarks", f"{args.scale}.json").write_text(json.dumps(results, indent=2) + "\n")
        write_docs()
        print(f"(and to {DOCS / 'benchmarks.md'})")
    return 0


ONLY = ("server", "stream")


def run_only(parts: str, work: Path, scale: str | None, copies: int = 1) -> int:
    """Only the server and/or the stream figures, without building anything: the server's reads use
    the snapshot a `--keep` run left in `work`. With a scale, they replace that scale's figures in
    docs/benchmarks/<scale>.json (the rest of that run's figures stay) and docs/benchmarks.md."""
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    if not chosen or set(chosen) - set(ONLY):
        raise SystemExit(f"--only takes {', '.join(ONLY)} (comma-separated), got {parts!r}")
    results: dict[str, object] = {}
    if "server" in chosen:
        snapshot = work / "bench-serving.duckdb"
        if not snapshot.exists():
            raise SystemExit(f"no snapshot at {snapshot}: run the bench once with --keep --workdir {work}")
        replicated = None
        if copies > 1:
            print(f"replicating the snapshot's people {copies} times ...", flush=True)
            bigger = work / f"bench-serving-{copies}x.duckdb"
            shutil.copyfile(snapshot, bigger)
            snapshot, replicated = bigger, replicate_snapshot(bigger, copies)
        print("server (persona serve against its floor) ...", flush=True)
        results["server"] = server_bench(work, snapshot)
        if replicated:
            results["server"]["snapshot"]["replicated"] = replicated
            snapshot.unlink()
    if "stream" in chosen:
        print("stream ...", flush=True)
        results["stream"] = stream_bench(work)
    print(json.dumps(results, indent=2))
    if scale:
        path = DOCS / "benchmarks" / f"{scale}.json"
        if not path.exists():
            raise SystemExit(f"no {path} to merge into: run `persona bench --scale {scale}` once first")
        recorded = json.loads(path.read_text())
        recorded.update(results)
        path.write_text(json.dumps(recorded, indent=2) + "\n")
        write_docs()
        print(f"(merged into {path} and {DOCS / 'benchmarks.md'})")
    return 0


def cli_startup(snapshot: Path, runs: int = 5) -> dict:
    """Whole-process milliseconds (median of `runs`) of `persona query "SELECT 1"` and `persona
    profile <person_id>` on the snapshot, as a user at a shell waits for them, and of a bare
    Python start for scale: what the look-up figures leave out (imports, opening the file)."""
    import statistics

    with duckdb.connect(str(snapshot), read_only=True) as con:
        person = con.execute("SELECT person_id FROM user_profiles LIMIT 1").fetchall()[0][0]
    env = {**os.environ, "PERSONA_HASH_KEY": "k"}  # no key file written for a look-up
    commands = {
        "python": [sys.executable, "-c", "pass"],
        "query": [sys.executable, "-m", "persona_assets.cli", "query", "SELECT 1", "--snapshot", str(snapshot)],
        "profile": [sys.executable, "-m", "persona_assets.cli", "profile", person, "--snapshot", str(snapshot)],
    }
    out = {}
    for name, cmd in commands.items():
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            times.append((time.perf_counter() - t) * 1000)
        out[f"{name}_ms"] = round(statistics.median(times), 1)
    return out


def _profile_path(folder: Path | None, stage: str) -> Path | None:
    return folder / f"{stage}.txt" if folder else None


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    memory = psutil.virtual_memory().total / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GB, Python {platform.python_version()}, DuckDB {duckdb.__version__}"


def _stage(seconds: float, peak_gb: float, rows_in: int | None, rows_out: int | None, cpu: float) -> dict:
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_gb": round(peak_gb, 2),
        "rows_in": rows_in,
        "rows_out": rows_out,
    }


# Goals from the performance issue, checked on the 20m run.
GOALS = (
    (
        "full build under 15 minutes",
        lambda r: r["full_build_seconds"] < 900,
        lambda r: f"{r['full_build_seconds']:.0f} s",
    ),
    ("full build under 12 GB peak", lambda r: r["full_build_peak_gb"] < 12, lambda r: f"{r['full_build_peak_gb']} GB"),
    (
        "whole graph under 15x the floor",
        lambda r: r.get("full_build_ratio_to_floor", 99) < 15,
        lambda r: f"{r.get('full_build_ratio_to_floor')}x",
    ),
    (
        "1% refresh under 10% of the full build",
        lambda r: r["refresh"]["share_of_full_build"] < 0.10,
        lambda r: f"{r['refresh']['share_of_full_build']:.1%}",
    ),
    ("profile look-up p99 under 10 ms", lambda r: r["lookup"]["p99_ms"] < 10, lambda r: f"{r['lookup']['p99_ms']} ms"),
    (
        "10 audiences and 5 computed traits under 10% of the full build",
        lambda r: r["audiences"]["share_of_full_build"] < 0.10,
        lambda r: f"{r['audiences']['share_of_full_build']:.1%}",
    ),
)


def report_markdown(r: dict) -> str:
    """One bench run as markdown: the per-stage table, then the summary figures."""
    sampled = " Stages sampled by pyinstrument (adds a little)." if r.get("profiled") else ""
    lines = [
        f"### {r['scale']}: {r['events']:,} events, {r['people']:,} people ({r['date']})",
        "",
        f"Machine: {r['machine']}.{sampled}",
        "",
        "| stage | seconds | CPU seconds | peak GB | rows in | rows out |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, st in r["stages"].items():
        rows_in = f"{st['rows_in']:,}" if st["rows_in"] is not None else ""
        rows_out = f"{st['rows_out']:,}" if st["rows_out"] is not None else ""
        cpu = f"{st['cpu_seconds']:.1f}" if "cpu_seconds" in st else ""
        lines.append(f"| {name} | {st['seconds']:.1f} | {cpu} | {st['peak_gb']:.2f} | {rows_in} | {rows_out} |")
    timed = list(r["stages"].values())
    cpu = sum(st["cpu_seconds"] for st in timed) if timed and all("cpu_seconds" in st for st in timed) else None
    shown = f"**{cpu:.1f}**" if cpu is not None else ""
    lines.append(
        f"| **full build** | **{r['full_build_seconds']:.1f}** | {shown} | **{r['full_build_peak_gb']:.2f}** | | |"
    )
    lines.append("")
    if "floor_seconds" in r:
        lines.append(
            f"- Floor (DuckDB reads the same files once, groups by anonymousId): {r['floor_seconds']:.1f} s; "
            f"ingest {r['ingest_ratio_to_floor']}x, whole graph {r['full_build_ratio_to_floor']}x."
        )
    ingest = r["stages"].get("ingest")
    if "all_fields_seconds" in r and ingest:
        lines.append(
            f"- Bound under any ingest that keeps every field (DuckDB's reader with the full schema, stored, "
            f"no validation, hashing or ledger): {r['all_fields_seconds']:.1f} s = {r['all_fields_ratio_to_floor']}x "
            f"the floor; ingest {ingest['seconds'] / r['all_fields_seconds']:.2f}x it, the whole "
            f"graph {r['full_build_seconds'] / r['all_fields_seconds']:.2f}x."
        )
    if "all_fields_cpu_seconds" in r and ingest and "cpu_seconds" in ingest:
        ingest_cpu, bound_cpu = ingest["cpu_seconds"], r["all_fields_cpu_seconds"]
        lines.append(
            f"- In CPU seconds (what the machine's other work changes least): floor {r['floor_cpu_seconds']:.1f}, "
            f"bound {bound_cpu:.1f}, ingest {ingest_cpu:.1f} = {ingest_cpu / bound_cpu:.2f}x the bound."
        )
    if "refresh" in r:
        f = r["refresh"]
        parts = ", ".join(
            f"{k[:-8]} {v:.1f}" for k, v in f.items() if k.endswith("_seconds") and k != "stages_wall_seconds"
        )
        lines.append(
            f"- Incremental refresh with the newest 1% ({f['new_events']:,} events, {f['people_recomputed']:,} "
            f"people recomputed): {f['seconds']:.1f} s = {f['share_of_full_build']:.1%} of the full build ({parts} s)."
        )
    if "audiences" in r:
        a = r["audiences"]
        lines.append(
            f"- Audiences: {a['traits']} computed traits (with the counts behind event conditions) and "
            f"{a['audiences']} audiences evaluated in full in {a['traits_seconds'] + a['audiences_seconds']:.1f} s "
            f"(traits {a['traits_seconds']:.1f} s, membership {a['audiences_seconds']:.1f} s) = "
            f"{a['share_of_full_build']:.1%} of the full build (process start included)."
        )
    lk = r["lookup"]
    lines.append(
        f"- Profile look-up on the snapshot ({lk['lookups']:.0f} by userId, anonymousId or person_id): "
        f"p50 {lk['p50_ms']} ms, p99 {lk['p99_ms']} ms; from a cold open p50 {lk['cold_p50_ms']} ms, "
        f"p99 {lk['cold_p99_ms']} ms."
    )
    if "startup" in r:
        st = r["startup"]
        lines.append(
            f'- Commands as a user waits for them (whole process, median of 5): `persona query "SELECT 1"` '
            f"{st['query_ms']:.0f} ms, `persona profile <person_id>` {st['profile_ms']:.0f} ms (Python itself "
            f"{st['python_ms']:.0f} ms), beside the look-up's own p50 {lk['p50_ms']} ms."
        )
    if "spark" in r:
        lines += spark_markdown(r["spark"], r["stages"])
    if "server" in r:
        lines += server_markdown(r["server"])
    for row in r.get("people_scaling", []):
        lines.append(
            f"- Person-level stages on {row['people']:,} resampled people (no events of their own): "
            + ", ".join(
                f"{stage} {row[stage]['seconds']:.1f} s ({row[stage]['peak_gb']} GB)" for stage in PERSON_STAGES
            )
            + "."
        )
    if "resampled_people" in r:  # as runs before the person-level stages were all timed wrote it
        lines.append(
            f"- Segmentation on {r['resampled_people']:,} resampled people: features "
            f"{r['resampled_features_seconds']:.1f} s ({r['resampled_features_peak_gb']} GB), segments "
            f"{r['resampled_segments_seconds']:.1f} s ({r['resampled_segments_peak_gb']} GB)."
        )
    if "stream" in r:
        st = r["stream"]
        lines.append(
            f"- Stream: {st['stream_events_per_second']:,} events/s on one consumer; at "
            f"{st['stream_offered_per_second']:.0f}/s offered, latency p50 {st['stream_latency_p50_ms']} ms, "
            f"p99 {st['stream_latency_p99_ms']} ms"
            + (
                f"; deciding the live audiences per event, p50 {st['stream_audiences_latency_p50_ms']} ms, "
                f"p99 {st['stream_audiences_latency_p99_ms']} ms."
                if "stream_audiences_latency_p99_ms" in st
                else "."
            )
        )
    if "linkage" in r:
        lk = r["linkage"]
        lines.append(
            f"- Probabilistic linkage of {lk['link_records']:,} sign-ups: identity {lk['link_identity_with_linkage_seconds']:.1f} s "
            f"with linkage ({lk['link_identity_without_linkage_seconds']:.1f} s without), {lk['link_peak_gb']} GB, "
            f"{lk['link_candidate_pairs']:,} candidate pairs, pairwise F1 {lk['link_f1']}."
        )
    lines += [f"- Note: {note}" for note in r.get("notes", ())]  # how a run was made, when it was not one plain run
    if r["scale"] == "20m":
        lines += ["", "| goal (20m) | measured | met |", "|---|---:|:---:|"]
        for goal, met, shown in GOALS:
            try:
                lines.append(f"| {goal} | {shown(r)} | {'yes' if met(r) else 'no'} |")
            except KeyError:
                lines.append(f"| {goal} | not measured | |")
    return "\n".join(lines) + "\n"


def _snapshot_sizes(sv: dict) -> str:
    """What the reads were answered from: the snapshot's people and identifiers (and how it was made
    bigger, when it was)."""
    size = sv.get("snapshot")
    if not size:
        return ""
    text = f"; reads on a snapshot of {size['people']:,} people and {size['identifiers']:,} identifiers"
    if "replicated" in size:
        r = size["replicated"]
        text += f", each of a {r['from_people']:,}-person run's people {r['copies']} times over (`--snapshot-copies`)"
    return text


def server_markdown(sv: dict) -> list[str]:
    """The server's figures, each beside its floor (the same stack answering an empty 200)."""
    own = OWN_STACK if "floor_stack" not in sv else sv["floor_stack"]
    p, f = sv["persona"], sv[own]
    others = ", ".join(
        f"{name} {sv[name]['events_per_second'] / 100:,.0f} requests/s and track p99 {sv[name]['track_p99_ms']} ms"
        for name in FLOOR_STACKS
        if name != own and name in sv
    )
    errors = sum(v for k, v in p.items() if k.endswith("_errors"))
    lines = [
        f"- Server (`persona serve`, one process, `durable: disk`{_warm(p)}{_snapshot_sizes(sv)}): {_collection(p, f)}; "
        f"profile reads at 500/s: p50 "
        f"{p['read_p50_ms']} ms, p99 {p['read_p99_ms']} ms (floor p99 {f['read_p99_ms']} ms, "
        f"{p['read_p99_ms'] / f['read_p99_ms']:.1f}x); {errors} errors; {sv['events_landed']:,} events landed."
    ]
    if "persona_stream" in sv:
        s = sv["persona_stream"]
        lines.append(
            f"- Server with `durable: stream` (valid events on Redis before the 200, appendfsync everysec; no "
            f"consumer running{_warm(s)}): {_collection(s, f)}; {s['batch_errors'] + s['track_errors']} errors; "
            f"{sv['events_streamed']:,} events on the stream, {sv['events_spooled_with_stream']:,} spooled instead."
        )
    lines.append(
        f"- Server stacks, empty 200 (batch requests as fast as answered, track at 1,000/s): "
        f"{own} (persona serve's) {f['events_per_second'] / 100:,.0f} requests/s and track p99 "
        f"{f['track_p99_ms']} ms; {others}."
    )
    return lines


def _warm(p: dict) -> str:
    if "warm_seconds" not in p:
        return ""
    return f"; measured once it had opened its snapshot, {p['warm_seconds']:.0f} s after it listened"


def _collection(p: dict, f: dict) -> str:
    """Collection figures `p` beside the floor's `f`."""
    return (
        f"collection {p['events_per_second']:,} events/s in batches of 100 (floor {f['events_per_second']:,}: "
        f"{p['events_per_second'] / f['events_per_second']:.2f}x of it); one `/v1/track` offered at 1,000/s: "
        f"p50 {p['track_p50_ms']} ms, p99 {p['track_p99_ms']} ms (floor p99 {f['track_p99_ms']} ms, "
        f"{p['track_p99_ms'] / f['track_p99_ms']:.1f}x)"
    )


BENCH_DOC_HEAD = """# Benchmarks

Written by `make bench SCALE=small|1m|20m` (`persona bench --scale ...`): each run generates its
data with the project's generator, builds the whole graph (each stage in its own process,
so its peak memory is its own), refreshes with the newest 1% of events held back, looks up
profiles on the snapshot, and (where set) times the stream and probabilistic linkage. The raw
figures are in `docs/benchmarks/<scale>.json`. The machine is shared and noisy: compare
ratios within one run.

"""


def write_docs(docs: Path = DOCS) -> None:
    """docs/benchmarks.md from every scale's docs/benchmarks/<scale>.json."""
    runs = []
    for scale in SCALES:
        path = docs / "benchmarks" / f"{scale}.json"
        if path.exists():
            runs.append(report_markdown(json.loads(path.read_text())))
    (docs / "benchmarks.md").write_text(BENCH_DOC_HEAD + "\n".join(runs))
