"""Latent customer process of the simulator and its exact ground truth.

Each customer has static traits and deterministic daily paths (session rate,
conversion per session, dormancy hazard, feature adoption) that follow from
the traits, the tenure and the calendar. The randomness is in the outcomes:
Poisson sessions, Bernoulli conversions and an absorbing alive -> fading ->
dormant chain: an alive customer starts to fade at the end of a day with the
day's hazard, a fading one keeps a share of the session rate and turns
dormant at the end of each day with a fixed probability. Disengagement is thus
a gradual, observable decline rather than a hidden switch. Because the paths
are known at any midnight, the probability of "no session in the next H days"
or "no purchase in the next H days" is an exact forward recursion over the
three states (``window_no_event``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

ACTIONS: tuple[str, ...] = (
    "discount",
    "loyalty_points",
    "onboarding_email",
    "feature_tutorial",
    "cart_recovery",
    "control",
)
FEATURES: tuple[str, ...] = (
    "dashboards",
    "saved_searches",
    "wishlist",
    "price_alerts",
    "reorder",
    "subscriptions",
    "reviews",
    "gift_cards",
    "shared_lists",
    "mobile_scan",
    "export",
    "integrations",
)
CATEGORIES: tuple[str, ...] = (
    "electronics",
    "home",
    "fashion",
    "beauty",
    "grocery",
    "sports",
    "toys",
    "books",
)
NEW_CUSTOMER_DAYS = 60
# Dormant customers return for a session at this daily rate, whatever their former
# engagement: a long gone customer's visit says little about the past rate.
RETURN_RATE = 0.025
# Fading customers keep this share of their session rate ...
FADE = 0.3
# ... and turn dormant at the end of each day with this probability (mean 8 days).
FADE_EXIT = 0.125
# Typical sessions per day: the reference point of hazards and email opens.
REF_RATE = 0.4
# Sessions per day by weekday (Monday first) and share of sessions by hour.
_WEEKDAY = np.array([0.95, 0.95, 0.97, 1.0, 1.05, 1.08, 1.0])
_HOURS = np.array(
    [1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 3.5, 3.5, 3.5, 4, 3.5, 3.2, 3.2, 3.4, 3.8, 4.5, 5, 5, 4.2]
    + [3, 0.0]
)
HOUR_PROBS = _HOURS / _HOURS.sum()
#: cart_recovery multiplies the return probability of the carts abandoned in the purchase
#: horizon after the exposure (capped, see ``_sim_intent.RETURN_CAP``).
RECOVERY_BOOST = 2.0


@dataclass
class Traits:
    """Static latent traits of a block of customers (one entry per customer)."""

    signup_day: np.ndarray  # day index relative to the start; negative for the initial base
    initially_alive: np.ndarray
    engagement: np.ndarray  # log sessions/day at the start of the drift
    drift: np.ndarray  # change of log session rate per day
    conversion: np.ndarray  # logit of the purchase probability of one session
    conversion_drift: np.ndarray
    price_sensitivity: np.ndarray
    value_level: np.ndarray  # log multiplier of prices paid
    friction: np.ndarray  # drives support tickets and the dormancy hazard
    adoption_ceiling: np.ndarray  # features eventually adopted (0-12)
    adoption_days: np.ndarray  # time scale of adoption
    email_affinity: np.ndarray
    items_mean: np.ndarray
    favorite_category: np.ndarray
    app_user: np.ndarray
    device: np.ndarray  # 0 desktop, 1 mobile, 2 tablet
    dormancy_draw: np.ndarray  # Exp(1) threshold on the cumulative hazard
    fade_days: np.ndarray  # days spent fading before dormancy, Geometric(FADE_EXIT)


def draw_traits(
    rng: np.random.Generator, n: int, days: int, initial_share: float, history_days: int
) -> Traits:
    """Draw the traits of ``n`` customers; a share already exists at the start."""
    initial = rng.random(n) < initial_share
    signup = np.where(
        initial, -rng.integers(1, history_days + 1, n), rng.integers(0, max(days, 1), n)
    )
    # A quarter of customers is in decline: their session rate falls steadily.
    declining = rng.random(n) < 0.3
    drift = np.where(declining, rng.normal(-0.008, 0.003, n), rng.normal(0.0005, 0.0015, n))
    friction = np.where(rng.random(n) < 0.25, rng.gamma(2.0, 0.5, n), rng.gamma(1.0, 0.08, n))
    return Traits(
        signup_day=signup.astype(np.int64),
        initially_alive=np.where(initial, rng.random(n) < 0.85, True),
        engagement=rng.normal(np.log(REF_RATE), 0.35, n),
        drift=drift,
        conversion=rng.normal(-2.75, 0.15, n),
        conversion_drift=rng.normal(0.0, 0.0005, n),
        price_sensitivity=rng.beta(2.0, 2.0, n),
        value_level=rng.normal(0.0, 0.45, n),
        friction=friction,
        adoption_ceiling=rng.uniform(0.0, 12.0, n) * rng.beta(2.0, 1.5, n),
        adoption_days=rng.uniform(20.0, 120.0, n),
        email_affinity=rng.normal(-1.0, 1.0, n),
        items_mean=rng.gamma(2.0, 0.4, n),
        favorite_category=rng.integers(0, len(CATEGORIES), n),
        app_user=rng.random(n) < 0.45,
        device=rng.choice(3, n, p=[0.45, 0.45, 0.10]),
        dormancy_draw=rng.exponential(1.0, n),
        fade_days=rng.geometric(FADE_EXIT, n).astype(np.int64),
    )


@dataclass
class Paths:
    """Deterministic daily paths, shape (customers, days + horizon)."""

    tenure: np.ndarray  # days since signup (negative before)
    trend_rate: np.ndarray  # sessions/day without calendar effects
    rate: np.ndarray  # expected sessions/day
    conversion: np.ndarray  # P(purchase | session)
    hazard: np.ndarray  # P(alive -> dormant at the end of the day), before campaigns
    adoption: np.ndarray  # features adopted (continuous)


def _calendar(start: date, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    days = [start + timedelta(days=k) for k in range(length)]
    weekday = np.array([d.weekday() for d in days])
    doy = np.array([d.timetuple().tm_yday for d in days], dtype=float)
    season = 1.0 + 0.08 * np.cos(2 * np.pi * (doy - 20) / 365.25)
    holiday = np.array(
        [(d.month == 11 and d.day >= 20) or (d.month == 12 and d.day <= 24) for d in days]
    )
    return _WEEKDAY[weekday] * season, holiday.astype(float) * 0.35, weekday


def build_paths(traits: Traits, start: date, length: int, hazard_base: float) -> Paths:
    """Compute every customer's daily paths for ``length`` days from ``start``."""
    calendar, holiday, _ = _calendar(start, length)
    k = np.arange(length)[None, :]
    signup = traits.signup_day[:, None]
    tenure = k - signup
    # Drift runs from the later of signup and start, and saturates after 200 days.
    elapsed = np.clip(k - np.maximum(signup, 0), 0, 200)
    log_rate = np.clip(traits.engagement[:, None] + traits.drift[:, None] * elapsed, -5.0, 0.4)
    trend_rate = np.exp(log_rate)
    rate = trend_rate * calendar[None, :]
    logit_conv = (
        traits.conversion[:, None] + traits.conversion_drift[:, None] * elapsed + holiday[None, :]
    )
    conversion = 1.0 / (1.0 + np.exp(-logit_conv))
    adoption = traits.adoption_ceiling[:, None] * (
        1.0 - np.exp(-np.maximum(tenure, 0) / traits.adoption_days[:, None])
    )
    newcomer = np.log1p(1.5 * np.exp(-np.maximum(tenure, 0) / 21.0))
    log_hazard = (
        np.log(hazard_base)
        - 0.9 * (log_rate - np.log(REF_RATE))
        - 0.14 * adoption
        + 0.9 * traits.friction[:, None]
        - 40.0 * np.minimum(traits.drift[:, None], 0.0)
        + newcomer
    )
    hazard = np.minimum(np.exp(log_hazard), 0.25)
    return Paths(tenure, trend_rate, rate, conversion, hazard, adoption)


