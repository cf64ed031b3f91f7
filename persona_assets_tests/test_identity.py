import json
import shutil

import duckdb
import pandas as pd
import pytest

from persona_assets.core.identity import IdentityOptions, resolve
from persona_assets.core.ingest import ingest
from persona_assets.datagen import Shape, generate


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
        resolve(
            con,
            IdentityOptions(
                max_user_ids_per_identifier=100, max_emails_per_identifier=100, max_anonymous_ids_per_identifier=10_000
            ),
        )
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


# --- Duplicate accounts and family emails (issue 20, part 2) -------------------------------------


@pytest.fixture(scope="module")
def accounts(tmp_path_factory):
    """Generated people, 5% with a second account (same email and names) and 3% pairs sharing a
    family email (other first names): resolved first without linkage, then with it."""
    root = tmp_path_factory.mktemp("accounts")
    shape = Shape(duplicate_account_share=0.05, family_email_share=0.03)
    generate(2000, 3, root / "landing", shape=shape, truth_dir=root / "truth")
    path = root / "w.duckdb"
    with duckdb.connect(str(path)) as con:
        ingest(con, root / "landing", b"k")
        resolve(con, IdentityOptions(linkage=False), run_id="deterministic")
        report = resolve(con, IdentityOptions(min_link_records=100), run_id="linkage")
    return path, pd.read_parquet(root / "truth" / "people.parquet"), report


def _user_people(con) -> pd.Series:
    return (
        con.execute("SELECT identifier, person_id FROM identity_map WHERE identifier_type = 'user_id'")
        .df()
        .set_index("identifier")
        .person_id
    )


def test_two_accounts_sharing_an_email_with_agreeing_names_merge(accounts):
    path, people, report = accounts
    with duckdb.connect(str(path), read_only=True) as con:
        person = _user_people(con)
        several = con.execute(
            "SELECT list(identifier) FROM identity_map WHERE identifier_type = 'user_id' GROUP BY person_id "
            "HAVING count(*) > 1"
        ).fetchall()
        links = con.execute(
            "SELECT weights, status, reason, match_probability FROM identity_links WHERE reason IS NOT NULL"
        ).df()
        history = con.execute("SELECT change, run_id, count(*) FROM person_id_history GROUP BY ALL").fetchall()
    planted = people[people.second_user_id.notna()]
    merged = sum(person.get(a) == person.get(b) for a, b in zip(planted.user_id, planted.second_user_id))
    owner = {**dict(zip(people.user_id, people.person_key)), **dict(zip(planted.second_user_id, planted.person_key))}
    right = sum(len({owner[u] for u in users}) == 1 for (users,) in several)
    recall, precision = merged / len(planted), right / len(several)
    print(f"duplicate accounts: {len(planted)} planted, precision {precision:.4f} recall {recall:.4f}")
    assert len(planted) >= 50 and recall >= 0.9 and precision == 1.0
    # Each merge is a link with the weights that made it, the shared email's among them...
    assert len(links) == merged and (links.status == "merged").all()
    assert (links.reason == "two accounts with one email or phone").all()
    assert (links.match_probability >= IdentityOptions().link_threshold).all()
    assert all(json.loads(w)["shared_contact"] > 10 for w in links.weights)
    # ...and the people merged are recorded as merged.
    assert ("merge", "linkage", merged) in history


def test_a_family_sharing_an_email_stays_apart(accounts):
    path, people, _ = accounts
    with duckdb.connect(str(path), read_only=True) as con:
        person = _user_people(con)
        guarded = set(
            con.execute("SELECT identifier FROM identity_guard WHERE identifier_type = 'email'").df().identifier
        )
        mapped = set(con.execute("SELECT identifier FROM identity_map WHERE identifier_type = 'email'").df().identifier)
    heads = people.set_index("person_key").user_id
    family = people[people.shares_email_with.notna()]
    apart = sum(person[u] != person[heads[h]] for u, h in zip(family.user_id, family.shares_email_with))
    print(f"family emails: {len(family)} planted, kept apart {apart} ({apart / len(family):.4f})")
    assert len(family) >= 25 and apart == len(family)
    assert guarded and not guarded & mapped  # the shared email still links nobody by itself


def test_accounts_merged_incrementally_equal_a_full_rebuild(tmp_path):
    shape = Shape(duplicate_account_share=0.08, family_email_share=0.04)
    generate(1500, 5, tmp_path / "all", shape=shape, people_per_file=500, truth_dir=tmp_path / "truth")
    landing = tmp_path / "landing"
    landing.mkdir()
    path = tmp_path / "w.duckdb"
    opts = IdentityOptions(min_link_records=100)
    with duckdb.connect(str(path)) as con:
        for i, source in enumerate(sorted((tmp_path / "all").glob("*.jsonl"))):
            shutil.copy(source, landing / source.name)
            ingest(con, landing, b"k")
            assert resolve(con, opts).mode == ("full" if i == 0 else "incremental")
        assert con.execute("SELECT count(*) FROM identity_pii WHERE shared_contact IS NOT NULL").fetchall()[0][0]
    full = tmp_path / "full.duckdb"
    shutil.copy(path, full)
    with duckdb.connect(str(full)) as con:
        resolve(con, opts, full=True)
    q = {
        "identity_map": "SELECT identifier_type, identifier, person_id FROM identity_map ORDER BY ALL",
        "identity_pii": "SELECT * FROM identity_pii ORDER BY record_id",
        "identity_links": "SELECT * EXCLUDE (weights) FROM identity_links ORDER BY record_id_l, record_id_r",
    }
    with duckdb.connect(str(path), read_only=True) as a, duckdb.connect(str(full), read_only=True) as b:
        for table, sql in q.items():
            pd.testing.assert_frame_equal(a.execute(sql).df(), b.execute(sql).df(), check_exact=False, obj=table)
