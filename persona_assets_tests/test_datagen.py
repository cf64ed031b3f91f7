import hashlib
import json
import re

import pandas as pd
import pyarrow.parquet as pq
import pytest

from persona_assets.datagen import Shape, generate

from .conftest import truth_counts


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_seed_writes_identical_files(tmp_path):
    generate(120, 3, tmp_path / "a", people_per_file=50)
    generate(120, 3, tmp_path / "b", people_per_file=50)
    generate(120, 4, tmp_path / "c", people_per_file=50)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a").values() != _digest(tmp_path / "c").values()


def test_plants_the_traps_later_stages_must_find(generated):
    source = generated("jsonl")
    counts = truth_counts(source)
    people = pq.read_table(source / "_truth" / "people.parquet").to_pandas()
    ids = pq.read_table(source / "_truth" / "identifiers.parquet").to_pandas()
    assert len(people) == 400 and counts["files"] == 3
    assert counts["duplicate_lines"] > 0 and counts["late_events"] > 0 and counts["malformed_lines"] > 0
    assert counts["lines"] == counts["events"] + counts["duplicate_lines"] + counts["malformed_lines"]
    assert ids.groupby("person_key").anonymous_id.nunique().max() >= 2  # people with several devices
    assert ids[ids.shared_device].device_id.duplicated().any()  # a tablet shared by a household
    assert people.archetype.nunique() == 5
    assert 0.3 < people.age_observed.mean() < 0.8  # age hidden for a share of people
    text = "".join(p.read_text() for p in sorted(source.glob("*.jsonl")))
    assert "test@test.com" in text or counts["people"] < 1000  # junk email is rare at this size
    assert re.search(r'"email":"\s+[^"]+@', text)  # the same email written with spaces and capitals
    assert re.search(r'"email":"[^"]*[A-Z][^"]*@', text)


def test_every_format_carries_the_same_fields(tmp_path):
    for fmt in ("jsonl", "jsonl.gz", "csv", "parquet"):
        counts = generate(30, 1, tmp_path / fmt, fmt, people_per_file=30)
        assert counts["lines"] > 0
    header = (tmp_path / "csv" / "events-s1-00000.csv").read_text().splitlines()[0].split(",")
    assert {"messageId", "traits_email", "context_device_id", "properties_revenue"} <= set(header)
    schema = pq.read_schema(tmp_path / "parquet" / "events-s1-00000.parquet")
    assert str(schema.field("properties_price").type) == "double"


def test_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        generate(10, 1, tmp_path, "xml")


def test_truth_counts_match_the_lines_written(tmp_path):
    counts = generate(60, 2, tmp_path, people_per_file=60)
    lines = sum(1 for _ in (tmp_path / "events-s2-00000.jsonl").open())
    assert lines == counts["lines"]
    assert json.loads((tmp_path / "_truth" / "counts.json").read_text())["lines"] == lines


def test_default_shape_writes_what_the_generator_always_wrote(tmp_path):
    # Other tests depend on the default output: a shape's settings draw nothing unless asked.
    generate(60, 5, tmp_path, people_per_file=30)
    digests = {n: d[:16] for n, d in _digest(tmp_path).items()}
    assert digests == {"events-s5-00000.jsonl": "1252f0f1f8681872", "events-s5-00001.jsonl": "65e6da1e9f56ef65"}


def test_shapes_set_buyers_anonymous_people_and_long_sessions(tmp_path):
    shape = Shape(
        buyer_share=0.1,
        anonymous_share=0.5,
        bounce_share=0.5,
        long_session_rate=0.1,
        long_session_events=32,
        long_session_gap_seconds=1200,
        long_session_even=True,
    )
    generate(400, 3, tmp_path, people_per_file=400, shape=shape)
    people = pq.read_table(tmp_path / "_truth" / "people.parquet").to_pandas()
    events = []
    for line in (tmp_path / "events-s3-00000.jsonl").open():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # the planted malformed lines
            continue
    events = [e for e in events if isinstance(e, dict) and "anonymousId" in e]
    ids = pq.read_table(tmp_path / "_truth" / "identifiers.parquet").to_pandas()
    owner = dict(zip(ids.anonymous_id, ids.person_key))
    buyers = {owner.get(e["anonymousId"]) for e in events if e.get("event") == "Order Completed"}
    assert 0.06 < len(buyers - {None}) / len(people) < 0.14
    assert 0.4 < people[["user_id", "email", "phone"]].isna().all(axis=1).mean() < 0.65
    long = pq.read_table(tmp_path / "_truth" / "long_sessions.parquet").to_pandas()
    hours = (pd.to_datetime(long.session_end) - pd.to_datetime(long.session_start)).dt.total_seconds() / 3600
    assert len(long) > 20 and hours.between(10, 17).all()  # 31 gaps of 20 minutes, one more per product added
    with pytest.raises(ValueError, match="buyer_share"):
        Shape(buyer_share=1.5)
