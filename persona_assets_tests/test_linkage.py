"""Probabilistic identity (Splink): FEBRL benchmark accuracy, the userId guard, incremental runs, switching it off."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from persona_assets.core import linkage
from persona_assets.core.identity import IdentityOptions, resolve
from persona_assets.core.ingest import ingest

from .febrl import crm_export, febrl_events

KEY = b"k"


def _pairs(sizes: pd.Series) -> int:
    return int((sizes * (sizes - 1) // 2).sum())


def pairwise_scores(con: duckdb.DuckDBPyConnection, truth: dict[str, str]) -> tuple[float, float, float]:
    """Precision, recall and F1 over pairs of FEBRL records put in one person."""
    people = con.execute("SELECT identifier, person_id FROM identity_map WHERE identifier_type = 'anonymous_id'").df()
    people["entity"] = people.identifier.map(truth)
    assert people.entity.notna().all()
    true_pairs = _pairs(people.groupby("entity").size())
    found = _pairs(people.groupby("person_id").size())
    correct = _pairs(people.groupby(["entity", "person_id"]).size())
    precision, recall = correct / max(found, 1), correct / true_pairs
    if not correct:
        return precision, recall, 0.0
    return precision, recall, 2 * precision * recall / (precision + recall)


def scores_by_threshold(
    con: duckdb.DuckDBPyConnection, truth: dict[str, str], thresholds: tuple[float, ...]
) -> dict[float, tuple[float, float, float]]:
    """Pairwise precision, recall and F1 at each threshold from one run at a threshold no higher than
    any of them: records merge strongest link first, so a run at t merges exactly the links at or
    above t that the lower run merged. For data where each record is one anonymousId (FEBRL)."""
    links = con.execute(
        "SELECT record_id_l, record_id_r, match_probability FROM identity_links WHERE status = 'merged'"
    ).fetchall()
    anchors = con.execute("SELECT anchor, record_id FROM identity_pii WHERE anchor_type = 'anonymous_id'").fetchall()
    record = dict(anchors)
    people = pd.Series({anon: record.get(anon, anon) for anon in truth})
    entity = people.index.map(truth).to_series(index=people.index)

    def root(parent: dict[str, str], r: str) -> str:
        while parent.get(r, r) != r:
            r = parent[r]
        return r

    scores = {}
    for threshold in thresholds:
        parent: dict[str, str] = {}
        for left, right, probability in links:
            if probability >= threshold and root(parent, left) != root(parent, right):
                parent[root(parent, right)] = root(parent, left)
        scores[threshold] = cluster_scores(entity, people.map(lambda r, parent=parent: root(parent, r)))
    return scores


def cluster_scores(entity: pd.Series, cluster: pd.Series) -> tuple[float, float, float]:
    """Precision, recall and F1 over pairs of records put in one cluster, against their true entities."""
    frame = pd.DataFrame({"entity": entity.to_numpy(), "cluster": cluster.to_numpy()})
    true_pairs = _pairs(frame.groupby("entity").size())
    found = _pairs(frame.groupby("cluster").size())
    correct = _pairs(frame.groupby(["entity", "cluster"]).size())
    precision, recall = correct / max(found, 1), correct / true_pairs
    return precision, recall, 2 * precision * recall / (precision + recall) if correct else 0.0


def splink_default(
    records: list[dict], truth: dict[str, str], threshold: float = 0.5
) -> tuple[float, float, float, float]:
    """Default Splink 5 on identify records, as a new user would set it up: two name comparisons and a
    date-of-birth comparison, u by random sampling, EM blocked on birth date and on names, links at
    `threshold`, clustered. It gets the records with the preparation such a user does first: names
    lower-cased, birth dates parsed to ISO. Returns precision, recall, F1 and seconds."""
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    frame = pd.DataFrame(records).rename(columns={"anonymous_id": "unique_id"})
    frame["first_name"] = frame.first_name.str.lower()
    frame["last_name"] = frame.last_name.str.lower()
    parsed = pd.to_datetime(frame.birthday, format="mixed", dayfirst=True, errors="coerce")
    frame["birthday"] = parsed.dt.strftime("%Y-%m-%d")
    started = time.perf_counter()
    settings = SettingsCreator(
        link_type="dedupe_only",
        comparisons=[
            cl.NameComparison("first_name"),
            cl.NameComparison("last_name"),
            cl.DateOfBirthComparison("birthday", input_is_string=True),
        ],
        blocking_rules_to_generate_predictions=[
            block_on("first_name", "last_name"),
            block_on("birthday"),
            block_on("first_name", "substr(birthday, 1, 4)"),
            block_on("last_name", "substr(birthday, 1, 4)"),
        ],
    )
    with duckdb.connect() as scratch:
        db = DuckDBAPI(scratch)
        linker = Linker(db.register(frame), settings, log_level=logging.ERROR)
        linker.training.estimate_probability_two_random_records_match(
            [block_on("first_name", "last_name", "birthday")], recall=0.7
        )
        linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=1)
        linker.training.estimate_parameters_using_expectation_maximisation(block_on("birthday"))
        linker.training.estimate_parameters_using_expectation_maximisation(block_on("first_name", "last_name"))
        predictions = linker.inference.predict(threshold_match_probability=threshold)
        clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
            predictions, threshold
        ).as_pandas_dataframe()
    seconds = time.perf_counter() - started
    clusters["entity"] = clusters.unique_id.map(truth)
    precision, recall, f1 = cluster_scores(clusters.entity, clusters.cluster_id)
    return precision, recall, f1, seconds


def _load(root: Path, names: list[str]) -> tuple[duckdb.DuckDBPyConnection, dict[str, str]]:
    (root / "landing").mkdir(parents=True)
    truth = febrl_events(names, root / "landing" / "febrl.jsonl")
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    ingest(con, root / "landing", KEY)
    return con, truth


@pytest.fixture(scope="module")
def febrl3(tmp_path_factory):
    root = tmp_path_factory.mktemp("febrl3")
    con, truth = _load(root, ["dataset3.csv"])
    report = resolve(con)
    con.close()
    return root / "warehouse.duckdb", truth, report


def test_febrl3_deduplication_reaches_f1_099_without_the_social_security_number(febrl3):
    path, truth, report = febrl3
    with duckdb.connect(str(path), read_only=True) as con:
        precision, recall, f1 = pairwise_scores(con, truth)
    print(f"FEBRL3 precision {precision:.4f} recall {recall:.4f} F1 {f1:.4f}")
    assert report.links.trained and report.links.records == 5000
    # Blocking keeps the candidates near-linear: far below the 12.5M pairs of 5,000 records.
    assert report.links.candidate_pairs < 150_000
    assert f1 >= 0.99, (precision, recall, f1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, files",
    [("FEBRL1", ["dataset1.csv"]), ("FEBRL2", ["dataset2.csv"]), ("FEBRL4", ["dataset4a.csv", "dataset4b.csv"])],
)
def test_febrl_deduplication_and_linkage_reach_f1_099(tmp_path, name, files):
    """FEBRL1 and 2 (dedupe) and FEBRL4 (4a linked to 4b, as one set) through Persona's identity, defaults."""
    con, truth = _load(tmp_path, files)
    started = time.perf_counter()
    report = resolve(con)
    seconds = time.perf_counter() - started
    precision, recall, f1 = pairwise_scores(con, truth)
    con.close()
    print(
        f"{name} precision {precision:.4f} recall {recall:.4f} F1 {f1:.4f} in {seconds:.1f} s "
        f"({report.links.model_status})"
    )
    assert f1 >= 0.99, (precision, recall, f1)


