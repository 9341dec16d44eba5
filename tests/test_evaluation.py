"""Metrics against scikit-learn and hand-computed values; plots render."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from propensity import evaluation as ev


@pytest.fixture()
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    p = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < p).astype(int)
    return y, p


def test_binary_metrics_match_sklearn(scored):
    y, p = scored
    m = ev.binary_metrics(y, p)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["base_rate"] == pytest.approx(y.mean())
    assert m["rows"] == 2000


def test_ece_by_hand():
    # bin [0.1, 0.2): p=0.1,0.1 with y=1,0 -> |0.5-0.1|
    # bin [0.9, 1.0]: p=0.9,1.0 with y=1,1 -> |1-0.95|
    y = np.array([1, 0, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 1.0])
    assert ev.expected_calibration_error(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    # calibrated-by-construction scores have a small ECE, a shifted copy a large one
    rng = np.random.default_rng(0)
    q = rng.uniform(size=50_000)
    yy = (rng.uniform(size=q.size) < q).astype(int)
    assert ev.expected_calibration_error(yy, q) < 0.01
    assert ev.expected_calibration_error(yy, np.clip(q + 0.2, 0, 1)) > 0.15


def test_lift_and_capture_by_hand():
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 1])
    s = np.arange(10, 0, -1) / 10  # row 0 has the highest score
    # top 10% = row 0 (positive): capture 1/3, lift 1 / 0.3
    assert ev.capture_at(y, s, 0.1) == pytest.approx(1 / 3)
    assert ev.lift_at(y, s, 0.1) == pytest.approx(1 / 0.3)
    # top 20% = rows 0, 1: capture 2/3, lift 1 / 0.3
    assert ev.capture_at(y, s, 0.2) == pytest.approx(2 / 3)
    assert ev.lift_at(y, s, 0.2) == pytest.approx(1 / 0.3)
    m = ev.ranking_metrics(y, s)
    assert m["capture_at_20"] == pytest.approx(2 / 3)


def test_metrics_are_row_order_invariant(scored):
    y, p = scored
    order = np.random.default_rng(1).permutation(y.size)
    a, b = ev.binary_metrics(y, p), ev.binary_metrics(y[order], p[order])
    assert a == pytest.approx(b)


def test_errors_name_the_row():
    with pytest.raises(ValueError, match="row 1 is 2.0"):
        ev.binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="row 0 is 1.5"):
        ev.binary_metrics([0, 1], [1.5, 0.2])
    with pytest.raises(ValueError, match="3 rows but scores have 2"):
        ev.ranking_metrics([0, 1, 1], [0.1, 0.2])


def test_plots_render_png(tmp_path, scored):
    y, p = scored
    scores = {"model": p, "noise": np.random.default_rng(2).uniform(size=p.size)}
    figures = {
        "roc": ev.roc_figure(y, scores),
        "pr": ev.pr_figure(y, scores),
        "cal": ev.calibration_figure(y, scores),
        "gain": ev.gain_figure(y, scores),
        "imp": ev.importance_figure(pd.Series({"a": 3.0, "b": 1.0})),
        "shap": ev.shap_figure(
            np.random.default_rng(3).normal(size=(50, 2)),
            pd.DataFrame(np.random.default_rng(4).normal(size=(50, 2)), columns=["a", "b"]),
        ),
    }
    for name, fig in figures.items():
        path = ev.save_figure(fig, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 40), st.integers(1, 4)),
        min_size=4,
        max_size=60,
    ).filter(lambda rows: len({r[0] for r in rows}) == 2)
)
@settings(max_examples=60, deadline=None)
def test_weighted_metrics_equal_the_metrics_of_rows_repeated_by_weight(rows) -> None:
    # A weight of k is the same row k times: the estimate a stratified sample's
    # inverse-fraction weights give of the full frame.
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows]) / 40.0
    w = np.array([r[2] for r in rows], dtype=np.float64)
    weighted = ev.binary_metrics(y, p, sample_weight=w)
    repeated = ev.binary_metrics(np.repeat(y, w.astype(int)), np.repeat(p, w.astype(int)))
    for name in ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "base_rate", "mean_prediction"):
        assert weighted[name] == pytest.approx(repeated[name], rel=1e-9, abs=1e-12), name


def test_weights_must_be_finite_and_non_negative() -> None:
    with pytest.raises(ValueError, match="weight at row 1 is -1.0"):
        ev.binary_metrics([0, 1], [0.2, 0.7], sample_weight=[1.0, -1.0])


def test_paired_difference_covers_the_true_difference_and_is_narrower_than_separate_intervals() -> (
    None
):
    """Two scores of the same rows, one a noisier copy of the other: their AUC
    difference over fresh samples is the truth the interval should cover, and
    pairing makes it far narrower than the spread of either AUC alone."""
    rng = np.random.default_rng(3)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        signal = rng.normal(0, 1, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-2 * signal))).astype(float)
        good = signal + rng.normal(0, 0.5, n)
        return y, good, good + rng.normal(0, 0.5, n)

    truth = np.mean([ev.paired_difference(*sample(50_000), n_resamples=2)[0] for _ in range(3)])
    y, good, worse = sample(3000)
    diff, low, high = ev.paired_difference(y, good, worse)
    assert low < truth < high and low > 0
    auc_spread = np.std(
        [
            skm.roc_auc_score(y[i], good[i])
            for i in (rng.integers(0, 3000, 3000) for _ in range(100))
        ]
    )
    assert high - low < 2 * 1.645 * auc_spread  # narrower than an unpaired 90% interval
    # log loss: the worse score loses, and the sign says so
    p, q = 1 / (1 + np.exp(-good)), 1 / (1 + np.exp(-worse))
    d, lo, hi = ev.paired_difference(y, p, q, "log_loss")
    assert d < 0 and hi < 0 and lo < d < hi
    # identical scores differ by exactly nothing
    assert ev.paired_difference(y, good, good) == (0.0, 0.0, 0.0)


def test_paired_difference_names_a_metric_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="metric must be one of"):
        ev.paired_difference([0, 1], [0.2, 0.8], [0.3, 0.7], "brier")
