"""Compiled trees score exactly as LightGBM does, for every model kind the service loads."""

from __future__ import annotations

import logging
import pickle

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from propensity.models import _compiled
from propensity.models._compiled import compile_model, compile_trees
from propensity.models.pipeline import CalibratedBooster
from propensity.models.spec import LightGBMParams
from propensity.models.uplift import LEARNERS
from propensity.serving.scorer import BoosterBundle

TOLERANCE = 1e-9
ARMS = ["control", "a", "b"]


def _features(n: int, seed: int) -> pd.DataFrame:
    """Four columns with NaN (one never missing in training) and ties at zero."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 4)), columns=["x0", "x1", "x2", "x3"])
    X.loc[rng.random(n) < 0.2, "x0"] = np.nan
    X.loc[rng.random(n) < 0.1, "x2"] = 0.0
    return X


def _probe(n: int = 400) -> np.ndarray:
    """Rows the models never saw: NaN in every column (x3 had none in training), zeros."""
    X = _features(n, seed=99).to_numpy(np.float64)
    rng = np.random.default_rng(5)
    X[rng.random(X.shape) < 0.15] = np.nan
    X[0, :] = np.nan
    X[1, :] = 0.0
    return X


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(scope="module")
def churn_like() -> CalibratedBooster:
    X = _features(3000, seed=0)
    rng = np.random.default_rng(1)
    y = (np.nan_to_num(X["x0"]) + X["x1"] + rng.normal(size=len(X)) > 0.5).astype(int)
    model = CalibratedBooster(LightGBMParams(n_estimators=60, num_leaves=7), calibration="sigmoid")
    return model.fit(X[:2400], y[:2400], eval_set=(X[2400:], y[2400:]))


def _rows_and_batches(predict, X: np.ndarray) -> list[np.ndarray]:
    """A prediction function's output one row at a time, single-threaded and on every core."""
    one = np.concatenate([np.atleast_1d(predict(X[i : i + 1], 1)) for i in range(50)])
    return [one, predict(X, 1)[:50], predict(X, 0)[:50]]


def test_binary_raw_score_and_probability_equal_lightgbm(churn_like, cache) -> None:
    X = _probe()
    booster, trees = churn_like.booster_, churn_like.best_iteration_
    compiled = compile_trees(booster, trees, cache)
    assert compiled is not None
    for raw in (True, False):
        expected = booster.predict(X, num_iteration=trees, raw_score=raw)[:50]
        for got in _rows_and_batches(lambda A, t, raw=raw: compiled.predict(A, t, raw), X):
            np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    plain = churn_like.predict_proba(X)
    fast = pickle.loads(pickle.dumps(churn_like)).compile(cache).predict_proba(X)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=TOLERANCE)


def test_categorical_features_compile_exactly(cache) -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2000, 3))
    X[:, 2] = rng.integers(0, 6, len(X))
    X[rng.random(len(X)) < 0.1, 2] = np.nan
    y = (X[:, 0] + (X[:, 2] % 2) + rng.normal(size=len(X)) > 0.5).astype(float)
    data = lgb.Dataset(X, y, categorical_feature=[2])
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7}, data, 30)
    compiled = compile_trees(booster, None, cache)
    assert compiled is not None
    probe = np.column_stack([rng.normal(size=(300, 2)), rng.integers(-1, 8, 300)]).astype(float)
    probe[::7, 2] = np.nan
    expected = booster.predict(probe, raw_score=True)
    np.testing.assert_allclose(compiled.predict(probe, 0, raw_score=True), expected, atol=TOLERANCE)
    for i in range(20):
        assert abs(compiled.predict_row(probe[i], raw_score=True) - expected[i]) <= TOLERANCE


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_every_uplift_learner_compiles_to_the_same_uplift(kind: str, cache) -> None:
    X = _features(3000, seed=2)
    rng = np.random.default_rng(4)
    treatment = rng.choice(ARMS, size=len(X), p=[0.4, 0.3, 0.3])
    y = (rng.random(len(X)) < 0.3 + 0.2 * (treatment == "a") * (X["x1"] > 0)).astype(int)
    learner = LEARNERS[kind](params={"n_estimators": 30, "min_child_samples": 50}).fit(
        X, treatment, y
    )
    probe = _probe()
    plain = [learner.uplift_matrix(probe[i : i + 1]) for i in range(30)]
    plain_batch = learner.uplift_matrix(probe, num_threads=0)
    assert learner.compile(cache) is learner
    for i in range(30):
        np.testing.assert_allclose(learner.uplift_matrix(probe[i : i + 1]), plain[i], atol=1e-12)
    np.testing.assert_allclose(learner.uplift_matrix(probe, 0), plain_batch, atol=TOLERANCE)
    np.testing.assert_allclose(learner.uplift_matrix(probe, 1), plain_batch, atol=TOLERANCE)
    # and every booster's raw score, classifier or regressor, on its own
    for model in learner._fitted_models():
        compiled = compile_trees(model.booster_, None, cache)
        assert compiled is not None
        expected = model.booster_.predict(probe, raw_score=True)
        np.testing.assert_allclose(compiled.predict(probe, 0, True), expected, atol=TOLERANCE)


