"""In-session intent: abandoned carts that come back to buy within hours.

A session that adds to the cart and leaves without buying keeps an open
intent. With probability ``q = RETURN_MAX * (1 - exp(-p_buy / RETURN_SCALE))``,
where ``p_buy`` is the session's own conversion probability, the customer comes
back after an exponential delay (mean :data:`RETURN_MEAN_HOURS`) and buys what
was in the cart. The truth of each abandonment is ``q`` and the delay law, so
P(returned and bought by ``t``) = ``q * (1 - exp(-(t - abandoned_at) / mean))``
is known exactly at any request time.

Draws use a generator of their own, so turning intent on leaves every other
event of a seed unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RETURN_MAX", "RETURN_SCALE", "RETURN_MEAN_HOURS", "Abandonments", "abandonments"]

#: Share of abandoned carts of the most eager sessions that come back to buy.
RETURN_MAX = 0.45
#: Conversion probability at which the return probability reaches 63% of its maximum.
RETURN_SCALE = 0.15
#: Mean delay between the last cart add and the return visit.
RETURN_MEAN_HOURS = 3.0
_US_PER_HOUR = 3_600 * 1_000_000


@dataclass
class Abandonments:
    """Abandoned sessions of a block and their outcome (arrays, one row each)."""

    session: np.ndarray  # local session number of the abandoned session
    customer: np.ndarray
    abandoned_at: np.ndarray  # µs since the block start: the session's last cart add
    p_return: np.ndarray  # q: probability of coming back to buy, at any delay
    returned_at: np.ndarray  # µs since the block start, -1 when the customer does not return

    @property
    def returned(self) -> np.ndarray:
        return self.returned_at >= 0


def abandonments(
    rng: np.random.Generator,
    cart_session: np.ndarray,
    cart_ts: np.ndarray,
    session_customer: np.ndarray,
    session_p_buy: np.ndarray,
    converted: np.ndarray,
    end_us: int,
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
    q = RETURN_MAX * (1.0 - np.exp(-session_p_buy[session] / RETURN_SCALE))
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
    )


def p_bought_by(p_return: np.ndarray, abandoned_at: np.ndarray, t: np.ndarray) -> np.ndarray:
    """True P(the abandoned cart came back and bought by ``t``), all times in µs.

    Examples
    --------
    >>> float(p_bought_by(np.array([0.4]), np.array([0]), np.array([0]))[0])
    0.0
    """
    elapsed = np.maximum(t - abandoned_at, 0) / (RETURN_MEAN_HOURS * _US_PER_HOUR)
    return p_return * (1.0 - np.exp(-elapsed))
