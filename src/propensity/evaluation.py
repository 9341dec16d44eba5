"""Metrics and plots for binary propensity scores, as pure functions.

Every function takes labels ``y`` (0/1) and scores ``p`` (probabilities, or any
score where higher means more likely for the ranking metrics) and returns numbers
or a matplotlib figure; nothing here reads files or talks to MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training runs in jobs and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

__all__ = [
    "binary_metrics",
    "ranking_metrics",
    "expected_calibration_error",
    "lift_at",
    "capture_at",
    "paired_difference",
    "roc_figure",
    "pr_figure",
    "calibration_figure",
    "gain_figure",
    "importance_figure",
    "shap_figure",
    "save_figure",
]


def _arrays(
    y: Sequence[float] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    sample_weight: Sequence[float] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    p_arr = np.asarray(p, dtype=np.float64).ravel()
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"labels have {y_arr.size} rows but scores have {p_arr.size}")
    if not np.isin(y_arr, (0.0, 1.0)).all():
        bad = int(np.flatnonzero(~np.isin(y_arr, (0.0, 1.0)))[0])
        raise ValueError(f"label at row {bad} is {float(y_arr[bad])}; labels must be 0 or 1")
    if np.isnan(p_arr).any():
        bad = int(np.flatnonzero(np.isnan(p_arr))[0])
        raise ValueError(f"score at row {bad} is NaN; scores must be finite")
    if sample_weight is None:
        return y_arr, p_arr, np.ones_like(y_arr)
    w = np.asarray(sample_weight, dtype=np.float64).ravel()
    if w.shape != y_arr.shape:
        raise ValueError(f"labels have {y_arr.size} rows but weights have {w.size}")
    if not (np.isfinite(w) & (w >= 0)).all():
        bad = int(np.flatnonzero(~(np.isfinite(w) & (w >= 0)))[0])
        raise ValueError(f"weight at row {bad} is {float(w[bad])}; weights must be finite, >= 0")
    return y_arr, p_arr, w


def expected_calibration_error(
    y: np.ndarray, p: np.ndarray, n_bins: int = 10, sample_weight: np.ndarray | None = None
) -> float:
    """Expected calibration error over equal-width probability bins.

    ``sum_b (n_b / n) * |mean(y in b) - mean(p in b)|`` with bins ``[0, 0.1), ...,
    [0.9, 1.0]``; with ``sample_weight``, weighted counts and means.

    Examples
    --------
    >>> expected_calibration_error([0, 1], [0.0, 1.0])
    0.0
    """
    y_arr, p_arr, w = _arrays(y, p, sample_weight)
    bins = np.clip((p_arr * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        mask = bins == b
        weight = w[mask].sum()
        if weight > 0:
            y_mean = np.average(y_arr[mask], weights=w[mask])
            total += weight / w.sum() * abs(y_mean - np.average(p_arr[mask], weights=w[mask]))
    return float(total)


def _top(p: np.ndarray, fraction: float, w: np.ndarray) -> np.ndarray:
    """Rows of the highest scores holding ``fraction`` of the weight (``ceil(f n)`` unweighted)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    # stable sort on the score so ties keep a deterministic order
    order = np.argsort(-p, kind="stable")
    cumulative = np.cumsum(w[order])
    k = int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left")) + 1
    return order[: min(k, p.size)]


def capture_at(
    y: np.ndarray, p: np.ndarray, fraction: float, sample_weight: np.ndarray | None = None
) -> float:
    """Share of all positives found in the top ``fraction`` of scores.

    Examples
    --------
    >>> capture_at([1, 0, 1, 0], [0.9, 0.8, 0.1, 0.2], 0.5)
    0.5
    """
    y_arr, p_arr, w = _arrays(y, p, sample_weight)
    positives = (w * y_arr).sum()
    top = _top(p_arr, fraction, w)
    return float((w[top] * y_arr[top]).sum() / positives) if positives else float("nan")


def lift_at(
    y: np.ndarray, p: np.ndarray, fraction: float, sample_weight: np.ndarray | None = None
) -> float:
    """Positive rate in the top ``fraction`` of scores divided by the overall rate.

    Examples
    --------
    >>> lift_at([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3], 0.25)
    4.0
    """
    y_arr, p_arr, w = _arrays(y, p, sample_weight)
    base = np.average(y_arr, weights=w)
    top = _top(p_arr, fraction, w)
    return float(np.average(y_arr[top], weights=w[top]) / base) if base else float("nan")


