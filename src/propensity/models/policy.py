"""Off-policy evaluation of action policies on logged campaigns (IPS and DR).

A policy's value is measured as **incremental value per row against doing
nothing**: for action ``a`` with outcome ``o_a``, value ``v_a`` and cost
``c_a``, the per-row score is an estimate of
``v_a * (Y_{o_a}(a) - Y_{o_a}(control)) - c_a``; "no action" scores 0.

Both estimators build that score from the log alone. Inverse propensity
(IPS) reweights the rows that happened to get ``a`` (or control) by the
logged assignment probability; doubly robust (DR, AIPW) adds an outcome
model and corrects its error with the same weights, so it stays unbiased if
either the propensities or the outcome model are right and is far less
noisy. A policy is a matrix of probabilities over actions per row (rows may
sum to less than 1, the rest meaning no action), so random and deterministic
policies are scored alike. Intervals come from a row bootstrap that resamples
all policies together, so paired differences get intervals too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "incremental_scores",
    "policy_matrix",
    "evaluate_policies",
    "bootstrap_mean",
]


def incremental_scores(
    treatment: Any,
    propensity: Any,
    actions: Sequence[str],
    outcome: Any,
    cost: Any,
    *,
    control: str = "control",
    mu_action: Any = None,
    mu_control: Any = None,
) -> np.ndarray:
    """Per-row estimates of each action's incremental value over control.

    Parameters
    ----------
    treatment : array-like of str, shape (n,)
        The arm each row received (``control`` or one of ``actions``).
    propensity : array-like, shape (n,)
        Probability with which the received arm was assigned, in (0, 1].
    actions : sequence of str
        The actions scored, giving the column order.
    outcome : array-like, shape (n, n_actions)
        ``outcome[i, k]`` = value of action k's outcome as observed on row i
        (``v_k * y_{o_k, i}``); observable whatever arm the row got.
    cost : array-like, shape (n_actions,)
        Cost of each action.
    mu_action, mu_control : array-like, shape (n, n_actions), optional
        Predicted ``v_k * E[Y_{o_k} | x, arm]`` under action k and under
        control. Omit both for IPS scores; give both for DR scores.

    Returns
    -------
    ndarray, shape (n, n_actions)

    Examples
    --------
    >>> incremental_scores(["a", "control"], [0.5, 0.5], ["a"], [[1.0], [0.0]], [0.1])
    array([[ 1.9],
           [-0.1]])
    """
    t = np.asarray(treatment).astype(str)
    p = np.asarray(propensity, dtype=float)
    y = np.asarray(outcome, dtype=float).reshape(len(t), len(actions))
    c = np.asarray(cost, dtype=float).reshape(len(actions))
    bad = np.flatnonzero(~((p > 0) & (p <= 1)))
    if bad.size:
        raise ValueError(f"row {int(bad[0])}: propensity {p[bad[0]]!r} must lie in (0, 1]")
    if (mu_action is None) != (mu_control is None):
        raise ValueError("give both mu_action and mu_control (DR) or neither (IPS)")
    q_a = np.zeros_like(y) if mu_action is None else np.asarray(mu_action, dtype=float)
    q_c = np.zeros_like(y) if mu_control is None else np.asarray(mu_control, dtype=float)
    got = np.column_stack([t == a for a in actions]).astype(float) if actions else np.zeros_like(y)
    is_control = (t == control).astype(float)[:, None]
    treated_term = q_a + got / p[:, None] * (y - q_a)
    control_term = q_c + is_control / p[:, None] * (y - q_c)
    return treated_term - control_term - c[None, :]


def policy_matrix(choices: Any, actions: Sequence[str]) -> np.ndarray:
    """One-hot matrix of a deterministic policy; unknown labels mean no action.

    Examples
    --------
    >>> policy_matrix(["a", "no_action", "b"], ["a", "b"])
    array([[1., 0.],
           [0., 0.],
           [0., 1.]])
    """
    chosen = np.asarray(choices).astype(str)
    return np.column_stack([chosen == a for a in actions]).astype(float)


def bootstrap_mean(
    values: np.ndarray, *, n_boot: int = 500, level: float = 0.9, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means of ``values`` with percentile bootstrap bounds (rows resampled jointly).

    With ``n_boot=0`` (a point estimate only, as when a champion is re-evaluated)
    or no rows, the bounds are NaN.

    Examples
    --------
    >>> mean, low, high = bootstrap_mean(np.array([1.0, 3.0]), n_boot=0)
    >>> float(mean[0]), bool(np.isnan(low[0]))
    (2.0, True)
    """
    v = np.asarray(values, dtype=float)
    v = v[:, None] if v.ndim == 1 else v
    n = len(v)
    if n_boot == 0 or n == 0:
        nan = np.full(v.shape[1], np.nan)
        return (v.mean(axis=0) if n else nan.copy()), nan, nan.copy()
    rng = np.random.default_rng(random_state)
    draws = np.empty((n_boot, v.shape[1]))
    # Resample row counts (multinomial) rather than indices: same distribution, far less memory.
    for b in range(n_boot):
        counts = rng.multinomial(n, np.full(n, 1.0 / n))
        draws[b] = counts @ v / n
    tail = (1 - level) / 2
    return v.mean(axis=0), np.quantile(draws, tail, axis=0), np.quantile(draws, 1 - tail, axis=0)


