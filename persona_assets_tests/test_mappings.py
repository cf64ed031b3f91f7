"""Per-file mappings: foreign exports (GA4, orders CSVs, snake_case events) ingested as sent."""

import pytest

from persona_assets.core.mappings import PRESETS, FileMapping, mapping_for, parse_mappings

# --- parsing settings ---------------------------------------------------------------------------------


def test_a_preset_is_the_base_and_the_entry_overrides_and_extends_it():
    (m,) = parse_mappings(
        [{"files": "ga4_*.jsonl", "preset": "ga4", "columns": {"userId": "user_properties.crm_id",
          "traits.email": "user_properties.email"}, "events": {"purchase": "Order Placed"},
          "timestamp_format": "epoch_ms"}]
    )  # fmt: skip
    assert m.columns["userId"] == "user_properties.crm_id"
    assert m.columns["traits.email"] == "user_properties.email"
    assert m.columns["anonymousId"] == "user_pseudo_id"
    assert m.events["purchase"] == "Order Placed" and m.events["view_item"] == "Product Viewed"
    assert m.defaults == {"type": "track"} and m.timestamp_format == "epoch_ms"
    assert PRESETS["ga4"]["events"]["purchase"] == "Order Completed", "the preset itself is unchanged"


def test_the_first_matching_mapping_applies_and_options_stay_hashable():
    mappings = parse_mappings([{"files": "ga4_*.jsonl", "preset": "ga4"}, {"files": "*.jsonl"}])
    assert mapping_for(mappings, "ga4_1.jsonl") is mappings[0]
    assert mapping_for(mappings, "app.jsonl") is mappings[1]
    assert mapping_for(mappings, "GA4_1.csv") is None
    again = parse_mappings([{"files": "ga4_*.jsonl", "preset": "ga4"}, {"files": "*.jsonl"}])
    assert hash(mappings) == hash(again) and mappings == again
    assert FileMapping("*.csv") == FileMapping("*.csv", {}, {}, {}, "iso")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"files": "a", "preset": "ga5"}, r"mappings\[0\]\.preset: unknown preset 'ga5'; allowed: ga4, orders_csv"),
        (
            {"files": "a", "columns": {"properties.revnue": "x"}},
            r"mappings\[0\]\.columns: unknown Segment field 'properties.revnue'; allowed: messageId, type, event, ",
        ),
        ({"files": "a", "colums": {}}, r"mappings\[0\]: unknown key 'colums'; allowed: files, preset, columns"),
        ({"preset": "ga4"}, r"mappings\[0\]\.files: expected a file-name pattern"),
        ({"files": ["a", "b"]}, r"mappings\[0\]\.files: expected a file-name pattern"),
        ({"files": "a", "defaults": {"traits.mail": "x"}}, r"mappings\[0\]\.defaults: unknown Segment field 'traits"),
        ({"files": "a", "defaults": {"type": "event"}}, r"mappings\[0\]\.defaults\.type: unknown event type 'event'"),
        (
            {"files": "a", "defaults": {"context.consent.personalization": True}},
            r"mappings\[0\]\.defaults: 'context.consent.personalization': True is not a string",
        ),
        ({"files": "a", "events": {"purchase": 1}}, r"mappings\[0\]\.events: 'purchase': 1 is not a string"),
        ({"files": "a", "events": {"purchase": " "}}, r"mappings\[0\]\.events: .*must not be empty"),
        ({"files": "a", "columns": "userId"}, r"mappings\[0\]\.columns: expected a mapping"),
        ({"files": "a", "columns": {"userId": "a\nb"}}, r"mappings\[0\]\.columns\.userId: .*control characters"),
        ({"files": "a", "columns": {"userId": "a..b"}}, r"mappings\[0\]\.columns\.userId: .*empty part"),
        ({"files": "a", "timestamp_format": "unix"}, r"mappings\[0\]\.timestamp_format: 'unix' .*allowed: iso, "),
        ({"files": "a", "timestamp_format": "%Y%Q"}, r"mappings\[0\]\.timestamp_format: '%Y%Q' is not a strptime"),
        ({"files": "a", "timestamp_format": 13}, r"mappings\[0\]\.timestamp_format: 13 is not a timestamp format"),
        ("ga4", r"mappings\[0\]: expected a mapping with keys files"),
    ],
)
def test_wrong_settings_are_refused_naming_the_key(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_mappings([entry])


def test_segment_fields_include_both_trait_spellings_and_the_list_must_be_a_list():
    parse_mappings([{"files": "a", "columns": {"traits.email": "mail", "context.traits.email": "ctx.mail"}}])
    assert parse_mappings(None) == () and parse_mappings([]) == ()
    with pytest.raises(ValueError, match="mappings: expected a list"):
        parse_mappings({"files": "a"})
