import shutil

import duckdb
import pandas as pd
import pytest

from persona_assets.core.cleaning import CleaningOptions, clean


def _anon_to_person(truth_dir):
    return pd.read_parquet(truth_dir / "identifiers.parquet")[["anonymous_id", "person_key"]]


def test_ten_hour_sessions_are_found(resolved):
    path, truth_dir = resolved
    with duckdb.connect(str(path), read_only=True) as con:
        sessions = con.execute("SELECT anonymous_id, duration_seconds, is_long FROM sessions").df()
    planted = pd.read_parquet(truth_dir / "long_sessions.parquet")
    assert len(planted) >= 5
    flagged = sessions[sessions.is_long]
    found = flagged.anonymous_id.isin(set(planted.anonymous_id))
    recall = planted.anonymous_id.isin(set(flagged.anonymous_id)).mean()
    assert recall >= 0.95
    assert found.mean() >= 0.8  # precision
    assert flagged.duration_seconds.min() > 3600


def test_bot_bursts_are_found(resolved):
    path, truth_dir = resolved
    people = pd.read_parquet(truth_dir / "people.parquet")
    bots = set(people[people.is_bot].person_key)
    anon = _anon_to_person(truth_dir)
    with duckdb.connect(str(path), read_only=True) as con:
        flagged = con.execute("SELECT DISTINCT anonymous_id FROM sessions WHERE is_burst").df()
    keys = flagged.merge(anon, on="anonymous_id").person_key
    assert len(bots) >= 3
    assert len(set(keys) & bots) / len(bots) >= 0.95
    assert keys.isin(bots).mean() >= 0.8


def test_sparse_people_and_outliers_are_kept_with_flags(resolved):
    path, _ = resolved
    with duckdb.connect(str(path), read_only=True) as con:
        counts = con.execute(
            """SELECT (SELECT count(*) FROM deduped_users), count(*), count(*) FILTER (WHERE is_sparse),
                      count(*) FILTER (WHERE outlier_flags IS NOT NULL), count(*) FILTER (WHERE is_bot),
                      bool_and(exclude_from_fitting) FILTER (WHERE is_bot OR behaviour_events = 0),
                      count(*) FILTER (WHERE is_sparse AND NOT exclude_from_fitting)
               FROM cleaned_users"""
        ).fetchall()[0]
    deduped, cleaned, sparse, outliers, bots, excluded, sparse_fitted = counts
    assert deduped == cleaned and sparse > 0 and outliers > 0 and bots > 0 and excluded
    # Few traits does not keep a person with behaviour out of fitting (issue 19).
    assert sparse_fitted > 0


def test_dirty_traits_become_missing_with_a_reason(resolved):
    path, _ = resolved
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute(
            """SELECT d.age, c.age, c.age_bracket, c.trait_issues, d.gender, c.gender, d.country, c.country,
                      d.birthday
               FROM deduped_users d JOIN cleaned_users c USING (person_id)"""
        ).df()
    rows.columns = ["age_raw", "age", "bracket", "issues", "gender_raw", "gender", "country_raw", "country", "birthday"]
    # A dirty age with no birthday to fall back on becomes missing, with the reason kept.
    bad_age = rows[pd.to_numeric(rows.age_raw, errors="coerce").isna() & rows.age_raw.notna() & rows.birthday.isna()]
    assert len(bad_age) > 0 and bad_age.age.isna().all()
    assert all("age_not_a_number" in list(i) for i in bad_age.issues)
    assert set(rows.gender.dropna()) <= {"female", "male", "nonbinary"}
    assert set(rows.bracket.dropna()) == {"<25", "25-34", "35-44", "45-54", "55+"}
    spelled = rows[rows.country_raw.str.strip().str.upper().isin(["USA", "UNITED STATES"])]
    assert len(spelled) > 0 and (spelled.country == "US").all()


def test_clip_and_exclude_actions(resolved, tmp_path):
    path, _ = resolved
    copy = tmp_path / "w.duckdb"
    shutil.copy(path, copy)
    with duckdb.connect(str(copy)) as con:
        flagged_max = con.execute(
            "SELECT max(event_count) FROM cleaned_users WHERE list_contains(outlier_flags, 'event_count')"
        ).fetchall()[0][0]
        clean(con, CleaningOptions(outlier_action="clip"))
        clipped_max = con.execute("SELECT max(event_count) FROM cleaned_users").fetchall()[0][0]
        clean(con, CleaningOptions(outlier_action="exclude"))
        excluded = con.execute(
            "SELECT bool_and(exclude_from_fitting) FROM cleaned_users WHERE outlier_flags IS NOT NULL"
        ).fetchall()[0][0]
    assert clipped_max < flagged_max and excluded


def test_settings_are_validated():
    with pytest.raises(ValueError, match="outlier_method"):
        CleaningOptions(outlier_method="magic")
    with pytest.raises(ValueError, match="missing_attributes"):
        CleaningOptions(missing_attributes=("shoe_size",))


def test_birth_dates_in_the_forms_linkage_reads_give_ages(tmp_path):
    # FEBRL writes 19500612; a European form writes 14/07/1961; both are dates, as linkage reads them.
    import json

    from persona_assets.core.identity import IdentityOptions, resolve
    from persona_assets.core.ingest import ingest

    births = {"u1": "19500612", "u2": "14/07/1961", "u3": "1961-07-14", "u4": "7.14.1990", "u5": "soon"}
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "people.jsonl").write_text(
        "".join(
            json.dumps(
                {"type": "identify", "userId": u, "traits": {"birthday": b}, "timestamp": "2025-03-01T00:00:00Z"}
            )
            + "\n"
            for u, b in births.items()
        )
    )
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        ingest(con, landing, b"k")
        resolve(con, IdentityOptions(linkage=False))
        clean(con)
        got = con.execute(
            """SELECT m.identifier, c.age, c.trait_issues FROM cleaned_users c
               JOIN identity_map m ON m.person_id = c.person_id AND m.identifier_type = 'user_id' ORDER BY 1"""
        ).fetchall()
    assert [(u, age) for u, age, _ in got] == [("u1", 75), ("u2", 64), ("u3", 64), ("u4", 35), ("u5", None)]
    assert [list(issues or []) for _, _, issues in got] == [[], [], [], [], ["birthday_not_a_date"]]