def dormancy_day(hazard: np.ndarray, traits: Traits) -> np.ndarray:
    """Last alive day of each customer given hazard paths (-1: dormant from the start).

    A customer alive on day k turns dormant at the end of it with probability
    ``hazard[k]``; drawing Exp(1) thresholds against the cumulative
    ``-log(1 - hazard)`` reproduces exactly that survival.
    """
    first = np.maximum(traits.signup_day, 0)
    k = np.arange(hazard.shape[1])[None, :]
    step = np.where(k >= first[:, None], -np.log1p(-hazard), 0.0)
    cumulative = np.cumsum(step, axis=1)
    crossed = cumulative >= traits.dormancy_draw[:, None]
    last = np.where(crossed.any(axis=1), crossed.argmax(axis=1), hazard.shape[1] - 1)
    return np.where(traits.initially_alive, last, -1).astype(np.int64)


def window_no_event(
    rate: np.ndarray,
    hazard: np.ndarray,
    horizon: int,
    starts: int,
    every: int = 1,
    share: np.ndarray | None = None,
    late: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(no event in [T, T + horizon)) for T = 0, every, ... < starts.

    An alive customer has events at Poisson ``rate`` during a day and then
    starts to fade with probability ``hazard``; a fading one has events at
    ``FADE * rate`` and then turns dormant with probability ``FADE_EXIT``; a
    dormant one has events at ``RETURN_RATE * share`` (``share`` is the
    events per session, 1 for sessions themselves). Forward
    recursion over the horizon of the probabilities of each state with no
    event yet. Returns the probability from an alive, a fading and a dormant
    start, each of shape (rows, len(range(0, starts, every))). ``rate`` and
    ``hazard`` need ``starts + horizon - 1`` columns.

    ``late`` holds, like ``rate``, the share of each day's events that come
    hours later (cart returns), and per day j of the window the probability
    that such an event falls after the window's end: those are not counted.

    Examples
    --------
    >>> rate, hazard = np.full((1, 3), 0.5), np.zeros((1, 3))
    >>> [round(float(w[0, 0]), 4) for w in window_no_event(rate, hazard, 2, 2)]
    [0.3679, 0.7531, 0.9512]
    """
    rate32 = rate.astype(np.float32)
    no_event = np.exp(-rate32)
    stay = no_event * (1.0 - hazard.astype(np.float32))
    leave = no_event - stay
    fade = np.exp(np.float32(-FADE) * rate32)
    fade_stay = fade * np.float32(1.0 - FADE_EXIT)
    fade_leave = fade - fade_stay
    back = np.float32(RETURN_RATE) * (1.0 if share is None else share.astype(np.float32))
    quiet = np.broadcast_to(np.exp(-back), rate.shape)
    shape = (rate.shape[0], len(range(0, starts, every)))
    # Two chains: one from an alive start (a, f, d), one from a fading start (f2, d2).
    a = np.ones(shape, dtype=np.float32)
    f = np.zeros(shape, dtype=np.float32)
    d = np.zeros(shape, dtype=np.float32)
    f2 = np.ones(shape, dtype=np.float32)
    d2 = np.zeros(shape, dtype=np.float32)
    d3 = np.ones(shape, dtype=np.float32)
    tmp = np.empty(shape, dtype=np.float32)
    for j in range(horizon):
        cols = slice(j, j + starts, every)
        q = quiet[:, cols]
        st, lv = stay[:, cols], leave[:, cols]
        fs, fl = fade_stay[:, cols], fade_leave[:, cols]
        # Below 1e-12 the late events change no float32 probability: skip the exps.
        if late is not None and late[1][j] > 1e-12:
            lost = late[0][:, cols].astype(np.float32) * np.float32(late[1][j])
            alive_back = np.exp(rate32[:, cols] * lost)
            fading_back = np.exp(np.float32(FADE) * rate32[:, cols] * lost)
            st, lv = st * alive_back, lv * alive_back
            fs, fl = fs * fading_back, fl * fading_back
            q = q * np.exp(np.broadcast_to(back, rate.shape)[:, cols] * lost)
        d *= q
        d += np.multiply(f, fl, out=tmp)
        f *= fs
        f += np.multiply(a, lv, out=tmp)
        a *= st
        d2 *= q
        d2 += np.multiply(f2, fl, out=tmp)
        f2 *= fs
        d3 *= q
    return a + f + d, f2 + d2, d3


def effect_multipliers(
    tenure: np.ndarray,
    purchase_rate: np.ndarray,
    hazard: np.ndarray,
    adoption: np.ndarray,
    price_sensitivity: np.ndarray,
    value_level: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multipliers of the hazard, the conversion, the visits and the cart returns per action.

    Each has shape (n, actions). The visit multiplier scales the session rate
    in every state, so a campaign can bring a fading or dormant customer back
    for a visit within the churn horizon. The return multiplier scales the
    probability that a cart abandoned while the campaign is in effect comes
    back to buy (in-session intent, ``_sim_intent``).

    The best action depends on the segment: discount moves price-sensitive
    lapsing buyers, loyalty points keep high-value customers at risk,
    onboarding helps only new customers (and slightly annoys the others),
    the tutorial helps customers who adopted few features, and cart recovery
    acts only on the carts a customer abandons: its effect grows with the
    abandonment rate, and is nil without in-session intent.
    """
    lapsing = 1.0 / (1.0 + np.exp(3.0 * (np.log(np.maximum(purchase_rate, 1e-6)) - np.log(0.02))))
    high_value = 1.0 / (1.0 + np.exp(-4.0 * value_level))
    at_risk = 1.0 / (1.0 + np.exp(-2.0 * (np.log(hazard) - np.log(0.008))))
    new = tenure < NEW_CUSTOMER_DAYS
    low_adoption = np.clip(1.0 - adoption / 4.0, 0.0, 1.0)
    n = tenure.shape[0]
    m_hazard = np.ones((n, len(ACTIONS)))
    m_conv = np.ones((n, len(ACTIONS)))
    m_visit = np.ones((n, len(ACTIONS)))
    m_return = np.ones((n, len(ACTIONS)))
    m_visit[:, 0] = 1.0 + 0.8 * price_sensitivity * lapsing
    m_visit[:, 1] = 1.0 + 1.2 * high_value * at_risk
    m_visit[:, 2] = np.where(new, 1.8, 0.9)
    m_visit[:, 3] = 1.0 + 0.7 * low_adoption
    m_conv[:, 0] = 1.0 + 1.8 * price_sensitivity * lapsing
    m_hazard[:, 0] = 1.0 - 0.3 * price_sensitivity * lapsing
    m_hazard[:, 1] = 1.0 - 0.65 * high_value * at_risk
    m_conv[:, 1] = 1.0 + 0.3 * high_value
    m_hazard[:, 2] = np.where(new, 0.45, 1.12)
    m_conv[:, 2] = np.where(new, 1.4, 0.97)
    m_hazard[:, 3] = 1.0 - 0.6 * low_adoption
    m_conv[:, 3] = 1.0 + 0.1 * low_adoption
    m_return[:, 4] = RECOVERY_BOOST
    return m_hazard, m_conv, m_visit, m_return


def assignment_probabilities(tenure: np.ndarray, value_level: np.ndarray) -> np.ndarray:
    """Logged probabilities of each action, shape (n, actions); all >= 0.05.

    Onboarding is favoured for new customers and loyalty points for high
    spenders, so naive treated-vs-control comparisons are confounded.
    """
    new = (tenure < NEW_CUSTOMER_DAYS)[:, None]
    high = (value_level > 0.0)[:, None]
    p_new = np.array([0.13, 0.13, 0.36, 0.13, 0.10, 0.15])
    p_high = np.array([0.18, 0.30, 0.05, 0.12, 0.12, 0.23])
    p_low = np.array([0.25, 0.13, 0.05, 0.20, 0.14, 0.23])
    return np.where(new, p_new, np.where(high, p_high, p_low))
