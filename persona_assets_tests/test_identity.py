import shutil

import duckdb
import pandas as pd

from persona_assets.core.identity import IdentityOptions, resolve


def _pairs(frame: pd.DataFrame, keys) -> int:
    sizes = frame.groupby(keys).size()
    return int((sizes * (sizes - 1) // 2).sum())


def _anonymous_people(con, truth_dir) -> pd.DataFrame:
    truth = pd.read_parquet(truth_dir / "identifiers.parquet")
    mapped = con.execute(
        "SELECT identifier AS anonymous_id, person_id FROM identity_map WHERE identifier_type = 'anonymous_id'"
    ).df()
    return truth.merge(mapped, on="anonymous_id", how="left")


def test_pairwise_precision_and_recall_over_anonymous_ids(resolved):
    path, truth_dir = resolved
    with duckdb.connect(str(path), read_only=True) as con:
        joined = _anonymous_people(con, truth_dir)
    assert joined.person_id.notna().all()
    true_pairs = _pairs(joined, "person_key")
    found = _pairs(joined, "person_id")
    correct = _pairs(joined, ["person_key", "person_id"])
    assert correct / found >= 0.99, "precision"
    assert correct / true_pairs >= 0.99, "recall"


def test_a_shared_tablet_does_not_merge_the_household(resolved):
    path, truth_dir = resolved
    with duckdb.connect(str(path), read_only=True) as con:
        joined = _anonymous_people(con, truth_dir)
        guarded = con.execute("SELECT identifier FROM identity_guard WHERE identifier_type = 'device_id'").df()
    shared = joined[joined.shared_device]
    assert shared.device_id.nunique() >= 2
    # Each household member on the tablet stays their own person.
    assert (shared.groupby("person_id").person_key.nunique() == 1).all()
    assert set(shared.device_id) <= set(guarded.identifier)


def test_without_the_guard_the_household_would_merge(resolved, tmp_path):
    path, truth_dir = resolved
    copy = tmp_path / "w.duckdb"
    shutil.copy(path, copy)
    with duckdb.connect(str(copy)) as con:
        resolve(con, IdentityOptions(max_user_ids_per_identifier=100, max_emails_per_identifier=100,
                                     max_anonymous_ids_per_identifier=10_000))  # fmt: skip
        joined = _anonymous_people(con, truth_dir)
    shared = joined[joined.shared_device]
    assert (shared.groupby("person_id").person_key.nunique() > 1).any()


def test_person_ids_are_stable_across_reruns_and_history_records_merges(resolved, tmp_path):
    path, _ = resolved
    copy = tmp_path / "w.duckdb"
    shutil.copy(path, copy)
    with duckdb.connect(str(copy)) as con:
        before = con.execute("SELECT * FROM identity_map ORDER BY ALL").df()
        resolve(con, run_id="rerun")
        after = con.execute("SELECT * FROM identity_map ORDER BY ALL").df()
        assert before.equals(after)
        assert con.execute("SELECT count(*) FROM person_id_history").fetchall()[0][0] == 0
        # An alias joining two people's anonymousIds merges them; history says old -> new.
        a, b = con.execute(
            "SELECT min(identifier) FROM identity_map WHERE identifier_type = 'anonymous_id' AND person_id IN "
            "(SELECT person_id FROM deduped_users WHERE user_id IS NULL) GROUP BY person_id ORDER BY 1 LIMIT 2"
        ).fetchall()
        con.execute(
            "INSERT INTO raw_events (message_id, event_type, anonymous_id, previous_id, event_at, batch_id, source_line) "
            "VALUES ('merge-1', 'alias', ?, ?, TIMESTAMP '2026-09-30 12:00:00', 999, 1)",
            [a[0], b[0]],
        )
        report = resolve(con, run_id="merge")
        history = con.execute("SELECT change, run_id FROM person_id_history").fetchall()
        people = con.execute(
            "SELECT count(DISTINCT person_id) FROM identity_map WHERE identifier IN (?, ?)", [a[0], b[0]]
        ).fetchall()[0][0]
    assert people == 1 and report.history >= 1
    assert ("merge", "merge") in history


def test_traits_survive_by_most_recent_value_with_their_source(resolved):
    path, _ = resolved
    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute(
            """SELECT d.person_id, d.country, d.country_observed_at, d.country_message_id, e.country, e.event_at
               FROM deduped_users d JOIN raw_events e ON e.message_id = d.country_message_id
               WHERE d.country IS NOT NULL LIMIT 1"""
        ).fetchall()[0]
        latest = con.execute(
            "SELECT max(event_at) FROM person_events WHERE person_id = ? AND country IS NOT NULL", [row[0]]
        ).fetchall()[0][0]
    assert row[1] == row[4] and row[2] == row[5] == latest


def test_the_latest_valid_value_survives_and_the_invalid_one_stays_visible(resolved, tmp_path):
    from persona_assets.core.cleaning import clean

    path, _ = resolved
    copy = tmp_path / "w.duckdb"
    shutil.copy(path, copy)
    with duckdb.connect(str(copy)) as con:
        anon, person = con.execute(
            """SELECT identifier, person_id FROM identity_map WHERE identifier_type = 'anonymous_id'
               AND person_id IN (SELECT person_id FROM deduped_users WHERE consent IS NULL) ORDER BY 1 LIMIT 1"""
        ).fetchall()[0]
        # 34 (a woman in Germany) first; later an age of 150, a gender and a country nobody knows.
        for message_id, at, age, gender, country in [
            ("said-34", "2026-09-30 20:00:00", "34", "F", "Deutschland"),
            ("said-150", "2026-09-30 21:00:00", "150", "xyz", "Atlantis"),
        ]:
            con.execute(
                """INSERT INTO raw_events (message_id, event_type, anonymous_id, event_at, batch_id, source_line,
                                           age, gender, country)
                   VALUES (?, 'identify', ?, ?::TIMESTAMP, 999, 1, ?, ?, ?)""",
                [message_id, anon, at, age, gender, country],
            )
        resolve(con, run_id="traits")
        clean(con)
        deduped = con.execute(
            "SELECT age, age_message_id, gender, country_message_id FROM deduped_users WHERE person_id = ?", [person]
        ).fetchall()[0]
        cleaned = con.execute(
            "SELECT age, gender, country, trait_issues FROM cleaned_users WHERE person_id = ?", [person]
        ).fetchall()[0]
    # Before issue 21 the 150 survived and the person ended with no age, gender or country.
    assert deduped == ("34", "said-34", "F", "said-34")
    assert cleaned[:3] == (34, "female", "DE")
    assert {"age_out_of_range", "gender_unrecognized", "country_unrecognized"} <= set(cleaned[3])
