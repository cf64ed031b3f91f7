import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from persona_assets.core import features, segments
from persona_assets.core.segments import Candidate, SegmentOptions, knee, pick_k, pick_space, stability

from .conftest import person_truth


@pytest.fixture
def segmented(segmented_once, tmp_path):
    """A private copy of the session's segmented warehouse and its models, with the build's result."""
    import shutil

    import duckdb

    from persona_assets.core.models import ModelStore

    path, models, truth_dir, result = segmented_once
    shutil.copy2(path, tmp_path / "warehouse.duckdb")
    shutil.copytree(models, tmp_path / "models")
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    yield con, ModelStore(tmp_path / "models"), truth_dir, result
    con.close()


def _segments(con) -> pd.DataFrame:
    return con.execute("SELECT * FROM segments ORDER BY person_id").df()


def test_segments_recover_the_planted_archetypes(segmented):
    con, _, truth_dir, result = segmented
    people = _segments(con).merge(person_truth(con, truth_dir), on="person_id")
    humans = people[~people.is_bot]
    ari = adjusted_rand_score(humans.archetype, humans.segment_id)
    assert ari >= 0.8, f"adjusted Rand index {ari:.3f}"
    assert result.model.chosen_k == 5


def test_retraining_on_the_same_data_keeps_people_in_their_segment_ids(segmented):
    con, store, _, first = segmented
    before = _segments(con)
    again = segments.build(con, store, SegmentOptions(seed=3), retrain=True)
    after = _segments(con)
    assert again.trained and again.model.version == first.model.version + 1
    kept = (before.set_index("person_id").segment_id == after.set_index("person_id").segment_id).mean()
    assert kept >= 0.95
    # Sub-segments live in the feature space, so a new autoencoder does not reshuffle them.
    sub_kept = (before.set_index("person_id").subsegment_id == after.set_index("person_id").subsegment_id).mean()
    assert sub_kept >= 0.75, sub_kept
    assert again.moved_share == pytest.approx(1 - kept)
    matching = again.model.matching
    assert len(matching) == first.model.chosen_k and matching.kept_id.all()


def test_a_refresh_assigns_with_the_saved_model(segmented):
    con, store, _, first = segmented
    # Nothing changed upstream: an incremental refresh has nobody to assign.
    idle = segments.build(con, store, SegmentOptions())
    assert idle.mode == "incremental" and idle.people_recomputed == 0
    again = segments.build(con, store, SegmentOptions(), full=True)
    assert not again.trained and again.model.version == first.model.version
    assert again.moved_share == 0
    # A features refit means the saved model no longer fits the matrix: it retrains.
    features.build(con, store, features.FeatureOptions(), refit=True)
    assert segments.build(con, store, SegmentOptions()).why == "features were refitted"


def test_everyone_with_behaviour_has_a_segment_and_excluded_people_are_low_confidence(segmented):
    con, *_ = segmented
    table = _segments(con).merge(
        con.execute("SELECT person_id, is_sparse, behaviour_events, exclude_from_fitting FROM cleaned_users").df(),
        on="person_id",
    )
    assert len(table) == con.execute("SELECT count(*) FROM cleaned_users").fetchall()[0][0]
    assert (table.segment_id.isna() == (table.behaviour_events == 0)).all()
    # Sparse people with behaviour are segmented like anyone (issue 19); bots are low confidence.
    assert (table.is_sparse & ~table.low_confidence).any()
    assert (table.low_confidence == table.exclude_from_fitting).all()
    assert table.segment_confidence.between(0, 1).all()
    assert 0 < table.is_noise.mean() < 0.3


def test_names_are_readable_unique_and_subsegments_nest(segmented):
    con, *_ = segmented
    catalog = con.execute("SELECT * FROM segment_catalog").df()
    top = catalog[catalog.level == "segment"]
    assert top.name.is_unique and top.explanation.str.contains(" sd").all()
    assert top.name.str.contains("Fans").sum() >= 4, "category-led archetypes are named after their categories"
    table = _segments(con)
    segmented_people = table[table.segment_id.notna()]
    assert (segmented_people.subsegment_id.str.split(".").str[0] == segmented_people.segment_id).all()
    subs = catalog[catalog.level == "subsegment"]
    assert set(subs.parent_id) == set(top.id)
    assert top.people.sum() == len(segmented_people)


