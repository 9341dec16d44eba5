"""Exploration and next-best-action plots, as pure functions returning figures.

Model-evaluation plots (ROC, calibration, gain, SHAP) live in
:mod:`propensity.evaluation`; this module holds what a data scientist looks at
before and around them: event volumes, cohort retention, feature distributions by
label, Qini curves and policy values. Nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: notebooks run in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = [
    "event_volume_figure",
    "cohort_retention",
    "cohort_retention_figure",
    "feature_distribution_figure",
    "qini_figure",
    "policy_value_figure",
    "show",
]


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; got {list(frame.columns)}")


def event_volume_figure(
    events: pd.DataFrame, freq: str = "W-SUN", top: int = 8, title: str = "Event volume"
) -> Figure:
    """Events per period by event type (the ``top`` most frequent types, the rest as other).

    Parameters
    ----------
    events : DataFrame
        ``event_timestamp`` (UTC) and ``event_type``.
    freq : str
        pandas period of the x axis: weeks Monday to Sunday by default. The first and
        last periods are usually partial, so their counts are lower.

    Examples
    --------
    >>> ev = pd.DataFrame({"event_timestamp": pd.to_datetime(["2026-01-01"], utc=True),
    ...                    "event_type": ["purchase"]})
    >>> fig = event_volume_figure(ev)
    """
    _require(events, ["event_timestamp", "event_type"], "event_volume_figure")
    kinds = events["event_type"].value_counts().index[:top]
    kind = events["event_type"].where(events["event_type"].isin(kinds), "other")
    period = events["event_timestamp"].dt.tz_convert("UTC").dt.tz_localize(None).dt.to_period(freq)
    counts = pd.crosstab(period.dt.start_time, kind)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for column in counts.columns:
        ax.plot(counts.index, counts[column], marker=".", label=column)
    ax.set_yscale("log")
    ax.set_ylabel(f"events per period ({freq})")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.autofmt_xdate()
    return fig


def cohort_retention(
    events: pd.DataFrame,
    *,
    cohort_freq: str = "M",
    period_days: int = 7,
    activity: Sequence[str] = ("session_start", "purchase"),
) -> pd.DataFrame:
    """Share of each signup cohort still active ``k`` periods after their first event.

    A customer's cohort is the period (``cohort_freq``) of their first event; they are
    active in period ``k`` when they have an ``activity`` event in days
    ``[k * period_days, (k + 1) * period_days)`` after that first event. Periods the
    data does not fully cover for a customer are left out of the denominator, so a
    late cohort's curve is not pulled down by missing data.

    Returns
    -------
    DataFrame
        Index: cohort (period start, a Timestamp); columns: period ``k`` (0, 1, ...);
        values: share active in [0, 1] (NaN where no customer of the cohort was
        observed that long). ``attrs["sizes"]`` holds the cohort sizes.

    Examples
    --------
    >>> ev = pd.DataFrame({
    ...     "customer_id": ["a", "a", "b"],
    ...     "event_timestamp": pd.to_datetime(["2026-01-01", "2026-01-09", "2026-01-02"], utc=True),
    ...     "event_type": ["session_start"] * 3})
    >>> cohort_retention(ev).iloc[0].tolist()
    [1.0, 1.0]
    """
    _require(events, ["customer_id", "event_timestamp", "event_type"], "cohort_retention")
    stamps = events["event_timestamp"].dt.tz_convert("UTC").dt.tz_localize(None)
    frame = pd.DataFrame({"customer_id": events["customer_id"].to_numpy(), "t": stamps})
    first = frame.groupby("customer_id")["t"].min().rename("first")
    end = stamps.max()
    active = frame[events["event_type"].isin(list(activity)).to_numpy()].join(first, "customer_id")
    active["k"] = ((active["t"] - active["first"]).dt.days // period_days).astype(int)
    hits = active.drop_duplicates(["customer_id", "k"])
    customers = first.to_frame()
    customers["cohort"] = customers["first"].dt.to_period(cohort_freq).dt.start_time
    # Whole periods observed after the first event: the last partial one is not counted.
    customers["observed"] = ((end - customers["first"]).dt.days // period_days).astype(int)
    horizon = int(customers["observed"].max()) if len(customers) else 0
    ks = np.arange(horizon)
    exposed = pd.DataFrame(
        {
            k: customers.groupby("cohort")["observed"].apply(lambda o, k=k: int((o > k).sum()))
            for k in ks
        }
    )
    hits = hits.join(customers[["cohort", "observed"]], "customer_id")
    hits = hits[hits["k"] < hits["observed"]]
    retained = (
        hits.groupby(["cohort", "k"])
        .size()
        .unstack("k")
        .reindex(index=exposed.index, columns=ks)
        .fillna(0)
    )
    share = (retained / exposed.where(exposed > 0)).astype("float64")
    share.columns.name = "period"
    share.attrs["sizes"] = customers.groupby("cohort").size()
    return share


def cohort_retention_figure(
    retention: pd.DataFrame, min_size: int = 20, title: str = "Cohort retention"
) -> Figure:
    """Retention curves, one line per cohort of at least ``min_size`` customers.

    Examples
    --------
    >>> fig = cohort_retention_figure(cohort_retention(events))  # doctest: +SKIP
    """
    sizes = retention.attrs.get("sizes", pd.Series(dtype=float))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for cohort, row in retention.iterrows():
        n = int(sizes.get(cohort, min_size))
        if n >= min_size:
            label = f"{pd.Timestamp(cohort):%Y-%m} (n={n:,})"
            ax.plot(row.index, row.to_numpy(), marker=".", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("periods since first event")
    ax.set_ylabel("share of cohort active")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def feature_distribution_figure(
    frame: pd.DataFrame,
    features: Sequence[str],
    label: str = "label",
    bins: int = 30,
    quantile: float = 0.99,
    title: str = "Feature distributions by label",
) -> Figure:
    """Histograms of each feature, one colour per label value (densities, clipped at a quantile).

    Clipping at ``quantile`` keeps a long tail from squashing the bulk of the
    distribution into one bin; missing values are left out and counted in the title.

    Examples
    --------
    >>> f = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "label": [0, 0, 1, 1]})
    >>> fig = feature_distribution_figure(f, ["x"])
    """
    _require(frame, [*features, label], "feature_distribution_figure")
    n = len(features)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.ravel(), features, strict=False):
        values = frame[name].astype("float64")
        hi = values.quantile(quantile)
        lo = values.min()
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        for value, group in values.groupby(frame[label]):
            kept = group.dropna().clip(upper=hi)
            ax.hist(kept, bins=edges, density=True, alpha=0.5, label=f"{label}={value}")
        missing = int(values.isna().sum())
        ax.set_title(name + (f" ({missing:,} missing)" if missing else ""), fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def qini_figure(qini: Mapping[str, Any], title: str = "Qini curves (test window)") -> Figure:
    """Qini curve of each action's uplift ranking against random targeting.

    Parameters
    ----------
    qini : mapping of action to QiniResult
        As returned in ``evaluate_policy(...)["qini"]``: ``fraction``, ``gain``,
        ``qini``.

    Examples
    --------
    >>> fig = qini_figure(evaluation.qini)  # doctest: +SKIP
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for action, result in qini.items():
        (line,) = ax.plot(result.fraction, result.gain, label=f"{action} (qini {result.qini:.4f})")
        ax.plot([0, 1], [0, result.gain[-1]], linestyle=":", color=line.get_color(), linewidth=0.8)
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("share targeted (highest predicted uplift first)")
    ax.set_ylabel("incremental outcomes per customer")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def policy_value_figure(table: pd.DataFrame, title: str = "Policy value (test window)") -> Figure:
    """Doubly-robust value of each policy with its interval, and the true value when known.

    Parameters
    ----------
    table : DataFrame
        Indexed by policy with ``dr``, ``dr_low``, ``dr_high`` and optionally ``true``.

    Examples
    --------
    >>> t = pd.DataFrame({"dr": [0.5], "dr_low": [0.2], "dr_high": [0.8]}, index=["learned"])
    >>> fig = policy_value_figure(t)
    """
    _require(table, ["dr", "dr_low", "dr_high"], "policy_value_figure")
    ordered = table.sort_values("dr")
    y = np.arange(len(ordered))
    err = np.vstack([ordered["dr"] - ordered["dr_low"], ordered["dr_high"] - ordered["dr"]])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ordered) + 1.5), dpi=100)
    ax.barh(y, ordered["dr"], xerr=np.nan_to_num(err), alpha=0.7, label="DR estimate (interval)")
    if "true" in ordered and ordered["true"].notna().any():
        ax.scatter(ordered["true"], y, color="black", marker="x", zorder=3, label="true value")
    ax.set_yticks(y, ordered.index)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("incremental value per customer vs no action")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show(fig: Figure, dpi: int = 100) -> Any:
    """Render a figure as a PNG image for a notebook cell, and free the figure.

    The package draws on the headless Agg backend, which has no notebook display of
    its own; returning ``show(fig)`` from a cell displays the image.

    Returns
    -------
    IPython.display.Image

    Examples
    --------
    >>> show(cohort_retention_figure(cohort_retention(events)))  # doctest: +SKIP
    """
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Image(data=buffer.getvalue(), format="png")
