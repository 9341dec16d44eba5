"""Seeded randomized campaign tables with their true effects (the tabular NBA path's test data).

The table is shaped like the public e-mail campaign tables (one row per customer:
pre-treatment columns, the arm, a visit outcome and the post-treatment
``conversion`` and ``spend`` a real export carries), so it also exercises the
leak warning: ``conversion`` and ``spend`` happen after the e-mail and must not
be features. :func:`simulate_campaign_table` returns the table and, row-aligned,
the true visit probability under every arm (``p_purchase_<arm>``, the columns
:func:`~propensity.models.nba_report.evaluate_policy` reads as ground truth).

With ``heterogeneous=True`` each e-mail helps its own audience (the men's e-mail
customers who bought men's items, the women's e-mail recent new customers) and
slightly hurts the rest; with ``heterogeneous=False`` each arm shifts every
customer's visit probability by the same amount, so no targeting beats
sending the best arm to everyone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit

__all__ = ["ARMS", "simulate_campaign_table"]

#: Arms of the simulated campaign, control first.
ARMS = ("control", "mens_email", "womens_email")


def simulate_campaign_table(
    n_rows: int, *, seed: int = 0, heterogeneous: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A randomized three-arm campaign table and its true effects.

    Parameters
    ----------
    n_rows : int
    seed : int
    heterogeneous : bool
        Effects that depend on the customer (a learned policy should beat
        every single arm), or the same shift for everyone (it should not).

    Returns
    -------
    table : DataFrame
        ``customer``, ``recency`` (months), ``history`` (past spend), ``mens``,
        ``womens``, ``newbie``, ``channel``, ``noise``, ``arm``, ``propensity``
        (the logged assignment probability), ``visit`` (the outcome) and the
        post-treatment ``conversion`` and ``spend``.
    truth : DataFrame
        ``p_purchase_<arm>``: each row's true visit probability under every arm.

    Examples
    --------
    >>> table, truth = simulate_campaign_table(1000, seed=1)
    >>> sorted(table["arm"].unique())
    ['control', 'mens_email', 'womens_email']
    >>> bool((truth["p_purchase_control"] < 1).all())
    True
    """
    rng = np.random.default_rng(seed)
    recency = rng.integers(1, 13, n_rows)
    history = np.round(rng.lognormal(5.0, 0.8, n_rows), 2)
    mens = (rng.random(n_rows) < 0.55).astype(int)
    womens = np.where(mens == 0, 1, (rng.random(n_rows) < 0.5).astype(int))
    newbie = (rng.random(n_rows) < 0.5).astype(int)
    channel = rng.choice(["Phone", "Web", "Multichannel"], n_rows, p=[0.45, 0.45, 0.1])
    base = expit(-1.9 - 0.08 * (recency - 6) + 0.25 * (np.log(history) - 5.0))
    recent_new = (newbie == 1) & (recency <= 4)
    if heterogeneous:
        lift_mens = np.where(mens == 1, 0.12, -0.06) * np.where(womens == 1, 0.5, 1.0)
        lift_womens = np.where(recent_new, 0.2, -0.03)
    else:
        # About the heterogeneous case's averages, spread evenly.
        lift_mens = np.full(n_rows, 0.035)
        lift_womens = np.full(n_rows, 0.01)
    p = np.column_stack([base, base + lift_mens, base + lift_womens]).clip(0.005, 0.995)
    share = np.full(len(ARMS), 1.0 / len(ARMS))
    pick = rng.choice(len(ARMS), n_rows, p=share)
    visit = (rng.random(n_rows) < p[np.arange(n_rows), pick]).astype(int)
    conversion = visit * (rng.random(n_rows) < 0.3)
    spend = np.round(conversion * rng.gamma(2.0, 60.0, n_rows), 2)
    table = pd.DataFrame(
        {
            "customer": [f"C{i:07d}" for i in range(n_rows)],
            "recency": recency,
            "history": history,
            "mens": mens,
            "womens": womens,
            "newbie": newbie,
            "channel": channel,
            "noise": rng.normal(size=n_rows),
            "arm": np.asarray(ARMS)[pick],
            "propensity": share[pick],
            "visit": visit,
            "conversion": conversion.astype(int),
            "spend": spend,
        }
    )
    truth = pd.DataFrame({f"p_purchase_{arm}": p[:, j] for j, arm in enumerate(ARMS)})
    return table, truth