def test_the_elbow_is_the_knee_of_the_inertia_curve():
    ks = list(range(2, 11))
    inertia = [100, 70, 45, 22, 20, 18.5, 17.5, 16.8, 16.2]
    assert knee(ks, inertia) == 5


def test_k_and_space_are_the_most_stable_under_resampling():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 8, size=(4, 6))
    blobs = np.concatenate([c + rng.normal(size=(300, 6)) for c in centres])
    opts = SegmentOptions()
    scores = {k: stability(blobs, k, opts) for k in (2, 3, 4, 5, 6)}
    assert scores[4] >= 0.95 and scores[5] < scores[4] - 0.03 and scores[6] < scores[4] - 0.03, scores
    assert pick_k([Candidate("features", k, s, "") for k, s in scores.items()], 0.03).k == 4
    # A space whose k merged two groups can be as stable; of equally stable picks, the fewer
    # segments win, then the raw features; a clearly more stable pick wins whatever its k.
    picks = [Candidate("autoencoder", 5, 0.99, ""), Candidate("features", 6, 0.98, "")]
    assert pick_space(picks, 0.03).space == "autoencoder"
    picks = [Candidate("autoencoder", 5, 0.99, ""), Candidate("features", 5, 0.97, "")]
    assert pick_space(picks, 0.03).space == "features"
    picks = [Candidate("autoencoder", 4, 0.99, ""), Candidate("features", 5, 0.90, "")]
    assert pick_space(picks, 0.03).k == 4


def test_the_autoencoder_space_is_compared_with_the_raw_features(segmented):
    model = segmented[3].model
    assert {"silhouette_features", "silhouette_autoencoder", "stability_features", "stability_autoencoder"} <= set(
        model.scores
    )
    best = max(model.scores[f"stability_{s}"] for s in ("features", "autoencoder"))
    assert model.scores[f"stability_{model.space}"] >= best - SegmentOptions().stability_tolerance
    assert "stability" in model.reason and f"k={model.chosen_k}" in model.reason
    assert set(model.curves.space) == {"features", "autoencoder"}
    assert segments.curves_png(model)[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_space_only_when_asked(warehouse_copy):
    con, store, _ = warehouse_copy
    features.build(con, store, features.FeatureOptions())
    model = segments.build(con, store, SegmentOptions(space="features", k_max=6)).model
    assert model.space == "features" and model.encoder is None and "silhouette_autoencoder" not in model.scores
    assert np.isfinite(model.curves.silhouette).all()


def test_features_that_move_together_count_as_one():
    rng = np.random.default_rng(3)
    buying = rng.exponential(size=2_000) * (rng.random(2_000) < 0.1)
    X = np.column_stack(
        [
            buying,
            2 * buying + rng.normal(0, 0.01, 2_000),
            np.sqrt(buying) * 3,  # three measures of one thing
            rng.normal(size=2_000),
            rng.normal(size=2_000),  # independent
            np.zeros(2_000),  # constant: no correlation with anything
        ]
    )
    names = ["orders", "revenue", "value", "mobile", "night", "other"]
    weights, together = segments.redundancy_weights(X, names, 0.75)
    assert together == [["orders", "revenue", "value"]]
    np.testing.assert_allclose(weights, [3**-0.5] * 3 + [1, 1, 1])
    # the group adds as much variance to a distance as one feature does
    standardized = (X[:, :3] - X[:, :3].mean(0)) / X[:, :3].std(0)
    assert ((standardized * weights[:3]) ** 2).sum(1).mean() == pytest.approx(1)
    assert segments.redundancy_weights(X, names, 1.0)[1] == []  # nothing is perfectly correlated