def evaluate_policies(
    policies: Mapping[str, np.ndarray],
    *,
    ips_scores: np.ndarray,
    dr_scores: np.ndarray | None = None,
    true_scores: np.ndarray | None = None,
    baseline: str | None = None,
    n_boot: int = 500,
    level: float = 0.9,
    random_state: int = 0,
) -> pd.DataFrame:
    """Estimate each policy's incremental value per row, with bootstrap intervals.

    Parameters
    ----------
    policies : mapping of name to array, shape (n, n_actions)
        Probability each row receives each action.
    ips_scores, dr_scores : ndarray, shape (n, n_actions)
        From :func:`incremental_scores`.
    true_scores : ndarray, optional
        The true incremental value of each action per row (simulations only);
        adds a ``true`` column.
    baseline : str, optional
        A policy name; adds ``dr_diff`` (or ``ips_diff``) with intervals for
        each policy minus the baseline on the same bootstrap draws.

    Returns
    -------
    DataFrame indexed by policy with ``ips``, ``ips_low``, ``ips_high``,
    ``dr``..., optional ``true`` and difference columns.

    Examples
    --------
    >>> table = evaluate_policies({"all_a": pi}, ips_scores=g)  # doctest: +SKIP
    """
    names = list(policies)
    columns: dict[str, Any] = {}
    for label, scores in (("ips", ips_scores), ("dr", dr_scores)):
        if scores is None:
            continue
        contrib = np.column_stack([(policies[name] * scores).sum(axis=1) for name in names])
        mean, low, high = bootstrap_mean(
            contrib, n_boot=n_boot, level=level, random_state=random_state
        )
        columns[label], columns[f"{label}_low"], columns[f"{label}_high"] = mean, low, high
        if baseline is not None:
            if baseline not in policies:
                raise ValueError(f"baseline policy {baseline!r} is not among {names}")
            diff = contrib - contrib[:, [names.index(baseline)]]
            mean, low, high = bootstrap_mean(
                diff, n_boot=n_boot, level=level, random_state=random_state
            )
            columns[f"{label}_diff"] = mean
            columns[f"{label}_diff_low"], columns[f"{label}_diff_high"] = low, high
    if true_scores is not None:
        columns["true"] = [
            float((policies[name] * true_scores).sum(axis=1).mean()) for name in names
        ]
    return pd.DataFrame(columns, index=pd.Index(names, name="policy"))