@pytest.mark.slow
def test_a_crm_export_links_better_than_default_splink_side_by_side(tmp_path):
    """A real-shaped CRM export (FEBRL2 and FEBRL4a reduced to names and birth dates, upper-case,
    accents, dates in four formats): Persona with its defaults and default Splink on the same records."""
    (tmp_path / "landing").mkdir()
    records, truth = crm_export(tmp_path / "landing" / "crm.jsonl")
    splink = splink_default(records, truth, threshold=0.5)
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        ingest(con, tmp_path / "landing", KEY)
        started = time.perf_counter()
        report = resolve(con)
        seconds = time.perf_counter() - started
        persona = (*pairwise_scores(con, truth), seconds)
    default = IdentityOptions().link_threshold
    figures = {"default Splink 5 (threshold 0.5)": splink, f"Persona, defaults (threshold {default})": persona}
    for who, (precision, recall, f1, seconds) in figures.items():
        print(f"CRM export, {who}: precision {precision:.4f} recall {recall:.4f} F1 {f1:.4f} in {seconds:.1f} s")
    print(f"Persona's model: {report.links.model_status}")
    assert report.links.links > 1000  # before issue 20 the model collapsed and linked almost nothing
    assert persona[2] >= splink[2] + 0.02, figures
    assert persona[0] >= 0.98, figures  # hardly a wrong merge


