"""BG/NBD and Gamma-Gamma, the specialist purchase and spend models (only importer of lifetimes).

:class:`BGNBDBaseline` fits the BG/NBD model (Fader, Hardie & Lee 2005) on each
customer's repeat-purchase summary — ``frequency`` (repeat purchase days),
``recency`` (days from the first to the last purchase day) and ``T`` (days from
the first purchase, or first event, to the cutoff) — and predicts, for a horizon
of ``h`` days, P(alive), the expected purchases and the probability of at least
one purchase. With order values it also fits Gamma-Gamma for the expected spend
per purchase.

``lifetimes`` 0.11.3 is used rather than PyMC-Marketing: PyMC-Marketing 1.x needs
Python 3.12 (the project runs 3.11), and lifetimes' maximum-likelihood fit takes
about 2 s for 100,000 customers on 2 cores.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

__all__ = ["CLV_FEATURES", "RFM_COLUMNS", "BGNBDBaseline"]

#: The repeat-purchase summary each row needs (see the module docstring).
RFM_COLUMNS = ("frequency", "recency", "T", "monetary")
#: The outputs offered as model features (:meth:`BGNBDBaseline.features`).
CLV_FEATURES = ("bgnbd_p_alive", "bgnbd_expected_purchases", "bgnbd_p_purchase", "gg_spend")

_log = logging.getLogger(__name__)


class BGNBDBaseline(BaseEstimator):
    """BG/NBD purchase model with an optional Gamma-Gamma spend model.

    Parameters
    ----------
    penalizer_coef : float
        L2 penalty of lifetimes' fits; a little keeps the fit stable on small shops.
    spend : bool
        Also fit Gamma-Gamma on the repeat buyers' ``monetary`` (mean order value)
        when at least ten of them have a positive one.

    Attributes
    ----------
    params_ : dict
        BG/NBD ``r``, ``alpha``, ``a``, ``b``.
    spend_params_ : dict
        Gamma-Gamma ``p``, ``q``, ``v`` (empty without spend data, or when the fit
        did not converge).
    penalizer_ : float
        The penalty BG/NBD's fit took: ``penalizer_coef``, or ten or a hundred times
        it when lifetimes' optimizer did not converge with less.

    Examples
    --------
    >>> rfm = pd.DataFrame({"frequency": [0, 2, 5, 1] * 50, "recency": [0, 30, 80, 10] * 50,
    ...                     "T": [40, 90, 90, 60] * 50, "monetary": [0, 20, 35, 10] * 50})
    >>> model = BGNBDBaseline().fit(rfm)
    >>> p = model.predict_proba(rfm, horizon_days=30)
    >>> bool(((p > 0) & (p < 1)).all())
    True
    """

    def __init__(self, penalizer_coef: float = 0.001, spend: bool = True) -> None:
        self.penalizer_coef = penalizer_coef
        self.spend = spend

    def fit(self, rfm: pd.DataFrame, y: object = None) -> BGNBDBaseline:
        """Fit on the summary columns ``frequency``, ``recency``, ``T`` (and ``monetary``)."""
        from lifetimes import BetaGeoFitter, GammaGammaFitter

        f, r, t = _columns(rfm)
        bgf, self.penalizer_ = _fit_converging(BetaGeoFitter, self.penalizer_coef, f, r, t)
        if bgf is None:
            raise ValueError(
                f"BG/NBD did not converge on {len(f):,} customers, even with a penalizer of "
                f"{self.penalizer_:g}: too few repeat purchases to fit it?"
            )
        self.params_ = {k: float(v) for k, v in bgf.params_.items()}
        self.spend_params_: dict[str, float] = {}
        self.mean_spend_ = 0.0
        if self.spend and "monetary" in rfm:
            monetary = rfm["monetary"].to_numpy(np.float64)
            buyers = (f > 0) & (monetary > 0)
            if buyers.sum() >= 10:
                self.mean_spend_ = float(monetary[buyers].mean())
                # Fitted on order values in units of their mean: in the shop's currency
                # the likelihood's optimizer has stopped short ("precision loss") on
                # real-looking data. Only ``v`` carries the unit.
                ggf, _ = _fit_converging(
                    GammaGammaFitter,
                    self.penalizer_coef,
                    f[buyers],
                    monetary[buyers] / self.mean_spend_,
                )
                if ggf is None:
                    _log.warning(
                        "Gamma-Gamma did not converge on %d repeat buyers; no spend model",
                        buyers.sum(),
                    )
                else:
                    self.spend_params_ = {k: float(v) for k, v in ggf.params_.items()}
                    self.spend_params_["v"] *= self.mean_spend_
        return self

    def _posterior(self, rfm: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(alive), and the posterior Gamma(shape, rate) of the purchase rate if alive."""
        f, r, t = _columns(rfm)
        p = self.params_
        a, b, alpha, rr = p["a"], p["b"], p["alpha"], p["r"]
        # P(alive) = 1 / (1 + [x > 0] a/(b+x-1) ((alpha+T)/(alpha+t_x))^(r+x)), in log space
        log_ratio = (rr + f) * (np.log(alpha + t) - np.log(alpha + r))
        term = np.where(
            f > 0, np.log(a) - np.log(np.maximum(b + f - 1, 1e-12)) + log_ratio, -np.inf
        )
        p_alive = 1.0 / (1.0 + np.exp(np.minimum(term, 700.0)))
        return p_alive, rr + f, alpha + t

    def features(self, rfm: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        """The outputs offered as features (``CLV_FEATURES``), one row per ``rfm`` row.

        ``bgnbd_p_purchase`` is P(at least one purchase in the next ``horizon_days``):
        alive, and the Poisson rate (posterior Gamma(r + x, alpha + T)) brings one.
        ``gg_spend`` is Gamma-Gamma's expected order value (NaN without spend data).
        """
        p_alive, shape, rate = self._posterior(rfm)
        h = float(horizon_days)
        p_none_if_alive = np.exp(shape * (np.log(rate) - np.log(rate + h)))
        expected = self._expected_purchases(rfm, h)
        spend = np.full(len(rfm), np.nan)
        if self.spend_params_:
            sp = self.spend_params_
            f = rfm["frequency"].to_numpy(np.float64)
            m = rfm["monetary"].to_numpy(np.float64)
            prior = sp["p"] * sp["v"] / (sp["q"] - 1) if sp["q"] > 1 else self.mean_spend_
            weight = sp["p"] * f / (sp["p"] * f + sp["q"] - 1)
            spend = np.where(f > 0, (1 - weight) * prior + weight * m, prior)
        return pd.DataFrame(
            {
                "bgnbd_p_alive": p_alive,
                "bgnbd_expected_purchases": expected,
                "bgnbd_p_purchase": p_alive * (1.0 - p_none_if_alive),
                "gg_spend": spend,
            },
            index=rfm.index,
        )

    def _expected_purchases(self, rfm: pd.DataFrame, h: float) -> np.ndarray:
        """E[purchases in the next ``h`` days] (Fader, Hardie & Lee 2005, eq. 10).

        lifetimes takes the log of the Gauss hypergeometric term, which is negative
        when ``a + b + x < 1`` (``b < 1`` and no repeat purchase): its answer is NaN
        there. The term is used as it is, through Euler's transformation where it
        overflows.
        """
        from scipy.special import hyp2f1

        f, _, t = _columns(rfm)
        p = self.params_
        a, b, alpha, rr = p["a"], p["b"], p["alpha"], p["r"]
        c = a + b + f - 1
        z = h / (alpha + t + h)
        with np.errstate(all="ignore"):
            # 2F1(r + x, b + x; c; z) (1 - z)^(r + x), the second factor folded into Euler's form
            direct = hyp2f1(rr + f, b + f, c, z) * (1 - z) ** (rr + f)
            euler = (1 - z) ** (a - 1) * hyp2f1(c - rr - f, a - 1, c, z)
            term = np.where(np.isfinite(direct), direct, euler)
        p_alive, _, _ = self._posterior(rfm)
        return np.asarray(p_alive * c / (a - 1) * (1 - term), dtype=np.float64)

    def predict_proba(self, rfm: pd.DataFrame, horizon_days: int) -> np.ndarray:
        """P(at least one purchase in the next ``horizon_days``), shape ``(n,)``."""
        return self.features(rfm, horizon_days)["bgnbd_p_purchase"].to_numpy()


def _fit_converging(
    fitter: type[Any], penalizer: float, *columns: np.ndarray
) -> tuple[Any | None, float]:
    """A lifetimes fitter fitted on ``columns``, and the penalizer it took.

    lifetimes raises when its optimizer does not report success; its own advice is a
    larger penalizer, tried here up to a hundred times the asked one. ``None`` when
    even that fails.
    """
    from lifetimes.utils import ConvergenceError

    for coef in (penalizer, 10 * penalizer, 100 * penalizer):
        try:
            with warnings.catch_warnings():
                # lifetimes warns on slow convergence; the fit is checked by its metrics
                warnings.simplefilter("ignore")
                return fitter(penalizer_coef=coef).fit(*columns), coef
        except ConvergenceError:
            continue
    return None, coef


def _columns(rfm: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [c for c in ("frequency", "recency", "T") if c not in rfm]
    if missing:
        raise ValueError(f"the repeat-purchase summary lacks column(s) {missing}")
    f = rfm["frequency"].to_numpy(np.float64)
    r = rfm["recency"].to_numpy(np.float64)
    # lifetimes needs T > 0: a customer first seen on the cutoff's eve has one day
    t = np.maximum(rfm["T"].to_numpy(np.float64), 1.0)
    return f, np.minimum(r, t), t