def ranking_metrics(
    y: np.ndarray, score: np.ndarray, sample_weight: np.ndarray | None = None
) -> dict[str, float]:
    """Metrics that only need an ordering: ROC-AUC, PR-AUC, lift and capture at 10%/20%.

    ``sample_weight`` (e.g. the inverse sampling fractions of a stratified sample)
    makes every metric estimate its value on the population sampled from.

    Examples
    --------
    >>> ranking_metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])["roc_auc"]
    1.0
    """
    y_arr, s, w = _arrays(y, score, sample_weight)
    weights = None if sample_weight is None else w
    out = {
        "roc_auc": float(skm.roc_auc_score(y_arr, s, sample_weight=weights)),
        "pr_auc": float(skm.average_precision_score(y_arr, s, sample_weight=weights)),
        "base_rate": float(np.average(y_arr, weights=w)),
        "rows": float(y_arr.size),
    }
    for frac in (0.1, 0.2):
        pct = int(frac * 100)
        out[f"lift_at_{pct}"] = lift_at(y_arr, s, frac, w)
        out[f"capture_at_{pct}"] = capture_at(y_arr, s, frac, w)
    return out


def binary_metrics(
    y: np.ndarray, p: np.ndarray, n_bins: int = 10, sample_weight: np.ndarray | None = None
) -> dict[str, float]:
    """All metrics for calibrated probabilities: ranking metrics plus log loss, Brier, ECE.

    Parameters
    ----------
    y : array of 0/1
    p : array of probabilities in [0, 1]
    n_bins : int
        Bins of the expected calibration error.
    sample_weight : array, optional
        Row weights (see :func:`ranking_metrics`).

    Returns
    -------
    dict of str to float

    Examples
    --------
    >>> m = binary_metrics([0, 1, 0, 1], [0.2, 0.7, 0.4, 0.9])
    >>> round(m["brier"], 4)
    0.075
    """
    y_arr, p_arr, w = _arrays(y, p, sample_weight)
    if (p_arr < 0).any() or (p_arr > 1).any():
        bad = int(np.flatnonzero((p_arr < 0) | (p_arr > 1))[0])
        raise ValueError(f"probability at row {bad} is {float(p_arr[bad])}; must be in [0, 1]")
    weights = None if sample_weight is None else w
    out = ranking_metrics(y_arr, p_arr, weights)
    clipped = np.clip(p_arr, 1e-15, 1 - 1e-15)
    out["log_loss"] = float(skm.log_loss(y_arr, clipped, labels=[0, 1], sample_weight=weights))
    out["brier"] = float(skm.brier_score_loss(y_arr, p_arr, sample_weight=weights))
    out["ece"] = expected_calibration_error(y_arr, p_arr, n_bins, weights)
    out["mean_prediction"] = float(np.average(p_arr, weights=w))
    return out


_PAIRED_METRICS = {
    "roc_auc": lambda y, p, w: skm.roc_auc_score(y, p, sample_weight=w),
    "log_loss": lambda y, p, w: skm.log_loss(
        y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1], sample_weight=w
    ),
}