def test_reasons_are_unchanged_by_compiling(churn_like, cache) -> None:
    X = _probe(200)
    plain = BoosterBundle("churn", "1", pickle.loads(pickle.dumps(churn_like)))
    fast = BoosterBundle("churn", "1", pickle.loads(pickle.dumps(churn_like)).compile(cache))
    assert fast._leaves.__self__ is fast.model.compiled_leaves_  # reasons from compiled leaves
    for rows in (X[:1], X[1:2], X):
        p_plain, c_plain = plain.predict_with_contributions(rows)
        p_fast, c_fast = fast.predict_with_contributions(rows)
        np.testing.assert_array_equal(c_fast, c_plain)
        np.testing.assert_allclose(p_fast, p_plain, atol=TOLERANCE)
        np.testing.assert_allclose(fast.predict_proba(rows), plain.predict_proba(rows), atol=1e-9)


def test_the_cache_is_reused_and_keyed_by_content(churn_like, cache) -> None:
    booster = churn_like.booster_
    first = compile_trees(booster, churn_like.best_iteration_, cache)
    assert first is not None
    built = sorted((cache / "compiled-trees").glob("*.so"))
    stamps = {p: p.stat().st_mtime_ns for p in built}
    again = compile_trees(lgb.Booster(model_str=booster.model_to_string()), None, cache)
    assert again is not None and again.library == first.library  # same trees, same file
    assert {p: p.stat().st_mtime_ns for p in built} == stamps  # nothing rebuilt
    fewer = compile_trees(booster, churn_like.best_iteration_ - 1, cache)
    assert fewer is not None and fewer.library != first.library


def test_a_failed_compile_falls_back_to_lightgbm_and_says_so_once(
    churn_like, tmp_path, caplog
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    _compiled._warned.clear()
    model = pickle.loads(pickle.dumps(churn_like))
    with caplog.at_level(logging.WARNING, logger=_compiled.__name__):
        assert compile_model(model, blocked) is model
        model.compile(blocked)
    assert model.compiled_ is None
    warnings = [r for r in caplog.records if "LightGBM's own predict" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    np.testing.assert_array_equal(model.predict_proba(_probe()), churn_like.predict_proba(_probe()))


def test_a_compiled_model_pickles_without_its_library(churn_like, cache) -> None:
    model = pickle.loads(pickle.dumps(churn_like)).compile(cache)
    assert model.compiled_ is not None
    copy = pickle.loads(pickle.dumps(model))
    assert not hasattr(copy, "compiled_")
    probe = _probe()
    np.testing.assert_allclose(copy.predict_proba(probe), model.predict_proba(probe), atol=1e-9)


#: One ulp below 433.5: its low 32 bits are all ones, which TL2cgen's ``union Entry``
#: reads as ``missing == -1`` (a sum of prices gave it in the quickstart data).
ALIASED = 433.49999999999994


def _stumps(thresholds: list[float]) -> lgb.Booster:
    """A regression booster of one-split trees on one feature, thresholds planted."""
    rng = np.random.default_rng(11)
    x = rng.uniform(-1000, 1000, size=(500, 1))
    y = (x[:, 0] > 0).astype(float) + rng.normal(scale=0.1, size=len(x))
    params = {"objective": "regression", "num_leaves": 2, "verbose": -1, "min_data_in_leaf": 5}
    booster = lgb.train(params, lgb.Dataset(x, y), len(thresholds))
    planted = iter(thresholds)
    lines = [
        f"threshold={next(planted)!r}" if line.startswith("threshold=") else line
        for line in booster.model_to_string().splitlines()
        if not line.startswith("tree_sizes=")  # byte offsets of the blocks, changed here
    ]
    return lgb.Booster(model_str="\n".join(lines) + "\n")


def test_the_aliased_value_has_the_missing_marker_in_its_low_word() -> None:
    assert int(np.array([ALIASED]).view(np.uint64)[0]) & 0xFFFFFFFF == 0xFFFFFFFF
    assert _compiled._reads_as_missing(np.array([ALIASED, -ALIASED, 433.5])).tolist() == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    "threshold",
    [
        ALIASED,  # x == t goes left, one ulp either side tells the directions apart
        float(np.nextafter(ALIASED, -np.inf)),  # the move towards zero would cross it
        -ALIASED,  # negative: the move towards zero would cross it
        float(np.nextafter(-ALIASED, -np.inf)),
        250.0,
    ],
)
def test_values_that_read_as_missing_are_compared_as_lightgbm_does(threshold, cache) -> None:
    booster = _stumps([threshold, threshold])
    compiled = compile_trees(booster, None, cache)
    assert compiled is not None
    probe = []
    for centre in (ALIASED, -ALIASED, threshold):
        probe += [centre, np.nextafter(centre, -np.inf), np.nextafter(centre, np.inf)]
    X = np.array(probe)[:, None]
    expected = booster.predict(X, raw_score=True)
    assert np.unique(expected).size == 2  # both sides of the split are probed
    np.testing.assert_array_equal(compiled.predict(X, 0, raw_score=True), expected)
    np.testing.assert_array_equal(compiled.predict(X, 1, raw_score=True), expected)
    rows = [compiled.predict_row(X[i], raw_score=True) for i in range(len(X))]
    np.testing.assert_array_equal(rows, expected)


def test_a_model_with_no_safe_move_falls_back_to_lightgbm(cache, caplog) -> None:
    booster = _stumps([ALIASED, float(np.nextafter(ALIASED, -np.inf))])
    _compiled._warned.clear()
    with caplog.at_level(logging.WARNING, logger=_compiled.__name__):
        assert compile_trees(booster, None, cache) is None
    assert "mistake for missing" in caplog.text


def test_compiled_leaves_equal_lightgbm_pred_leaf(churn_like, cache) -> None:
    """The leaf model answers every tree's leaf, NaN, zeros and aliased values included."""
    X = _probe()
    X[2, :] = ALIASED  # reads as missing to the generated code: must be stepped around
    booster, trees = churn_like.booster_, churn_like.best_iteration_
    leaves = _compiled.compile_leaves(booster, trees, cache)
    assert leaves is not None and leaves.n_outputs == trees
    expected = booster.predict(X, pred_leaf=True, num_iteration=trees)
    np.testing.assert_array_equal(leaves.leaves(X, 0), expected)
    np.testing.assert_array_equal(leaves.leaves(X, 1), expected)
    for i in range(20):
        np.testing.assert_array_equal(leaves.leaves(X[i : i + 1], 1)[0], expected[i])
    # a single-leaf tree (the booster's first ones can be) and a regression booster
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 2))
    flat = lgb.train(
        {"objective": "regression", "verbose": -1, "min_data_in_leaf": 400},
        lgb.Dataset(x, x[:, 0]),
        3,
    )
    compiled = _compiled.compile_leaves(flat, None, cache)
    assert compiled is not None
    np.testing.assert_array_equal(compiled.leaves(x, 0), flat.predict(x, pred_leaf=True))


