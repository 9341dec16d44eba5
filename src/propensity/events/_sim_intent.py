"""In-session intent: abandoned carts that come back to buy within hours.

A session that adds to the cart and leaves without buying keeps an open
intent. With probability ``q = RETURN_MAX * (1 - exp(-p_buy / RETURN_SCALE))``,
where ``p_buy`` is the session's own conversion probability, the customer comes
back after an exponential delay (mean :data:`RETURN_MEAN_HOURS`) and buys what
was in the cart. A ``cart_recovery`` exposure multiplies ``q`` of the carts
abandoned while it is in effect (capped at :data:`RETURN_CAP`). The truth of each
abandonment is ``q`` and the delay law, so P(returned and bought by ``t``) =
``q * (1 - exp(-(t - abandoned_at) / mean))`` is known exactly at any request time.

Returns are purchases (and visits) too, so the simulator's outcome truth counts
them: a session leads to a purchase with probability :func:`session_purchase`,
a return crosses a window's end with probability :func:`late_tail`, and carts
still open at a midnight weigh on the windows that start there
(:func:`open_cart_factors`).

Draws use a generator of their own, so turning intent on leaves every other
event of a seed unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propensity.events._sim_latent import HOUR_PROBS

__all__ = [
    "RETURN_MAX",
    "RETURN_SCALE",
    "RETURN_MEAN_HOURS",
    "RETURN_CAP",
    "Abandonments",
    "abandonments",
    "abandon_probability",
    "return_probability",
    "session_purchase",
    "late_tail",
    "open_cart_factors",
    "p_bought_by",
]

#: Share of abandoned carts of the most eager sessions that come back to buy.
RETURN_MAX = 0.45
#: Conversion probability at which the return probability reaches 63% of its maximum.
RETURN_SCALE = 0.15
#: Mean delay between the last cart add and the return visit.
RETURN_MEAN_HOURS = 3.0
#: Highest return probability a campaign can raise ``q`` to.
RETURN_CAP = 0.95
#: Seconds [from, to) after its start at which a session adds to its cart ...
CART_ADD_SECONDS = (900, 1_200)
#: ... and after which a return visit buys.
RETURN_BUY_SECONDS = (600, 660)
_US_PER_HOUR = 3_600 * 1_000_000
_DAY_S = 86_400
_MEAN_S = RETURN_MEAN_HOURS * 3_600
# An open cart weighs on the windows of this many midnights after its abandonment: at the
# next one it is over 3 days old and its posterior return probability below exp(-24) q.
_OPEN_DAYS = 4


def _mean_exp(lo: int, hi: int) -> float:
    """E[exp(s / mean)] of a whole number of seconds s uniform in [lo, hi)."""
    return float(np.exp(np.arange(lo, hi) / _MEAN_S).mean())


# P(the purchase of a return visit falls after the midnight that ends the abandonment's
# day): sessions start at an hour of HOUR_PROBS and a second uniform within it (none at
# 23h, so a session ends the day it starts), the cart add and the purchase follow at
# uniform offsets, and the delay is exponential: E[exp(-(midnight - bought at) / mean)].
_LAST_DAY_LATE = (
    float(np.exp(-_DAY_S / _MEAN_S))
    * float(HOUR_PROBS @ np.exp(3_600 * np.arange(24) / _MEAN_S))
    * _mean_exp(0, 3_600)
    * _mean_exp(*CART_ADD_SECONDS)
    * _mean_exp(*RETURN_BUY_SECONDS)
)


@dataclass
class Abandonments:
    """Abandoned sessions of a block and their outcome (arrays, one row each)."""

    session: np.ndarray  # local session number of the abandoned session
    customer: np.ndarray
    abandoned_at: np.ndarray  # µs since the block start: the session's last cart add
    p_return: np.ndarray  # q: probability of coming back to buy, at any delay
    returned_at: np.ndarray  # µs since the block start, -1 when the customer does not return
    bought_at: np.ndarray  # µs of the return visit's first purchase, -1 without one

    @property
    def returned(self) -> np.ndarray:
        return self.returned_at >= 0


def abandon_probability(p_buy: np.ndarray) -> np.ndarray:
    """P(a session that does not buy adds to its cart): the abandonment propensity.

    Examples
    --------
    >>> abandon_probability(np.array([0.06, 0.5])).round(2).tolist()
    [0.15, 0.9]
    """
    return np.minimum(2.5 * p_buy, 0.9)


def return_probability(p_buy: np.ndarray, boost: np.ndarray | float = 1.0) -> np.ndarray:
    """``q`` of a cart abandoned by a session with conversion ``p_buy``, times ``boost``.

    Examples
    --------
    >>> return_probability(np.array([0.15]), np.array([3.0])).round(3).tolist()
    [0.853]
    """
    q = RETURN_MAX * (1.0 - np.exp(-p_buy / RETURN_SCALE))
    return np.minimum(q * boost, RETURN_CAP)


def session_purchase(
    p_buy: np.ndarray, boost: np.ndarray | float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """P(a session leads to a purchase, at once or by a return) and the share by a return.

    A session buys with ``p_buy``; otherwise it abandons a cart with
    :func:`abandon_probability` and the cart comes back with
    :func:`return_probability`, independently of everything else the customer
    does, so purchase-bringing sessions are a thinning of the session process.

    Examples
    --------
    >>> total, late = session_purchase(np.array([0.06]))
    >>> round(float(total[0]), 4), round(float(late[0]), 3)
    (0.0809, 0.259)
    """
    back = (1.0 - p_buy) * abandon_probability(p_buy) * return_probability(p_buy, boost)
    total = p_buy + back
    return total, np.divide(back, total, out=np.zeros_like(total), where=total > 0)


def late_tail(horizon: int) -> np.ndarray:
    """P(a return of a cart abandoned on day j of a window buys after its end), j < horizon.

    Examples
    --------
    >>> [f"{p:.1e}" for p in late_tail(3)]
    ['1.8e-08', '5.4e-05', '1.6e-01']
    """
    days_after = np.arange(horizon - 1, -1, -1)
    return _LAST_DAY_LATE * np.exp(-days_after * _DAY_S / _MEAN_S)


def abandonments(
    rng: np.random.Generator,
    cart_session: np.ndarray,
    cart_ts: np.ndarray,
    session_customer: np.ndarray,
    session_p_buy: np.ndarray,
    converted: np.ndarray,
    end_us: int,
    session_boost: np.ndarray | None = None,
) -> Abandonments:
    """Find the sessions that carted without buying and draw their return.

    Parameters
    ----------
    cart_session, cart_ts : ndarray
        Session number and timestamp (µs) of every ``add_to_cart`` row.
    session_customer, session_p_buy, converted : ndarray
        Per session: customer, conversion probability, whether it bought.
    end_us : int
        End of the simulated period (µs): later returns are not observed.
    session_boost : ndarray, optional
        Per session: the campaign multiplier of ``q`` in effect (1 without one).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = abandonments(rng, np.array([0, 0, 1]), np.array([5, 9, 7]),
    ...                  np.array([3, 4]), np.array([0.2, 0.3]), np.array([False, True]), 10**12)
    >>> a.session.tolist(), a.abandoned_at.tolist()
    ([0], [9])
    """
    n_sessions = session_customer.size
    last_cart = np.full(n_sessions, -1, dtype=np.int64)
    np.maximum.at(last_cart, cart_session, cart_ts)
    session = np.flatnonzero((last_cart >= 0) & ~converted)
    boost = 1.0 if session_boost is None else session_boost[session]
    q = return_probability(session_p_buy[session], boost)
    comes_back = rng.random(session.size) < q
    delay = rng.exponential(RETURN_MEAN_HOURS * _US_PER_HOUR, session.size).astype(np.int64)
    returned_at = last_cart[session] + delay
    observed = comes_back & (returned_at < end_us)
    return Abandonments(
        session=session,
        customer=session_customer[session],
        abandoned_at=last_cart[session],
        p_return=q,
        returned_at=np.where(observed, returned_at, -1),
        bought_at=np.full(session.size, -1, dtype=np.int64),
    )


def open_cart_factors(
    a: Abandonments, n: int, days: int, horizons: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """P(no cart open at a midnight brings a purchase / a visit or purchase into its window).

    Entry ``[c, T]`` concerns the windows ``[T, T + horizon)`` that start at the
    midnight of day ``T`` for customer ``c``; both arrays have shape (n, days).
    A cart abandoned before ``T`` whose return visit has not begun comes back
    with the posterior ``q S / (1 - q + q S)``, ``S = exp(-age / mean)``, and
    then after a delay that is again exponential (memoryless); a return visit
    begun before ``T`` whose purchase comes at ``T`` or later buys inside the
    window for sure.

    Parameters
    ----------
    horizons : (int, int)
        Days of the purchase window and of the visit (churn) window.

    Examples
    --------
    >>> a = Abandonments(*(np.array([v]) for v in (0, 0, 22 * _US_PER_HOUR, 0.5, -1, -1)))
    >>> buy, visit = open_cart_factors(a, 1, 2, (14, 30))
    >>> round(float(buy[0, 1]), 3), float(buy[0, 0])
    (0.661, 1.0)
    """
    no_buy, no_visit = np.ones((n, days)), np.ones((n, days))
    day_us = _DAY_S * 1_000_000
    mean_us = _MEAN_S * 1_000_000
    # The delay left must fit in the window; a purchase also waits for its visit's offset.
    buy_in = 1.0 - _mean_exp(*RETURN_BUY_SECONDS) * np.exp(-horizons[0] * _DAY_S / _MEAN_S)
    visit_in = 1.0 - np.exp(-horizons[1] * _DAY_S / _MEAN_S)
    q = a.p_return
    for k in range(1, _OPEN_DAYS + 1):
        day = a.abandoned_at // day_us + k
        keep = day < days
        midnight = day * day_us
        visited = a.returned & (a.returned_at < midnight)
        buying = visited & (a.bought_at >= midnight)
        survive = np.exp(-(midnight - a.abandoned_at) / mean_us)
        posterior = np.where(visited, 0.0, q * survive / (1.0 - q + q * survive))
        at = (a.customer[keep], day[keep])
        np.multiply.at(no_buy, at, np.where(buying, 0.0, 1.0 - posterior * buy_in)[keep])
        np.multiply.at(no_visit, at, np.where(buying, 0.0, 1.0 - posterior * visit_in)[keep])
    return no_buy, no_visit


def p_bought_by(p_return: np.ndarray, abandoned_at: np.ndarray, t: np.ndarray) -> np.ndarray:
    """True P(the abandoned cart came back and bought by ``t``), all times in µs.

    Examples
    --------
    >>> float(p_bought_by(np.array([0.4]), np.array([0]), np.array([0]))[0])
    0.0
    """
    elapsed = np.maximum(t - abandoned_at, 0) / (RETURN_MEAN_HOURS * _US_PER_HOUR)
    return p_return * (1.0 - np.exp(-elapsed))
