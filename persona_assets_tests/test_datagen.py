import hashlib
import json
import re

import pyarrow.parquet as pq
import pytest

from persona_assets.datagen import generate

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