def test_a_stack_predicts_each_booster_as_lightgbm_does(cache) -> None:
    """Boosters of different lengths and objectives, one library: each column is its booster's."""
    rng = np.random.default_rng(12)
    X = _features(2000, seed=6).to_numpy(np.float64)
    target = np.nan_to_num(X[:, 0]) + X[:, 1] + rng.normal(size=len(X))
    params = {"verbose": -1, "num_leaves": 7, "num_threads": 1}
    boosters = [
        lgb.train({**params, "objective": "regression"}, lgb.Dataset(X, target), 25),
        lgb.train({**params, "objective": "binary"}, lgb.Dataset(X, target > 0), 9),
        lgb.train({**params, "objective": "binary", "sigmoid": 2.0}, lgb.Dataset(X, target > 1), 1),
    ]
    stack = _compiled.compile_stack(boosters, cache)
    assert stack is not None
    probe = _probe()
    probe[3, :] = ALIASED
    expected = np.column_stack([b.predict(probe) for b in boosters])
    np.testing.assert_allclose(stack.predict(probe, 0), expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(stack.predict(probe, 1), expected, rtol=0, atol=TOLERANCE)
    for i in range(10):
        np.testing.assert_allclose(stack.predict(probe[i : i + 1], 1)[0], expected[i], atol=1e-12)


def test_boosters_that_cannot_share_a_library_are_not_stacked(cache, caplog) -> None:
    rng = np.random.default_rng(13)
    X = rng.normal(size=(300, 3))
    params = {"verbose": -1, "num_threads": 1}
    count = lgb.train({**params, "objective": "poisson"}, lgb.Dataset(X, rng.poisson(2, 300)), 3)
    plain = lgb.train({**params, "objective": "regression"}, lgb.Dataset(X, X[:, 0]), 3)
    narrow = lgb.train({**params, "objective": "regression"}, lgb.Dataset(X[:, :2], X[:, 0]), 3)
    _compiled._warned.clear()
    with caplog.at_level(logging.WARNING, logger=_compiled.__name__):
        assert _compiled.compile_stack([plain, count], cache) is None  # a log link
        assert _compiled.compile_stack([plain, narrow], cache) is None  # other features
    assert "not stacked" in caplog.text


def test_averaged_trees_are_not_stacked(cache, caplog) -> None:
    """LightGBM's rf averages its trees: a stack, which sums them, must not take it."""
    rng = np.random.default_rng(14)
    X = rng.normal(size=(400, 3))
    params = {"verbose": -1, "num_threads": 1, "bagging_fraction": 0.5, "bagging_freq": 1}
    forest = lgb.train(
        {**params, "boosting": "rf", "objective": "regression"}, lgb.Dataset(X, X[:, 0]), 4
    )
    plain = lgb.train({**params, "objective": "regression"}, lgb.Dataset(X, X[:, 0]), 4)
    _compiled._warned.clear()
    with caplog.at_level(logging.WARNING, logger=_compiled.__name__):
        assert _compiled.compile_stack([plain, forest], cache) is None
    assert "not stacked" in caplog.text
    assert _compiled.compile_stack([plain], cache) is not None