def paired_difference(
    y: np.ndarray,
    p: np.ndarray,
    q: np.ndarray,
    metric: str = "roc_auc",
    sample_weight: np.ndarray | None = None,
    confidence: float = 0.9,
    n_resamples: int = 200,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``metric(p) - metric(q)`` on the same rows, with a paired bootstrap interval.

    Two models scored on one test set share its luck: resampling the rows with
    both scores together (scipy's ``bootstrap(..., paired=True)``, percentile
    interval) measures only the uncertainty of their difference, far narrower
    than two separate intervals.

    Parameters
    ----------
    y : array of 0/1
    p, q : arrays of probabilities
        The two models' scores of the same rows.
    metric : {"roc_auc", "log_loss"}
    sample_weight : array, optional
    confidence : float
        Coverage of the interval.
    n_resamples : int
    seed : int

    Returns
    -------
    difference, low, high : float

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 2000)
    >>> good, noise = y + rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    >>> diff, low, high = paired_difference(y, good, noise)
    >>> bool(0 < low < diff < high)
    True
    """
    from scipy import stats

    if metric not in _PAIRED_METRICS:
        raise ValueError(f"metric must be one of {sorted(_PAIRED_METRICS)}, got {metric!r}")
    y_arr, p_arr, w = _arrays(y, p, sample_weight)
    _, q_arr, _ = _arrays(y, q, sample_weight)
    score = _PAIRED_METRICS[metric]

    def difference(y: np.ndarray, p: np.ndarray, q: np.ndarray, w: np.ndarray) -> float:
        if y.min() == y.max():  # a resample of one class: no ranking to compare
            return float("nan")
        return float(score(y, p, w) - score(y, q, w))

    point = difference(y_arr, p_arr, q_arr, w)
    result = stats.bootstrap(
        (y_arr, p_arr, q_arr, w),
        difference,
        paired=True,
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=seed,
    )
    low, high = result.confidence_interval
    return point, float(low), float(high)


def _figure(title: str) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    ax.set_title(title)
    return fig, ax


def roc_figure(y: np.ndarray, scores: dict[str, np.ndarray], title: str = "ROC") -> Figure:
    """ROC curves of one or more named scores on the same labels."""
    fig, ax = _figure(title)
    for name, s in scores.items():
        fpr, tpr, _ = skm.roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    return fig


def pr_figure(
    y: np.ndarray, scores: dict[str, np.ndarray], title: str = "Precision-recall"
) -> Figure:
    """Precision-recall curves of one or more named scores."""
    fig, ax = _figure(title)
    for name, s in scores.items():
        prec, rec, _ = skm.precision_recall_curve(y, s)
        ax.plot(rec, prec, label=f"{name} (AP {skm.average_precision_score(y, s):.3f})")
    ax.axhline(float(np.mean(y)), color="grey", linestyle=":", label="base rate")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.legend(loc="upper right")
    return fig


def calibration_figure(
    y: np.ndarray, probs: dict[str, np.ndarray], n_bins: int = 10, title: str = "Reliability"
) -> Figure:
    """Reliability diagram: mean predicted vs observed rate per probability bin."""
    fig, ax = _figure(title)
    for name, p in probs.items():
        frame = pd.DataFrame({"y": y, "p": p})
        frame["bin"] = np.clip((frame["p"] * n_bins).astype(int), 0, n_bins - 1)
        agg = frame.groupby("bin").agg(p=("p", "mean"), y=("y", "mean"))
        ax.plot(agg["p"], agg["y"], marker="o", label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed rate")
    ax.legend(loc="upper left")
    return fig


def gain_figure(
    y: np.ndarray, scores: dict[str, np.ndarray], title: str = "Cumulative gain"
) -> Figure:
    """Cumulative gain: share of positives captured against share of customers targeted."""
    fig, ax = _figure(title)
    y_arr = np.asarray(y, dtype=np.float64)
    share = np.arange(1, y_arr.size + 1) / y_arr.size
    for name, s in scores.items():
        order = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
        ax.plot(share, np.cumsum(y_arr[order]) / max(y_arr.sum(), 1), label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    ax.set_xlabel("share of customers targeted")
    ax.set_ylabel("share of positives captured")
    ax.legend(loc="lower right")
    return fig


def importance_figure(
    importance: pd.Series, top: int = 20, title: str = "Feature importance (gain)"
) -> Figure:
    """Horizontal bar chart of the ``top`` largest importances."""
    values = importance.sort_values(ascending=True).tail(top)
    fig, ax = plt.subplots(figsize=(6, max(3.0, 0.28 * len(values) + 1)), dpi=100)
    ax.barh(values.index.astype(str), values.to_numpy())
    ax.set_title(title)
    fig.tight_layout()
    return fig


def shap_figure(
    shap_values: np.ndarray, X: pd.DataFrame, top: int = 20, title: str = "SHAP summary"
) -> Figure:
    """SHAP beeswarm summary of per-row contributions (``shap_values`` shaped like ``X``).

    Examples
    --------
    >>> fig = shap_figure(np.zeros((3, 1)), pd.DataFrame({"x": [1.0, 2.0, 3.0]}))
    """
    import shap  # heavy import, only needed when plotting

    plt.figure(figsize=(7, max(3.0, 0.3 * min(top, X.shape[1]) + 1.5)), dpi=100)
    shap.summary_plot(shap_values, X, max_display=top, show=False, plot_size=None)
    fig = plt.gcf()
    fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save a figure as PNG and free its memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
