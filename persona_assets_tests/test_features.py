import numpy as np
import pandas as pd
import pytest

from persona_assets.core import features
from persona_assets.core.features import LOG_FEATURES, FeatureOptions, build, fences, load_base
from persona_assets.core.models import ModelStore


def _table(con) -> pd.DataFrame:
    return con.execute("SELECT * FROM normalized_features ORDER BY person_id").df()


def test_one_row_per_person_with_behaviour_fitted_without_excluded(warehouse_copy):
    con, store, _ = warehouse_copy
    result = build(con, store, FeatureOptions())
    table = _table(con)
    people = con.execute("SELECT person_id, is_sparse, behaviour_events, exclude_from_fitting FROM cleaned_users").df()
    assert set(table.person_id) == set(people.loc[people.behaviour_events > 0, "person_id"])
    # Few traits (sparse) does not keep a person with behaviour out of fitting.
    assert table.person_id.isin(people.loc[people.is_sparse, "person_id"]).any()
    fitted = people.loc[~people.exclude_from_fitting, "person_id"]
    assert set(table.loc[table.used_for_fitting, "person_id"]) == set(fitted)
    assert result.transform.fitted_rows == len(fitted)


def test_zscore_centres_fitted_rows_and_minmax_bounds_them(warehouse_copy):
    con, store, _ = warehouse_copy
    transform = build(con, store, FeatureOptions(scaling="zscore")).transform
    fit = _table(con).query("used_for_fitting")[transform.features]
    varying = fit.columns[fit.std() > 0]
    assert np.allclose(fit.mean(), 0, atol=1e-6)
    assert np.allclose(fit[varying].std(ddof=0), 1, atol=1e-6)
    transform = build(con, store, FeatureOptions(scaling="minmax")).transform
    fit = _table(con).query("used_for_fitting")[transform.features]
    assert fit.min().min() >= -1e-9 and fit.max().max() <= 1 + 1e-9
    assert transform.version == 2, "a settings change fits and saves a new version"


def test_heavy_tails_are_log1p_and_clipped_at_the_fences(warehouse_copy):
    con, store, _ = warehouse_copy
    con.execute(
        "UPDATE cleaned_users SET total_revenue = 1e9 WHERE person_id = (SELECT min(person_id) FROM cleaned_users "
        "WHERE NOT exclude_from_fitting)"
    )
    transform = build(con, store, FeatureOptions()).transform
    table = _table(con).set_index("person_id")
    whale = con.execute("SELECT person_id FROM cleaned_users WHERE total_revenue = 1e9").fetchall()[0][0]
    top = (transform.clip_hi["total_revenue"] - transform.center["total_revenue"]) / transform.scale["total_revenue"]
    assert table.loc[whale, "total_revenue"] == pytest.approx(top)
    assert np.log1p(1e9) > transform.clip_hi["total_revenue"]
    assert set(LOG_FEATURES) <= set(transform.clip_hi)


def test_new_people_are_scored_with_the_saved_transform_until_a_refit(warehouse_copy):
    con, store, _ = warehouse_copy
    first = build(con, store, FeatureOptions()).transform
    # New people arrive with much bigger spend: the saved transform still applies unchanged.
    # (The table is edited behind the change log's back, so the rebuild is asked to be full.)
    con.execute("UPDATE cleaned_users SET total_revenue = total_revenue * 10")
    again = build(con, store, FeatureOptions(), full=True)
    assert again.transform.version == first.version and "saved transform" in again.reason
    saved = store.load(features.FEATURES_KIND, first.version).payload
    base = load_base(con, saved.categories, "WHERE behaviour_events > 0")
    expected = saved.apply(base).set_index(base.person_id)
    table = _table(con).set_index("person_id")[saved.features]
    pd.testing.assert_frame_equal(table, expected[saved.features], check_names=False, atol=1e-9)
    refit = build(con, store, FeatureOptions(), refit=True)
    assert refit.transform.version == first.version + 1 and refit.reason == "refit on request"


def test_fences_follow_the_cleaning_methods_and_skip_constant_features():
    values = np.r_[np.zeros(10), np.arange(1.0, 101.0)]
    lo, hi = fences(values, "iqr", 1.5)
    q1, q3 = np.quantile(values, [0.25, 0.75])
    assert (lo, hi) == pytest.approx((q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)))
    assert fences(np.zeros(50), "mad", 3.5) == (-np.inf, np.inf)
    assert fences(values, "none", 3.5) == (-np.inf, np.inf)


def test_bad_settings_are_refused(warehouse_copy):
    con, store, _ = warehouse_copy
    with pytest.raises(ValueError, match="scaling"):
        build(con, store, FeatureOptions(scaling="robust"))


def test_model_store_versions_and_leaves_no_temporary_files(tmp_path):
    store = ModelStore(tmp_path)
    assert store.latest("x") is None
    store.save("x", {"a": 1}, {"note": "first"})
    saved = store.save("x", {"a": 2})
    assert saved.version == 2 and store.latest("x").payload == {"a": 2} and store.load("x", 1).payload == {"a": 1}
    assert not list(tmp_path.rglob("*.tmp"))
    assert (tmp_path / "x" / "v0001.json").exists()
