"""The shared LightGBM pipeline and the baselines on synthetic frames with a known signal."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from propensity import evaluation as ev
from propensity.models.baselines import LogisticBaseline, RecencyRule
from propensity.models.pipeline import CalibratedBooster, as_matrix
from propensity.models.spec import LightGBMParams


def _data(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 5)), columns=list("abcde"))
    X.loc[rng.uniform(size=n) < 0.05, "b"] = np.nan
    # a non-linear truth with a rare positive class (~10%)
    logit = -3.0 + 1.5 * X["a"] + 1.2 * (X["c"] ** 2 > 1) - 0.8 * X["b"].fillna(0)
    p = 1 / (1 + np.exp(-logit.to_numpy()))
    return X, (rng.uniform(size=n) < p).astype(int), p


@pytest.fixture(scope="module")
def splits():
    return _data(8000, 1), _data(3000, 2), _data(5000, 3)


@pytest.mark.parametrize("class_weight", ["balanced", "none"])
def test_calibrated_probabilities_are_honest(splits, class_weight):
    (X, y, _), (Xv, yv, _), (Xt, yt, pt) = splits
    params = LightGBMParams(num_leaves=7, min_child_samples=50, class_weight=class_weight)
    model = CalibratedBooster(params, early_stopping_rounds=20, seed=0).fit(X, y, eval_set=(Xv, yv))
    proba = model.predict_proba(Xt)
    assert proba.shape == (len(Xt), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    p = proba[:, 1]
    assert ((p >= 0) & (p <= 1)).all()
    m = ev.binary_metrics(yt, p)
    # close to the truth's own ranking and calibrated despite the re-weighting
    assert m["roc_auc"] > roc_auc_score(yt, pt) - 0.03
    assert m["ece"] < 0.03
    assert abs(m["mean_prediction"] - yt.mean()) < 0.02
    assert model.calibration_ in ("none", "sigmoid", "isotonic")
    assert set(model.calibration_losses_) == {"none", "sigmoid", "isotonic"}
    assert model.best_iteration_ < 1000  # early stopping stopped it


def test_balanced_weights_need_calibration(splits):
    (X, y, _), (Xv, yv, _), (Xt, yt, _) = splits
    params = LightGBMParams(num_leaves=7, class_weight="balanced")
    raw = CalibratedBooster(params, 20, calibration="none", seed=0).fit(X, y, eval_set=(Xv, yv))
    cal = CalibratedBooster(params, 20, calibration="auto", seed=0).fit(X, y, eval_set=(Xv, yv))
    # re-weighting inflates raw probabilities; the calibrator brings them back
    assert raw.predict_proba(Xt)[:, 1].mean() > yt.mean() + 0.1
    assert cal.calibration_ != "none"
    assert abs(cal.predict_proba(Xt)[:, 1].mean() - yt.mean()) < 0.02


def test_deterministic_row_and_column_order_invariant(splits):
    (X, y, _), (Xv, yv, _), (Xt, _, _) = splits
    params = LightGBMParams(num_leaves=7, n_estimators=50)
    a = CalibratedBooster(params, 10, seed=5).fit(X, y, eval_set=(Xv, yv))
    b = CalibratedBooster(params, 10, seed=5).fit(X, y, eval_set=(Xv, yv))
    np.testing.assert_array_equal(a.predict_proba(Xt), b.predict_proba(Xt))
    perm = np.random.default_rng(0).permutation(len(Xt))
    shuffled = Xt.iloc[perm][list("edcba")]
    np.testing.assert_array_equal(a.predict_proba(shuffled), a.predict_proba(Xt)[perm])
    np.testing.assert_allclose(a.predict_proba(Xt.to_numpy(), num_threads=1), a.predict_proba(Xt))
    contrib = a.contributions(Xt.head(3))
    assert contrib.shape == (3, 6)
    assert list(a.feature_importance().index[:1]) == ["a"]


def test_early_stopping_can_be_turned_off(splits):
    (X, y, _), (Xv, yv, _), _ = splits
    params = LightGBMParams(num_leaves=31, learning_rate=0.5, n_estimators=60)
    stopped = CalibratedBooster(params, 3, seed=5).fit(X, y, eval_set=(Xv, yv))
    full = CalibratedBooster(params, None, seed=5).fit(X, y, eval_set=(Xv, yv))
    # A fast learning rate overfits early: early stopping keeps a prefix, None keeps all.
    assert stopped.best_iteration_ < 60
    assert full.best_iteration_ == full.booster_.current_iteration() == 60


def test_errors_name_the_problem(splits):
    (X, y, _), (Xv, yv, _), _ = splits
    with pytest.raises(ValueError, match=r"lacks feature column\(s\) \['e'\]"):
        as_matrix(X.drop(columns="e"), list("abcde"))
    with pytest.raises(ValueError, match="validation labels hold one class"):
        CalibratedBooster().fit(X, y, eval_set=(Xv, np.zeros(len(yv))))


def test_baselines(splits):
    (X, y, _), _, (Xt, yt, _) = splits
    logistic = LogisticBaseline().fit(X, y)
    p = logistic.predict_proba(Xt)[:, 1]
    assert ((p > 0) & (p < 1)).all() and roc_auc_score(yt, p) > 0.7
    frame = pd.DataFrame({"days_since_last": [1.0, 5.0, np.nan, 30.0]})
    churn = RecencyRule(higher_is_positive=True).fit(frame)
    assert churn.fill_value_ == 31.0
    assert churn.predict(frame).tolist() == [1.0, 5.0, 31.0, 30.0]
    buy = RecencyRule(higher_is_positive=False).fit(frame)
    assert np.argmax(buy.predict(frame)) == 0  # the most recent buyer ranks first


def test_model_pickled_before_the_sklearn_contract_still_loads(splits):
    """A champion registered before ``classes_``/``n_features_in_`` existed keeps scoring."""
    (X, y, _), (Xv, yv, _), (Xt, _, _) = splits
    model = CalibratedBooster(LightGBMParams(n_estimators=20), 5, seed=0)
    model.fit(X, y, eval_set=(Xv, yv))
    state = dict(model.__dict__)
    for new in ("classes_", "n_features_in_", "feature_names_in_", "validation_fraction"):
        state.pop(new)
    old = CalibratedBooster.__new__(CalibratedBooster)
    old.__dict__.update(state)  # the attributes a pre-contract pickle holds
    loaded = pickle.loads(pickle.dumps(old))
    np.testing.assert_array_equal(loaded.predict_proba(Xt), model.predict_proba(Xt))
    np.testing.assert_array_equal(loaded.predict(Xt), model.predict(Xt))
    assert loaded.get_params()["validation_fraction"] == 0.2


def test_without_eval_set_a_stratified_share_is_held_out(splits):
    (X, y, _), _, (Xt, yt, _) = splits
    model = CalibratedBooster(LightGBMParams(num_leaves=7), 20, seed=0).fit(X, y)
    assert roc_auc_score(yt, model.predict_proba(Xt)[:, 1]) > 0.75
    assert set(model.predict(Xt)) <= {0, 1}
    with pytest.raises(ValueError, match="Only binary classification is supported"):
        CalibratedBooster().fit(X, y % 2 + (X["a"] > 2))


def _balanced_sample(
    X: pd.DataFrame, y: np.ndarray, seed: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Every positive and as many negatives, weighted by 1 / each class's sampling fraction."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    kept = np.sort(np.concatenate([pos, rng.choice(neg, size=pos.size, replace=False)]))
    weight = np.where(y[kept] == 1, 1.0, neg.size / pos.size)
    return X.iloc[kept].reset_index(drop=True), y[kept], weight


def test_sampling_weights_restore_the_population_calibration(splits):
    # Trained on a class-balanced sample, the model sees 50% positives; the inverse
    # sampling weights must bring its probabilities back to the ~10% population's.
    (X, y, _), (Xv, yv, _), (Xt, yt, pt) = splits
    Xs, ys, ws = _balanced_sample(X, y, seed=1)
    Xvs, yvs, wvs = _balanced_sample(Xv, yv, seed=2)
    params = LightGBMParams(num_leaves=7, min_child_samples=20, class_weight="none")

    def fit(**weights: np.ndarray) -> CalibratedBooster:
        return CalibratedBooster(params, 20, "sigmoid", seed=0).fit(
            Xs, ys, eval_set=(Xvs, yvs), **weights
        )

    weighted = fit(sample_weight=ws, eval_sample_weight=wvs).predict_proba(Xt)[:, 1]
    plain = fit().predict_proba(Xt)[:, 1]
    assert abs(weighted.mean() - pt.mean()) < 0.02  # the population's rate
    assert plain.mean() > pt.mean() + 0.15  # the sample's
    assert ev.binary_metrics(yt, weighted)["log_loss"] < ev.binary_metrics(yt, plain)["log_loss"]
    assert roc_auc_score(yt, weighted) > 0.75


def test_sample_weight_of_the_wrong_length_is_a_clear_error(splits):
    (X, y, _), _, _ = splits
    with pytest.raises(ValueError, match="sample_weight has 3 values for 8000 rows"):
        CalibratedBooster(LightGBMParams(n_estimators=5)).fit(X, y, sample_weight=[1.0, 2.0, 3.0])
