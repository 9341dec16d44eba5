"""Columns of a campaign table that look post-treatment (recorded after the arm was assigned).

In a randomized campaign a pre-treatment column is independent of the arm, so
a χ² test of independence between the (binned) column and the arm that
rejects far beyond chance means the column moved with the treatment — spend,
conversions, opens. A second test catches outcome copies: a value of the
column on which the outcome never varies, over more rows than chance allows
at the overall outcome rate (``conversion = 1`` implies ``visit = 1``). Both
use a Bonferroni bound over all the tests run, so a table of honest features
raises a warning with probability at most ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

__all__ = ["LeakFinding", "post_treatment_columns"]

_BINS = 10
_MIN_ROWS = 30


@dataclass(frozen=True)
class LeakFinding:
    """One column that looks post-treatment, with the test that flagged it."""

    column: str
    test: str
    statistic: float
    p_value: float
    detail: str

    def describe(self) -> str:
        return (
            f"column {self.column!r} looks post-treatment: {self.detail} "
            f"({self.test} = {self.statistic:.1f}, p = {self.p_value:.1e}); "
            "leave it out with --exclude if it was recorded after the campaign"
        )


def _binned(column: pd.Series) -> np.ndarray:
    """Codes of the column's values, numeric columns cut at (up to ten) quantiles.

    A value that holds more than a bin's share of the rows (the zeros of a
    spend column) keeps a bin of its own, so the quantiles of the rest stay apart.
    """
    if not (pd.api.types.is_numeric_dtype(column) and column.nunique(dropna=True) > _BINS):
        return np.asarray(pd.factorize(column, use_na_sentinel=False)[0])
    values = column.to_numpy(float)
    codes = np.full(len(values), -1)
    rest = ~np.isnan(values)
    counts = column.value_counts()
    if len(counts) and counts.iloc[0] > len(values) / _BINS:
        heavy = values == float(counts.index[0])
        codes[heavy] = _BINS + 1
        rest &= ~heavy
    if rest.any():
        edges = np.unique(np.quantile(values[rest], np.linspace(0, 1, _BINS + 1)))
        codes[rest] = np.searchsorted(edges[1:-1], values[rest], side="right")
    return codes


def post_treatment_columns(
    frame: pd.DataFrame,
    features: list[str],
    treatment: str,
    outcome: str,
    *,
    alpha: float = 0.01,
) -> list[LeakFinding]:
    """Features of a randomized campaign table that depend on the arm or copy the outcome.

    Parameters
    ----------
    frame : DataFrame
    features : list of str
        The columns to test.
    treatment, outcome : str
        The arm and outcome columns.
    alpha : float
        Family-wise false-alarm rate over every test run.

    Returns
    -------
    list of LeakFinding
        At most one finding per column (the arm test first).

    Examples
    --------
    >>> from propensity.events.campaign_table import simulate_campaign_table
    >>> table, _ = simulate_campaign_table(20_000, seed=0)
    >>> features = ["recency", "history", "mens", "conversion", "spend"]
    >>> [f.column for f in post_treatment_columns(table, features, "arm", "visit")]
    ['conversion', 'spend']
    """
    arm = np.asarray(pd.factorize(frame[treatment].astype(str))[0])
    y = pd.to_numeric(frame[outcome], errors="coerce").to_numpy(float)
    rate = float(np.nanmean(y)) if len(y) else 0.0
    binary = bool(np.isin(y[~np.isnan(y)], [0, 1]).all())
    bound = alpha / max(1, 2 * len(features))
    found: list[LeakFinding] = []
    for name in features:
        codes = _binned(frame[name])
        table = pd.crosstab(codes, arm).to_numpy()
        if table.shape[0] > 1 and table.shape[1] > 1:
            chi2, p_value, dof, _ = chi2_contingency(table)
            if p_value < bound:
                found.append(
                    LeakFinding(
                        name,
                        "chi2",
                        float(chi2),
                        float(p_value),
                        f"its distribution differs between arms (chi2 test, {dof} dof)",
                    )
                )
                continue
        if not binary or rate <= 0 or rate >= 1:
            continue
        # Exact probability that a value's rows all share one outcome at the overall rate.
        for code in np.unique(codes):
            rows = y[codes == code]
            if len(rows) < _MIN_ROWS or np.isnan(rows).any() or rows.min() != rows.max():
                continue
            constant = int(rows[0])
            log_p = len(rows) * np.log(rate if constant == 1 else 1 - rate)
            if log_p < np.log(bound):
                first = frame[name][codes == code].iloc[0]
                shown = first.item() if hasattr(first, "item") else first
                found.append(
                    LeakFinding(
                        name,
                        "rows with one outcome",
                        float(len(rows)),
                        float(np.exp(log_p)),
                        f"all {len(rows)} rows with {name} near {shown!r} "
                        f"have {outcome}={constant}",
                    )
                )
                break
    return found
