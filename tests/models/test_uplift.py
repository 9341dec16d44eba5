"""Meta-learners recover known heterogeneous effects; Qini ranks rankings."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from propensity.models.uplift import (
    DRLearner,
    PropensityModel,
    TLearner,
    XLearner,
    qini_auc_normalized,
    qini_curve,
    qini_score,
)

ARMS = ["control", "a", "b"]


def _synthetic(
    n: int = 6000, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Binary outcome; arm a helps when x0 > 0, arm b helps when x1 < 0."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 4)), columns=["x0", "x1", "x2", "x3"])
    base = 0.25 + 0.1 * np.tanh(X["x2"].to_numpy())
    tau = np.column_stack([0.25 * (X["x0"].to_numpy() > 0), 0.2 * (X["x1"].to_numpy() < 0) - 0.05])
    treatment = rng.choice(ARMS, size=n, p=[0.4, 0.3, 0.3])
    p = base.copy()
    for j, arm in enumerate(ARMS[1:]):
        p = np.where(treatment == arm, base + tau[:, j], p)
    y = (rng.random(n) < p).astype(int)
    return X, treatment, y, tau


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    return _synthetic()


@pytest.mark.parametrize("cls", [TLearner, XLearner, DRLearner])
def test_learner_recovers_heterogeneous_effects(cls, data) -> None:
    X, treatment, y, _ = data
    propensity = np.select([treatment == "control"], [0.4], 0.3)
    learner = cls(random_state=1)
    assert learner.fit(X, treatment, y, propensity=propensity) is learner
    assert learner.actions_ == ["a", "b"]
    test_X, _, _, test_tau = _synthetic(3000, seed=7)
    est = learner.predict_uplift(test_X)
    assert est.shape == (3000, 2)
    for j in range(2):
        corr = np.corrcoef(est[:, j], test_tau[:, j])[0, 1]
        assert corr > 0.6, (cls.__name__, j, corr)
        # Better than the best constant (the true average effect).
        mse = np.mean((est[:, j] - test_tau[:, j]) ** 2)
        assert mse < np.var(test_tau[:, j]), (cls.__name__, j, mse)


def test_unknown_propensity_is_estimated(data) -> None:
    X, treatment, y, _ = data
    learner = XLearner(params={"n_estimators": 60}).fit(X, treatment, y)
    proba = learner.propensity_matrix(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(proba.mean(axis=0), [0.4, 0.3, 0.3], atol=0.03)


def test_row_order_invariance(data) -> None:
    X, treatment, y, _ = data
    learner = TLearner(params={"n_estimators": 40}).fit(X, treatment, y)
    order = np.random.default_rng(3).permutation(500)
    head = X.iloc[:500]
    np.testing.assert_allclose(
        learner.predict_uplift(head)[order], learner.predict_uplift(head.iloc[order])
    )


def test_errors_name_the_problem(data) -> None:
    X, treatment, y, _ = data
    with pytest.raises(ValueError, match="control arm"):
        TLearner().fit(X, np.where(treatment == "control", "a", treatment), y)
    bad = y.astype(float)
    bad[5] = np.nan
    with pytest.raises(ValueError, match="row 5"):
        TLearner().fit(X, treatment, bad)
    with pytest.raises(ValueError, match="row 0: propensity"):
        TLearner().fit(X, treatment, y, propensity=np.zeros(len(y)))


def test_qini_perfect_ranking_beats_random() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    tau = rng.uniform(0, 0.4, n)
    treated = rng.random(n) < 0.5
    y = (rng.random(n) < 0.2 + tau * treated).astype(int)
    perfect = qini_score(tau, treated, y, n_boot=100)
    random = qini_score(rng.random(n), treated, y, n_boot=100)
    assert perfect.qini > random.qini
    assert perfect.qini_low > 0
    assert random.qini_low < 0 < random.qini_high
    assert perfect.qini_low <= perfect.qini <= perfect.qini_high
    # The curve ends at the overall incremental outcome rate, whatever the ranking.
    assert perfect.gain[-1] == pytest.approx(random.gain[-1])


def test_qini_curve_small_example() -> None:
    fraction, gain = qini_curve([0.3, 0.1, 0.2, 0.0], [1, 0, 1, 0], [1, 0, 0, 0], points=5)
    np.testing.assert_allclose(fraction, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(gain, [0, 0.25, 0.25, 0.25, 0.25])


def test_qini_normalized_is_scikit_uplifts_qini_auc_score() -> None:
    sklift_metrics = pytest.importorskip("sklift.metrics")
    # scikit-uplift's own small case: a perfect ranking scores 1.
    assert qini_auc_normalized([0.9, 0.8, 0.2, 0.1], [1, 0, 1, 0], [1, 0, 0, 1]) == 1.0
    rng = np.random.default_rng(7)
    for n in (40, 500, 3000):
        treated = rng.integers(0, 2, n)
        score = np.round(rng.random(n), 2)  # ties included
        y = (rng.random(n) < 0.2 + 0.3 * treated * score).astype(int)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            expected = sklift_metrics.qini_auc_score(y, score, treated)
        assert qini_auc_normalized(score, treated, y) == pytest.approx(expected, abs=1e-12)
    # Numeric outcomes or a single arm have no value on that scale.
    assert np.isnan(qini_auc_normalized([0.1, 0.2], [1, 0], [3.5, 1.0]))
    assert np.isnan(qini_auc_normalized([0.1, 0.2], [1, 1], [1, 0]))


def test_qini_curve_of_tied_scores_ignores_row_order() -> None:
    rng = np.random.default_rng(8)
    n = 400
    treated = rng.integers(0, 2, n).astype(bool)
    y = rng.integers(0, 2, n)
    score = np.zeros(n)  # one constant uplift: no ranking at all
    fraction, gain = qini_curve(score, treated, y)
    flipped = qini_curve(score[::-1], treated[::-1], y[::-1])[1]
    np.testing.assert_allclose(gain, flipped, atol=1e-12)
    # Without a ranking the curve is the random diagonal.
    np.testing.assert_allclose(gain, fraction * gain[-1], atol=1e-12)
    assert qini_score(score, treated, y, n_boot=20).qini == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("arms", [ARMS[:2], ARMS])
def test_propensity_numpy_path_equals_predict_proba(arms: list[str]) -> None:
    """The serving path's numpy arithmetic gives scikit-learn's probabilities, NaN rows included."""
    rng = np.random.default_rng(5)
    X = pd.DataFrame(rng.normal(size=(400, 3)), columns=["x0", "x1", "x2"])
    treatment = rng.choice(arms, size=len(X))
    treatment[X["x0"].to_numpy() > 1] = arms[-1]  # the arm depends on the features
    model = PropensityModel().fit(X, treatment)
    X.iloc[::7, 1] = np.nan
    expected = model.predict_proba(X)
    for start in (0, 1, 2):  # one row, as /score asks, and the whole frame
        got = model.proba_matrix(X.to_numpy(np.float64)[start : start + 1])
        np.testing.assert_allclose(got, expected[start : start + 1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        model.proba_matrix(X.to_numpy(np.float64)), expected, rtol=0, atol=1e-15
    )