def _small_crm_export(out: Path, seed: int = 7) -> dict[str, str]:
    """A small CRM export of the shape real ones have: ~300 identify records with first name, last
    name and birth date only, upper-case, from a small German name vocabulary (so many different
    people share a first and last name, with different birth dates), and ~40 duplicates whose name
    has one typo and whose birth date is the same. Returns the true person of each anonymousId."""
    import random

    rng = random.Random(seed)
    firsts = ["ANNA", "BERND", "DIETER", "EVA", "FRANK", "GRETA", "HANS", "ILSE", "JONAS", "KARIN", "LUKAS"]
    lasts = ["MUELLER", "SCHMIDT", "SCHNEIDER", "FISCHER", "WEBER", "MEYER", "WAGNER", "BECKER", "SCHULZ", "HOFFMANN"]
    people: list[tuple[str, str, str]] = []
    while len(people) < 260:
        person = (
            rng.choice(firsts),
            rng.choice(lasts),
            f"{rng.randint(1940, 2000)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        )
        # Namesakes born a digit apart are what a typo looks like: no reader could tell them apart.
        if not any(p[:2] == person[:2] and sum(a != b for a, b in zip(p[2], person[2])) <= 1 for p in people):
            people.append(person)
    records = [(f"crm-{i}", f"p{i}", *p) for i, p in enumerate(people)]
    for k, i in enumerate(rng.sample(range(len(people)), 40)):
        first, last, born = people[i]
        which = k % 3 != 0  # mostly the surname, a third the first name
        name = last if which else first
        at = rng.randrange(2, len(name))  # a typo after the first two letters
        typo = name[:at] + rng.choice([c for c in "AEIOURNLST" if c != name[at]]) + name[at + 1 :]
        records.append((f"crm-d{k}", f"p{i}", first if which else typo, typo if which else last, born))
    rng.shuffle(records)
    with out.open("w") as fh:
        for n, (anon, _, first, last, born) in enumerate(records):
            fh.write(
                json.dumps(
                    {
                        "type": "identify",
                        "messageId": f"m-{anon}",
                        "anonymousId": anon,
                        "timestamp": f"2026-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}.000Z",
                        "traits": {"first_name": first, "last_name": last, "birthday": born},
                    }
                )
                + "\n"
            )
    return {anon: person for anon, person, *_ in records}


def test_a_small_crm_export_with_typos_links_at_the_defaults(tmp_path):
    """~300 records, names and birth dates only, no duplicate agreeing exactly on everything: the prior
    comes from near-exact pairs, the model trains at the default min_link_records, and the typo
    duplicates merge while namesakes with other birth dates stay apart."""
    (tmp_path / "landing").mkdir()
    truth = _small_crm_export(tmp_path / "landing" / "crm.jsonl")
    assert len(truth) >= IdentityOptions().min_link_records
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        ingest(con, tmp_path / "landing", KEY)
        report = resolve(con)
        namesakes = con.execute(
            """SELECT count(*) FROM identity_pii l JOIN identity_pii r ON l.record_id < r.record_id
               AND l.first_name = r.first_name AND l.last_name = r.last_name AND l.birthday <> r.birthday"""
        ).fetchall()[0][0]
        precision, recall, f1 = pairwise_scores(con, truth)
    print(
        f"small CRM export: precision {precision:.4f} recall {recall:.4f} F1 {f1:.4f}; "
        f"{namesakes} namesake pairs; model: {report.links.model_status}"
    )
    assert report.links.trained and namesakes >= 100
    assert precision >= 0.95 and recall >= 0.8, (precision, recall, f1)


def _namesakes(out: Path, people: int = 500, duplicates: int = 20, seed: int = 11) -> dict[str, str]:
    """`people` different ANNA MUELLERs (no two born a digit apart) and `duplicates` of them again
    with the surname mistyped: a name so common that a budget of pairs leaves blocking on it out.
    Returns the true person of each anonymousId."""
    import random

    rng = random.Random(seed)
    born: list[str] = []
    while len(born) < people:
        day = f"{rng.randint(1940, 2000)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if not any(sum(a != b for a, b in zip(day, other)) <= 1 for other in born):
            born.append(day)
    records = [(f"anna-{i}", f"anna-{i}", "MUELLER", day) for i, day in enumerate(born)]
    for k, i in enumerate(rng.sample(range(people), duplicates)):
        records.append((f"anna-d{k}", f"anna-{i}", rng.choice(["MULLER", "MUELER", "MEULLER", "MUELLLER"]), born[i]))
    with out.open("w") as fh:
        for n, (anon, _, last, day) in enumerate(records):
            traits = {"first_name": "ANNA", "last_name": last, "birthday": day}
            event = {"type": "identify", "messageId": f"m-{anon}", "anonymousId": anon, "traits": traits}
            fh.write(json.dumps({**event, "timestamp": f"2026-01-02T00:{n // 60 % 60:02d}:{n % 60:02d}.000Z"}) + "\n")
    return {anon: person for anon, person, *_ in records}


def test_a_name_hundreds_share_is_left_out_of_blocking_and_its_duplicates_still_link(tmp_path, monkeypatch):
    """A budget of pairs too small for the 500-record ANNA MUELLER block: blocking leaves that key
    out and says so, the pairs compared fit the budget, and the model and merges are those of a run
    that compares everything: the duplicates (name typos) link, the namesakes stay apart. (Before
    the m of a comparison was estimated only from pairs found without its fields, leaving the
    block out made the fallback read namesakes born in one year as matches and link nothing.)"""
    from persona_assets.core import blocking

    (tmp_path / "landing").mkdir()
    truth = {**_small_crm_export(tmp_path / "landing" / "crm.jsonl"), **_namesakes(tmp_path / "landing" / "anna.jsonl")}

    def run(warehouse: str, opts: IdentityOptions):  # each in its own warehouse, so each trains its model
        with duckdb.connect(str(tmp_path / warehouse)) as con:
            ingest(con, tmp_path / "landing", KEY)
            return resolve(con, opts).links, pairwise_scores(con, truth)

    everything, scores_everything = run("everything.duckdb", IdentityOptions())
    monkeypatch.setattr(blocking, "MIN_BUDGET", 0)
    budgeted, scores_budgeted = run("budgeted.duckdb", IdentityOptions(link_pairs_per_record=40))
    print(f"\neverything: {everything.candidate_pairs} pairs, P/R/F1 {scores_everything}; {everything.model_status}")
    print(f"budgeted: {budgeted.candidate_pairs} pairs, P/R/F1 {scores_budgeted}; {budgeted.model_status}")
    print("left out:", *budgeted.left_out, sep="\n  ")
    assert not everything.left_out and everything.candidate_pairs > 500 * 499 / 2
    assert budgeted.candidate_pairs <= 40 * budgeted.records
    assert any(k.startswith("same first name and last name:") for k in budgeted.left_out), budgeted.left_out
    assert budgeted.model_status == everything.model_status
    assert budgeted.merges == everything.merges and scores_budgeted == scores_everything
    assert scores_everything[0] >= 0.95 and scores_everything[1] >= 0.8, scores_everything


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
SWEPT = {
    "FEBRL1": ["dataset1.csv"],
    "FEBRL2": ["dataset2.csv"],
    "FEBRL3": ["dataset3.csv"],
    "FEBRL4": ["dataset4a.csv", "dataset4b.csv"],
}


@pytest.mark.slow
def test_the_default_threshold_has_the_best_worst_f1_with_precision_098_everywhere(tmp_path):
    """Precision, recall and F1 at thresholds 0.5 to 0.9 on FEBRL1-4 and the CRM export, each from one
    run at 0.5. The default threshold is the rule's choice: of the thresholds where precision is at
    least 0.98 on every data set, those with the best worst F1, and of those the highest (a wrong
    merge costs more than a missed one)."""
    table = {}
    for name in (*SWEPT, "CRM export"):
        root = tmp_path / name
        (root / "landing").mkdir(parents=True)
        if name in SWEPT:
            truth = febrl_events(SWEPT[name], root / "landing" / "events.jsonl")
        else:
            truth = crm_export(root / "landing" / "events.jsonl")[1]
        with duckdb.connect(str(root / "w.duckdb")) as con:
            ingest(con, root / "landing", KEY)
            resolve(con, IdentityOptions(link_threshold=min(THRESHOLDS)))
            table[name] = scores_by_threshold(con, truth, THRESHOLDS)
    print("\ndata set | " + " | ".join(f"{t}: P / R / F1" for t in THRESHOLDS))
    for name, row in table.items():
        print(f"{name} | " + " | ".join("{:.3f} / {:.3f} / {:.3f}".format(*row[t]) for t in THRESHOLDS))
    precise = [t for t in THRESHOLDS if all(row[t][0] >= 0.98 for row in table.values())]
    worst = {t: min(row[t][2] for row in table.values()) for t in precise}
    best = max(worst.values())
    chosen = max(t for t in precise if worst[t] >= best - 1e-9)
    print(f"worst F1 by threshold: {worst}; chosen {chosen}")
    assert chosen == IdentityOptions().link_threshold, (chosen, worst)
    assert all(row[chosen][2] >= 0.99 for name, row in table.items() if name in SWEPT), table


def test_compared_fields_are_normalised_the_same_way_for_every_record():
    con = duckdb.connect()
    read = {}
    for column in ("first_name", "birthday"):
        sql = linkage.TRAIT_SQL[column]
        read[column] = lambda v, sql=sql, column=column: con.execute(
            f"SELECT {sql} FROM (SELECT ?::VARCHAR AS {column}) e", [v]
        ).fetchall()[0][0]
    dates = ["1980-03-12", "12/03/1980", "12.03.1980", "19800312", "1980-03-12 00:00:00", "1980-03-12T09:30:00Z"]
    assert {read["birthday"](d) for d in dates} == {"1980-03-12"}
    assert read["birthday"]("03/25/1980") == "1980-03-25"  # month first when the day cannot be a month
    assert read["birthday"]("19801312") == "1980-13-12"  # an impossible date keeps its digits for a typo match
    assert read["birthday"]("soon") is None and read["birthday"]("") is None
    assert {read["first_name"](n) for n in ("ÉLODIE", " élodie ", "Elodie", "ELODIE")} == {"elodie"}
    assert read["first_name"]("O'Brien-Smith") == "o brien smith"
    assert all(read["first_name"](n) is None for n in ("", "N/A", "null", "-", None))


def test_a_collapsed_em_model_is_not_used_the_run_falls_back_and_says_so(tmp_path, monkeypatch):
    """EM settling where issue 20 found it (exact name and birth date m ~ 0, the fuzzy levels holding
    the mass) is caught: the model saved is a fallback, its status says so, and linkage still works."""
    (tmp_path / "landing").mkdir()
    truth = febrl_events(["dataset1.csv"], tmp_path / "landing" / "febrl.jsonl")

    def collapsed(linker, db, records, limit):
        model = linker.misc.save_model_to_json()
        for comparison in model["comparisons"]:
            levels = [lv for lv in comparison["comparison_levels"] if not lv.get("is_null_level")]
            if comparison["output_column_name"] in linkage.FIXED:
                continue
            for i, level in enumerate(levels):  # exact ~ 0, every fuzzier level the same share
                level["m_probability"] = 1e-12 if i == 0 else 1 / (len(levels) - 1)
        return model

    monkeypatch.setattr(linkage, "_em_model", collapsed)
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        ingest(con, tmp_path / "landing", KEY)
        report = resolve(con, IdentityOptions(min_link_records=500))
        precision, recall, f1 = pairwise_scores(con, truth)
        saved = con.execute(f"SELECT status, settings FROM {linkage.MODEL_TABLE}").fetchall()
    print(f"FEBRL1 with a collapsed EM: precision {precision:.4f} recall {recall:.4f} F1 {f1:.4f}")
    print(report.links.model_status, report.links.problems)
    assert report.links.fallback and report.links.model_status.startswith("fallback")
    assert any("carried more evidence than 'exact'" in p for p in report.links.problems)
    assert any("pairs that agree exactly on name and birth date" in p for p in report.links.problems)
    assert len(saved) == 1 and saved[0][0] == report.links.model_status
    # The model saved is the fallback's: no fuzzier level carries more evidence than an exact match.
    weights = {(c, lv): w for c, lv, w in linkage.model_weights(json.loads(saved[0][1]))}
    for name in ("first_name", "last_name", "birthday"):
        fuzzier = [w for (c, lv), w in weights.items() if c == name and lv != "exact" and "swapped" not in lv]
        assert weights[(name, "exact")] >= max(fuzzier) - 1e-9 and weights[(name, "exact")] > 3
    assert f1 >= 0.95, (precision, recall, f1)


def test_every_merge_is_explained_by_a_stored_link(febrl3):
    path, _, report = febrl3
    with duckdb.connect(str(path), read_only=True) as con:
        links = con.execute("SELECT * FROM identity_links").df()
        merged_people = con.execute(
            "SELECT count(*) FROM (SELECT person_id FROM identity_pii GROUP BY 1 HAVING count(*) > 1)"
        ).fetchall()[0][0]
        model = con.execute("SELECT version, settings FROM identity_link_model").fetchall()
    assert len(model) == 1 and json.loads(model[0][1])["comparisons"]
    assert (links.match_probability >= IdentityOptions().link_threshold).all()
    assert set(links.status) <= {"merged", "redundant", "blocked"}
    assert (links.status == "merged").sum() == report.links.merges > 2000
    # Each link carries the weight every comparison added; they sum (with the prior) to the match weight.
    weights = links.weights.map(json.loads)
    assert {"first_name", "last_name", "birthday", "postal_code", "city"} <= set(weights.iloc[0])
    prior = links.match_weight - weights.map(lambda w: sum(w.values()))
    assert prior.max() - prior.min() < 0.01  # weights are stored to 3 decimals
    # A merged person's records are joined by merged links: records - 1 links per person.
    merges_per_person = links[links.status == "merged"].groupby("person_id").size()
    assert len(merges_per_person) == merged_people


def test_two_verified_user_ids_are_never_merged_by_a_probabilistic_link(tmp_path):
    (tmp_path / "landing").mkdir()
    source = tmp_path / "landing" / "febrl.jsonl"
    truth = febrl_events(["dataset3.csv"], source)
    # Give an original and its duplicate different userIds: the same person on paper, two accounts.
    lines = [json.loads(line) for line in source.read_text().splitlines()]
    by_entity: dict[str, list[dict]] = {}
    for event in lines:
        by_entity.setdefault(truth[event["anonymousId"]], []).append(event)
    pairs = [group[:2] for group in by_entity.values() if len(group) == 2][:50]
    for i, (a, b) in enumerate(pairs):
        a["userId"], b["userId"] = f"user-a-{i}", f"user-b-{i}"
    source.write_text("".join(json.dumps(e) + "\n" for e in lines))
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        ingest(con, tmp_path / "landing", KEY)
        resolve(con)
        people = (
            con.execute("SELECT identifier, person_id FROM identity_map WHERE identifier_type = 'user_id'")
            .df()
            .set_index("identifier")
            .person_id
        )
        blocked = con.execute("SELECT count(*) FROM identity_links WHERE status = 'blocked'").fetchall()[0][0]
    assert all(people[f"user-a-{i}"] != people[f"user-b-{i}"] for i in range(len(pairs)))
    assert blocked >= len(pairs) * 0.9  # the strong ones are recorded as blocked, with the reason


def test_incremental_linkage_equals_a_full_rebuild(tmp_path):
    (tmp_path / "all").mkdir()
    whole = tmp_path / "all" / "febrl.jsonl"
    febrl_events(["dataset3.csv"], whole)
    lines = whole.read_text().splitlines(keepends=True)
    landing = tmp_path / "landing"
    landing.mkdir()
    path = tmp_path / "w.duckdb"
    # A model is trained on the first part; later parts are linked with it, incrementally.
    parts = [lines[:3000], lines[3000:4200], lines[4200:]]
    with duckdb.connect(str(path)) as con:
        for i, part in enumerate(parts):
            (landing / f"part{i}.jsonl").write_text("".join(part))
            ingest(con, landing, KEY)
            assert resolve(con).mode == ("full" if i == 0 else "incremental")
    full = tmp_path / "full.duckdb"
    shutil.copy(path, full)
    with duckdb.connect(str(full)) as con:
        assert resolve(con, full=True).mode == "full"
    q = {
        "identity_map": "SELECT identifier_type, identifier, person_id FROM identity_map ORDER BY ALL",
        "identity_pii": "SELECT * FROM identity_pii ORDER BY record_id",
        "identity_links": "SELECT * EXCLUDE (weights) FROM identity_links ORDER BY record_id_l, record_id_r",
        "deduped_users": "SELECT * FROM deduped_users ORDER BY person_id",
    }
    with duckdb.connect(str(path), read_only=True) as a, duckdb.connect(str(full), read_only=True) as b:
        for table, sql in q.items():
            pd.testing.assert_frame_equal(a.execute(sql).df(), b.execute(sql).df(), check_exact=False, obj=table)


def test_linkage_can_be_switched_off(febrl3, tmp_path):
    path, truth, _ = febrl3
    copy = tmp_path / "w.duckdb"
    shutil.copy(path, copy)
    with duckdb.connect(str(copy)) as con:
        report = resolve(con, IdentityOptions(linkage=False))
        people = con.execute("SELECT count(DISTINCT person_id) FROM identity_map").fetchall()[0][0]
        history = con.execute("SELECT change FROM person_id_history").fetchall()
    assert report.mode == "full" and not report.links.enabled
    assert people == 5000  # every FEBRL record is its own person again
    assert {c for (c,) in history} >= {"split"}  # and the split people are recorded


def test_generated_people_are_not_overmerged_by_linkage(resolved):
    """On generated data (everyone stitched deterministically already) linkage runs and must not hurt precision."""
    path, _ = resolved
    with duckdb.connect(str(path), read_only=True) as con:
        records = con.execute("SELECT count(*) FROM identity_pii").fetchall()[0][0]
        models = con.execute("SELECT count(*) FROM identity_link_model").fetchall()[0][0]
    assert records >= 1000 and models == 1
    # test_identity's precision and recall over anonymousIds run on this same warehouse.


def test_the_identity_asset_reports_linkage_in_dagster(persona_home):
    import dagster as dg

    from persona_assets.definitions import build_definitions

    febrl_events(["dataset3.csv"], persona_home / "landing" / "febrl3.jsonl")
    keys = [
        "raw_events",
        "quarantined_events",
        "ingest_files",
        "deduped_users",
        "identity_map",
        "identity_guard",
        "identity_links",
        "identity_pii",
        "person_id_history",
    ]
    job = build_definitions(persona_home).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey(k) for k in keys]
    )
    assert result.success
    checks = {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert checks["identity_links_contract"] and checks["identity_pii_contract"]
    metadata = {
        e.asset_key.path[-1]: e.step_materialization_data.materialization.metadata
        for e in result.get_asset_materialization_events()
    }["identity_links"]
    assert metadata["threshold"].value == IdentityOptions().link_threshold and metadata["model_trained_this_run"].value
    assert metadata["candidate_pairs"].value > metadata["links_above_threshold"].value > metadata["merges"].value > 2000
    assert "data:image/png;base64," in metadata["match_weights"].value
    # The model itself: a match-weight chart per comparison (and its table), links at each threshold.
    assert "data:image/png;base64," in metadata["model_match_weights"].value
    assert re.search(r"\|\s*first_name\s*\|\s*exact\s*\|", metadata["model_match_weights_table"].value)
    assert "0.999" in metadata["links_at_each_threshold"].value
    assert metadata["model_status"].value.startswith("trained by EM") and metadata["status"].value == "fitted"
