"""Path attribution: exact bookkeeping, and close to TreeSHAP where it matters (the top reason)."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from propensity.models.attribution import PathAttribution


def _data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    X[rng.random(X.shape) < 0.05] = np.nan
    x = np.nan_to_num(X)
    # Interactions and a threshold, so that paths and Shapley values can disagree.
    logit = 1.5 * x[:, 0] - x[:, 1] * (x[:, 2] > 0) + 0.8 * np.abs(x[:, 3]) - 1.0
    y = (logit + rng.logistic(size=n) > 0).astype(int)
    return X, y


def _booster(params: dict[str, object], rounds: int = 60) -> tuple[lgb.Booster, np.ndarray]:
    """A binary booster fitted on 2,500 rows, and 500 other rows to explain."""
    X, y = _data()
    params = {
        "objective": "binary",
        "verbose": -1,
        "seed": 0,
        "learning_rate": 0.1,
        "num_threads": 1,
        **params,
    }
    return lgb.train(params, lgb.Dataset(X[:2500], y[:2500]), rounds), X[2500:]


def test_contributions_add_up_to_the_raw_score_with_treeshap_bias() -> None:
    booster, X = _booster({"num_leaves": 15}, rounds=120)
    booster.best_iteration = 80  # as early stopping leaves it: the first 80 trees are the model
    paths = PathAttribution(booster)
    assert paths.num_iteration == 80
    contributions = paths(X)
    shap = booster.predict(X, pred_contrib=True)
    raw = booster.predict(X, raw_score=True)
    assert contributions.shape == shap.shape == (len(X), 7)
    np.testing.assert_allclose(contributions.sum(axis=1), raw, atol=1e-10)
    np.testing.assert_allclose(contributions[:, -1], shap[:, -1], atol=1e-10)
    np.testing.assert_allclose(paths.probability(contributions), booster.predict(X), atol=1e-12)
    # Features 4 and 5 are noise the trees may split on a little; none matters much.
    assert np.abs(contributions[:, 4:6]).mean() < 0.2 * np.abs(contributions[:, 0]).mean()


def test_stumps_give_exactly_the_shapley_values() -> None:
    # With one split per tree, crediting the path is the Shapley value.
    booster, X = _booster({"num_leaves": 2}, rounds=80)
    np.testing.assert_allclose(
        PathAttribution(booster)(X), booster.predict(X, pred_contrib=True), atol=1e-10
    )


def test_top_reason_agrees_with_treeshap() -> None:
    booster, X = _booster({"num_leaves": 15}, rounds=150)
    paths = PathAttribution(booster)(X)[:, :-1]
    shap = booster.predict(X, pred_contrib=True)[:, :-1]
    top_path = np.abs(paths).argmax(axis=1)
    top_shap = np.abs(shap).argmax(axis=1)
    agreement = float((top_path == top_shap).mean())
    assert agreement >= 0.8, agreement
    # Where they differ, the path's top reason is mostly TreeSHAP's second.
    top_two = np.argsort(-np.abs(shap), axis=1)[:, :2]
    within = np.mean([t in s for t, s in zip(top_path, top_two, strict=True)])
    assert within >= 0.9, (agreement, within)


def test_few_rows_and_many_rows_paths_agree() -> None:
    booster, X = _booster({"num_leaves": 31}, rounds=40)
    paths = PathAttribution(booster, num_iteration=25)
    leaves = paths.leaves(X)
    assert leaves.shape == (len(X), 25)
    many = paths.from_leaves(leaves)
    few = np.vstack([paths.from_leaves(leaves[i : i + 3]) for i in range(0, len(X), 3)])
    np.testing.assert_allclose(few, many, atol=1e-12)
    raw = booster.predict(X, raw_score=True, num_iteration=25)
    np.testing.assert_allclose(many.sum(axis=1), raw, atol=1e-10)


def test_non_binary_models() -> None:
    X, y = _data(600)
    regression = lgb.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1}, lgb.Dataset(X, y), 10
    )
    paths = PathAttribution(regression)
    assert paths.sigmoid is None
    np.testing.assert_allclose(paths(X).sum(axis=1), regression.predict(X), atol=1e-10)
    with pytest.raises(ValueError, match="binary objective"):
        paths.probability(paths(X))
    labels = (np.nan_to_num(X[:, 0]) > 0).astype(int) + (np.nan_to_num(X[:, 1]) > 0)
    multiclass = lgb.train(
        {"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1},
        lgb.Dataset(X, labels),
        5,
    )
    with pytest.raises(ValueError, match="binary or regression"):
        PathAttribution(multiclass)
