"""Simulate one block of customers: outcomes, campaigns, truth and event columns.

Everything is vectorized over customers and days; the only Python loops run
over campaign waves and over the days of a label horizon.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import NamedTuple

import numpy as np

from propensity.events import _sim_intent as intent
from propensity.events import _sim_latent as lat
from propensity.events.schema import EVENT_TYPES

# Event type codes index the canonical vocabulary, in its documented order.
EVENT_CODES: tuple[str, ...] = tuple(EVENT_TYPES)
CHANNELS: tuple[str, ...] = ("web", "app", "email", "support")
DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet")
PRODUCTS_PER_CATEGORY = 60
_CODE = {name: i for i, name in enumerate(EVENT_CODES)}
_COLUMNS = (
    "customer",
    "ts",
    "type",
    "session",
    "product",
    "category",
    "price",
    "quantity",
    "order",
    "feature",
    "channel",
    "device",
    "campaign",
    "action",
    "propensity",
    "exposure",
)


@dataclass
class BlockSettings:
    """What a block needs from the configuration."""

    days: int
    start: date
    churn_horizon: int
    purchase_horizon: int
    initial_share: float
    history_days: int
    hazard_base: float
    campaign_share: float
    campaign_weekday: int
    eligibility_days: int
    truth_every: int
    product_prices: np.ndarray
    cart_returns: bool = False

    @property
    def length(self) -> int:
        return self.days + max(self.churn_horizon, self.purchase_horizon)


@dataclass
class BlockResult:
    """Outputs of one block, as numpy arrays indexed by local customer number."""

    traits: lat.Traits
    events: dict[str, np.ndarray]
    daily: dict[str, np.ndarray]
    exposures: dict[str, np.ndarray]
    sessions: int = 0
    orders: int = 0
    abandonments: intent.Abandonments | None = None


class _Effects(NamedTuple):
    """Campaign multiplier paths, each of shape (customers, days + horizon)."""

    hazard: np.ndarray
    conversion: np.ndarray
    visits: np.ndarray
    returns: np.ndarray  # of the return probability of the carts abandoned that day


def _dormancy(hazard: np.ndarray, traits: lat.Traits, rows: np.ndarray) -> np.ndarray:
    sub = lat.Traits(**{k: v[rows] for k, v in traits.__dict__.items()})
    return lat.dormancy_day(hazard, sub)


def _fade_end(last: np.ndarray, traits: lat.Traits) -> np.ndarray:
    """Last fading day: ``fade_days`` after the last alive day (-1 if never alive)."""
    return np.where(last >= 0, last + traits.fade_days, -1)


def _state(last: np.ndarray, fade_end: np.ndarray, day: np.ndarray | int) -> np.ndarray:
    """0 alive, 1 fading, 2 dormant at the midnight that starts ``day``."""
    return (day > last).astype(np.int8) + (day > fade_end)


def _first(window: tuple[np.ndarray, ...], state: np.ndarray) -> np.ndarray:
    """P(no event) of the first start, from each row's state."""
    return np.choose(state, [w[:, 0] for w in window])


def _per_session(
    s: BlockSettings, conversion: np.ndarray, boost: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Purchases per session and, with cart returns, the share of them that are returns."""
    if not s.cart_returns:
        return conversion, None
    return intent.session_purchase(conversion, boost)


def _late(share: np.ndarray | None, horizon: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``late`` of :func:`~propensity.events._sim_latent.window_no_event`: returns past the end."""
    return None if share is None else (share, intent.late_tail(horizon))


def _run_campaigns(
    rng: np.random.Generator,
    s: BlockSettings,
    traits: lat.Traits,
    paths: lat.Paths,
    potential: np.ndarray,
    fading: np.ndarray,
    residual: np.ndarray,
) -> tuple[_Effects, np.ndarray, dict[str, np.ndarray]]:
    """Weekly waves: pick eligible customers at random, assign an action, apply its effect.

    Returns the effects, the last alive day of each customer and the exposure
    records with their truth.
    """
    n, length = paths.rate.shape
    hc, hp = s.churn_horizon, s.purchase_horizon
    cooldown = max(hc, hp)
    hz_mult = np.ones((n, length))
    cv_mult = np.ones((n, length))
    vi_mult = np.ones((n, length))
    rt_mult = np.ones((n, length))
    last = lat.dormancy_day(paths.hazard, traits)
    fade_end = _fade_end(last, traits)
    first = np.maximum(traits.signup_day, 0)
    last_exposed = np.full(n, -(10**6))
    weekday = np.array([(s.start.toordinal() + k - 1) % 7 for k in range(s.days)])
    records: dict[str, list[np.ndarray]] = {
        k: []
        for k in ["customer", "day", "action", "propensity", "second", "state", "tenure"]
        + [f"p_{o}_{a}" for o in ("purchase", "churn") for a in lat.ACTIONS]
    }
    purchase_rate = paths.rate * paths.conversion
    for t in (int(x) for x in np.flatnonzero(weekday == s.campaign_weekday)):
        lo = max(0, t - s.eligibility_days)
        k = np.arange(lo, t)[None, :]
        signed = k >= first[:, None]
        seen = np.where(
            k <= last[:, None],
            potential[:, lo:t],
            np.where(k <= fade_end[:, None], fading[:, lo:t], residual[:, lo:t]),
        )
        seen = seen * signed
        recent = seen.sum(axis=1) > 0
        eligible = recent & (traits.signup_day < t) & (last_exposed <= t - cooldown)
        rows = np.flatnonzero(eligible & (rng.random(n) < s.campaign_share))
        if rows.size == 0:
            continue
        tenure = paths.tenure[rows, t]
        m_h, m_c, m_v, m_r = lat.effect_multipliers(
            tenure,
            purchase_rate[rows, t],
            paths.hazard[rows, t],
            paths.adoption[rows, t],
            traits.price_sensitivity[rows],
            traits.value_level[rows],
        )
        probs = lat.assignment_probabilities(tenure, traits.value_level[rows])
        action = (rng.random(rows.size)[:, None] > np.cumsum(probs, axis=1)[:, :-1]).sum(axis=1)
        state = _state(last[rows], fade_end[rows], t)
        for a, name in enumerate(lat.ACTIONS):
            hz_c = paths.hazard[rows, t : t + hc] * m_h[:, a : a + 1]
            r_c = paths.rate[rows, t : t + hc] * m_v[:, a : a + 1]
            visits = np.broadcast_to(m_v[:, a : a + 1], r_c.shape)
            w_churn = _first(lat.window_no_event(r_c, hz_c, hc, 1, share=visits), state)
            hz_p = paths.hazard[rows, t : t + hp] * m_h[:, a : a + 1]
            conv = paths.conversion[rows, t : t + hp] * m_c[:, a : a + 1]
            per_session, late = _per_session(s, conv, m_r[:, a : a + 1])
            share = per_session * m_v[:, a : a + 1]
            r_p = paths.rate[rows, t : t + hp] * share
            window = lat.window_no_event(r_p, hz_p, hp, 1, share=share, late=_late(late, hp))
            w_purchase = _first(window, state)
            records[f"p_churn_{name}"].append(w_churn)
            records[f"p_purchase_{name}"].append(1.0 - w_purchase)
        pick = np.arange(rows.size)
        hz_mult[rows, t : t + hc] = m_h[pick, action][:, None]
        cv_mult[rows, t : t + hp] = m_c[pick, action][:, None]
        vi_mult[rows, t : t + hc] = m_v[pick, action][:, None]
        rt_mult[rows, t : t + hp] = m_r[pick, action][:, None]
        last[rows] = _dormancy(paths.hazard[rows] * hz_mult[rows], traits, rows)
        fade_end[rows] = np.where(last[rows] >= 0, last[rows] + traits.fade_days[rows], -1)
        last_exposed[rows] = t
        records["customer"].append(rows)
        records["day"].append(np.full(rows.size, t))
        records["action"].append(action)
        records["propensity"].append(probs[pick, action])
        records["second"].append(rng.integers(0, 300, rows.size))
        records["state"].append(state)
        records["tenure"].append(tenure)
    exposures = {
        k: (np.concatenate(v) if v else np.zeros(0, dtype=float)) for k, v in records.items()
    }
    for key in ("customer", "day", "action", "second"):
        exposures[key] = exposures[key].astype(np.int64)
    exposures["state"] = exposures["state"].astype(np.int8)
    exposures["alive"] = exposures["state"] == 0
    return _Effects(hz_mult, cv_mult, vi_mult, rt_mult), last, exposures


def _patch_future_exposures(
    window: tuple[np.ndarray, ...],
    rate: np.ndarray,
    realized_hazard: np.ndarray,
    plain_hazard: np.ndarray,
    plain_rate: np.ndarray,
    exposures: dict[str, np.ndarray],
    horizon: int,
    every: int,
    share: np.ndarray | None = None,
    plain_share: np.ndarray | None = None,
    late: np.ndarray | None = None,
    plain_late: np.ndarray | None = None,
) -> None:
    """Recompute windows that contain a later exposure without that exposure's effect.

    At midnight T the campaign sent during day s >= T is not known yet, so the
    truth at T follows the plain path from day s on.
    """
    rows, day = exposures["customer"], exposures["day"]
    if rows.size == 0:
        return
    length = rate.shape[1]
    offsets = np.arange(-horizon + 1, horizon)
    cols = day[:, None] + offsets[None, :]
    inside = (cols >= 0) & (cols < length)
    safe = np.clip(cols, 0, length - 1)
    after = offsets[None, :] >= 0
    r = np.where(after, plain_rate[rows[:, None], safe], rate[rows[:, None], safe])
    h = np.where(after, plain_hazard[rows[:, None], safe], realized_hazard[rows[:, None], safe])
    r = np.where(inside, r, 0.0)
    h = np.where(inside, h, 0.0)
    sh = lt = None
    if share is not None and plain_share is not None:
        sh = np.where(after, plain_share[rows[:, None], safe], share[rows[:, None], safe])
    if late is not None and plain_late is not None:
        lt = np.where(after, plain_late[rows[:, None], safe], late[rows[:, None], safe])
    local = lat.window_no_event(r, h, horizon, horizon, share=sh, late=_late(lt, horizon))
    starts = day[:, None] + np.arange(-horizon + 1, 1)[None, :]
    n_days = window[0].shape[1] * every
    ok = (starts >= 0) & (starts < n_days) & (starts % every == 0)
    i, j = np.nonzero(ok)
    for target, values in zip(window, local, strict=True):
        target[rows[i], starts[i, j] // every] = values[i, j]


def _daily_truth(
    s: BlockSettings,
    traits: lat.Traits,
    paths: lat.Paths,
    effects: _Effects,
    last: np.ndarray,
    exposures: dict[str, np.ndarray],
    open_carts: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    every = s.truth_every
    hz_mult, cv_mult, vi_mult, rt_mult = effects
    hazard = paths.hazard * hz_mult
    hp = s.purchase_horizon
    plain, plain_late = _per_session(s, paths.conversion, 1.0)
    purchase_plain = paths.rate * plain
    per_session, late = _per_session(s, paths.conversion * cv_mult, rt_mult)
    share = per_session * vi_mult
    purchase_rate = paths.rate * share
    visit_rate = paths.rate * vi_mult
    w_churn = lat.window_no_event(visit_rate, hazard, s.churn_horizon, s.days, every, vi_mult)
    w_purchase = lat.window_no_event(
        purchase_rate, hazard, hp, s.days, every, share=share, late=_late(late, hp)
    )
    _patch_future_exposures(
        w_churn,
        visit_rate,
        hazard,
        paths.hazard,
        paths.rate,
        exposures,
        s.churn_horizon,
        every,
        vi_mult,
        np.ones_like(vi_mult),
    )
    _patch_future_exposures(
        w_purchase,
        purchase_rate,
        hazard,
        paths.hazard,
        purchase_plain,
        exposures,
        hp,
        every,
        share,
        plain,
        late,
        plain_late,
    )
    days = np.arange(0, s.days, every)
    valid = days[None, :] > traits.signup_day[:, None]
    rows, cols = np.nonzero(valid)
    day = days[cols]
    state = _state(last[rows], _fade_end(last, traits)[rows], day)
    alive = state == 0
    no_churn = np.choose(state, [w[rows, cols] for w in w_churn])
    no_purchase = np.choose(state, [w[rows, cols] for w in w_purchase])
    if open_carts is not None:
        no_purchase = no_purchase * open_carts[0][rows, day]
        no_churn = no_churn * open_carts[1][rows, day]
    return {
        "customer": rows.astype(np.int32),
        "day": day.astype(np.int32),
        "p_churn": no_churn.astype(np.float32),
        "p_purchase": 1.0 - no_purchase.astype(np.float32),
        "alive": alive,
        "fading": state == 1,
        "at_risk": alive & (hazard[rows, day] > 0.01),
        "session_rate": paths.trend_rate[rows, day].astype(np.float32),
        "adoption": paths.adoption[rows, day].astype(np.float32),
        "hazard": hazard[rows, day].astype(np.float32),
    }


def _events(
    rng: np.random.Generator,
    s: BlockSettings,
    traits: lat.Traits,
    paths: lat.Paths,
    effects: _Effects,
    sessions: np.ndarray,
    phase: np.ndarray,
    signed: np.ndarray,
    exposures: dict[str, np.ndarray],
    intent_rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], int, int, intent.Abandonments | None]:
    """Expand daily counts into event rows (columns of codes; strings come later)."""
    blocks: list[dict[str, np.ndarray]] = []

    def add(customer: np.ndarray, ts: np.ndarray, kind: str, **cols: np.ndarray) -> None:
        block = {"customer": customer, "ts": ts, "type": np.full(customer.size, _CODE[kind])}
        block.update(cols)
        blocks.append(block)

    # Sessions and their funnel.
    rows, days = np.nonzero(sessions)
    counts = sessions[rows, days]
    s_cust = np.repeat(rows, counts)
    s_day = np.repeat(days, counts)
    n_s = s_cust.size
    hour = rng.choice(24, n_s, p=lat.HOUR_PROBS)
    s_ts = (s_day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, n_s)) * 1_000_000
    p_buy = (paths.conversion * effects.conversion)[s_cust, s_day]
    converts = rng.random(n_s) < p_buy
    items = np.where(converts, 1 + rng.poisson(traits.items_mean[s_cust]), 0)
    app = traits.app_user[s_cust]
    channel = app.astype(np.int64)
    device = np.where(app, np.where(traits.device[s_cust] == 2, 2, 1), traits.device[s_cust])
    s_id = np.arange(n_s)

    def session_block(kind: str, count: np.ndarray, lo: int, hi: int) -> np.ndarray:
        idx = np.repeat(s_id, count)
        ts = s_ts[idx] + rng.integers(lo, hi, idx.size) * 1_000_000
        extra: dict[str, np.ndarray] = {
            "session": idx,
            "channel": channel[idx],
            "device": device[idx],
        }
        if kind in ("product_view", "add_to_cart", "remove_from_cart", "purchase"):
            fav = rng.random(idx.size) < 0.6
            cat = np.where(fav, traits.favorite_category[s_cust[idx]], rng.integers(0, 8, idx.size))
            extra["category"] = cat
            extra["product"] = cat * PRODUCTS_PER_CATEGORY + rng.integers(
                0, PRODUCTS_PER_CATEGORY, idx.size
            )
        add(s_cust[idx], ts, kind, **extra)
        return idx

    session_block("session_start", np.ones(n_s, dtype=np.int64), 0, 1)
    # Few events per session: many short sessions make an absence show sooner.
    session_block("page_view", rng.poisson(0.6, n_s), 5, 900)
    # Browsing and abandoned carts grow with the propensity to buy: it shows before orders do.
    session_block("product_view", rng.poisson(0.2 + 4.0 * p_buy + 0.8 * converts), 10, 900)
    session_block("search", (rng.random(n_s) < 0.2).astype(np.int64), 5, 600)
    atc = np.where(converts, items, rng.random(n_s) < intent.abandon_probability(p_buy))
    atc = atc.astype(np.int64)
    cart = session_block("add_to_cart", atc, *intent.CART_ADD_SECONDS)
    cart_ts, cart_product = blocks[-1]["ts"], blocks[-1]["product"]
    session_block(
        "remove_from_cart", ((atc > 0) & (rng.random(n_s) < 0.1)).astype(int), 1_200, 1_500
    )
    checkout = converts | ((atc > 0) & (rng.random(n_s) < 0.06))
    session_block("checkout_start", checkout.astype(np.int64), 1_500, 1_700)
    line = session_block("purchase", items, 1_800, 1_860)
    purchase = blocks[-1]
    order_rank = np.cumsum(converts) - 1
    purchase["order"] = order_rank[line]
    _price_lines(rng, s, traits, purchase, s_cust[line])
    abandoned = None
    n_orders = int(converts.sum())
    if s.cart_returns:
        end_us = s.days * 86_400 * 1_000_000
        boost = effects.returns[s_cust, s_day]
        abandoned = intent.abandonments(
            intent_rng, cart, cart_ts, s_cust, p_buy, converts, end_us, boost
        )
        n_orders += _return_visits(
            intent_rng, s, traits, abandoned, cart, cart_product, n_s, n_orders, add
        )
        n_s += int(abandoned.returned.sum())
    # Feature use: sessions touch features among the ones adopted so far.
    adopted = np.floor(paths.adoption[s_cust, s_day] + 0.5).astype(np.int64)
    fu = session_block("feature_use", rng.poisson(0.25 * np.sqrt(adopted)), 30, 1_500)
    keys = rng.random((traits.signup_day.size, len(lat.FEATURES))) ** (
        1.0 / np.linspace(3.0, 0.5, len(lat.FEATURES))
    )
    order = np.argsort(-keys, axis=1)
    pick = np.floor(rng.random(fu.size) * np.maximum(adopted[fu], 1)).astype(np.int64)
    blocks[-1]["feature"] = order[s_cust[fu], pick]

    # Support tickets and emails happen outside sessions.
    n = traits.signup_day.size
    # Fading customers still file tickets (at half the rate): friction shows before the exit.
    tickets = rng.poisson((0.003 + 0.05 * traits.friction)[:, None], (n, s.days))
    halved = rng.binomial(tickets, 0.5)
    tickets = np.choose(phase, [tickets, halved, 0]) * signed
    t_rows, t_days = np.nonzero(tickets)
    t_count = tickets[t_rows, t_days]
    t_cust, t_day = np.repeat(t_rows, t_count), np.repeat(t_days, t_count)
    t_ts = (t_day * 86_400 + rng.integers(8 * 3_600, 20 * 3_600, t_cust.size)) * 1_000_000
    add(
        t_cust,
        t_ts,
        "support_ticket",
        channel=np.full(t_cust.size, 3),
        device=traits.device[t_cust],
    )

    engaged = np.log(paths.trend_rate[:, : s.days]) - np.log(lat.REF_RATE)
    p_open = (1.0 / 7.0) / (1.0 + np.exp(-(traits.email_affinity[:, None] + 0.8 * engaged)))
    p_open = p_open * np.array([1.0, 0.5, 0.25])[phase] * signed
    e_rows, e_days = np.nonzero(rng.random((n, s.days)) < p_open)
    e_ts = (e_days * 86_400 + rng.integers(6 * 3_600, 22 * 3_600, e_rows.size)) * 1_000_000
    monday = e_days - (e_days + s.start.weekday()) % 7
    newsletter = s.length + 6 + monday
    e_dev = np.where(traits.app_user[e_rows], 1, traits.device[e_rows])
    add(
        e_rows,
        e_ts,
        "email_open",
        channel=np.full(e_rows.size, 2),
        device=e_dev,
        campaign=newsletter,
    )
    click = rng.random(e_rows.size) < 0.3
    c_ts = e_ts[click] + rng.integers(10, 300, int(click.sum())) * 1_000_000
    add(
        e_rows[click],
        c_ts,
        "email_click",
        channel=np.full(int(click.sum()), 2),
        device=e_dev[click],
        campaign=newsletter[click],
    )

    x_ts = (exposures["day"] * 86_400 + exposures["second"]) * 1_000_000
    add(
        exposures["customer"],
        x_ts,
        "campaign_exposure",
        channel=np.full(x_ts.size, 2),
        device=traits.device[exposures["customer"]],
        campaign=exposures["day"],
        action=exposures["action"],
        propensity=exposures["propensity"],
        exposure=np.arange(x_ts.size),
    )
    return _concat(blocks), n_s, n_orders, abandoned


def _price_lines(
    rng: np.random.Generator,
    s: BlockSettings,
    traits: lat.Traits,
    lines: dict[str, np.ndarray],
    customer: np.ndarray,
) -> None:
    """Unit price and quantity of purchase lines, from the product and the buyer."""
    level = np.exp(traits.value_level - 0.4 * traits.price_sensitivity)[customer]
    noise = np.exp(rng.normal(0.0, 0.1, customer.size))
    lines["price"] = np.round(s.product_prices[lines["product"]] * level * noise, 2)
    lines["quantity"] = (1 + rng.poisson(0.25, customer.size)).astype(np.float64)


def _return_visits(
    rng: np.random.Generator,
    s: BlockSettings,
    traits: lat.Traits,
    abandoned: intent.Abandonments,
    cart_session: np.ndarray,
    cart_product: np.ndarray,
    first_session: int,
    first_order: int,
    add: Callable[..., None],
) -> int:
    """Events of the return visits: a session that views and buys the abandoned cart.

    Records each visit's first purchase time in ``abandoned.bought_at``.
    """
    back = np.flatnonzero(abandoned.returned)
    customer, at = abandoned.customer[back], abandoned.returned_at[back]
    session = first_session + np.arange(back.size)
    channel = traits.app_user[customer].astype(np.int64)
    device = np.where(
        channel == 1, np.where(traits.device[customer] == 2, 2, 1), traits.device[customer]
    )
    add(customer, at, "session_start", session=session, channel=channel, device=device)
    # Every cart line of the abandoned session is viewed again, then bought.
    rank = np.full(first_session, -1)
    rank[abandoned.session[back]] = np.arange(back.size)
    line_of = rank[cart_session]
    lines = np.flatnonzero(line_of >= 0)
    visit = line_of[lines]
    product = cart_product[lines]
    common = {
        "session": session[visit],
        "channel": channel[visit],
        "device": device[visit],
        "product": product,
        "category": product // PRODUCTS_PER_CATEGORY,
    }
    add(
        customer[visit],
        at[visit] + rng.integers(10, 300, visit.size) * 1_000_000,
        "product_view",
        **common,
    )
    add(
        customer,
        at + 400 * 1_000_000,
        "checkout_start",
        session=session,
        channel=channel,
        device=device,
    )
    bought = {**common, "order": first_order + visit}
    _price_lines(rng, s, traits, bought, customer[visit])
    bought_at = at[visit] + rng.integers(*intent.RETURN_BUY_SECONDS, visit.size) * 1_000_000
    add(customer[visit], bought_at, "purchase", **bought)
    first_buy = np.full(back.size, np.iinfo(np.int64).max)
    np.minimum.at(first_buy, visit, bought_at)
    abandoned.bought_at[back] = first_buy
    return int(back.size)


def _concat(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    floats = {"price", "quantity", "propensity"}
    wide = {"ts"}
    out: dict[str, np.ndarray] = {}
    for col in _COLUMNS:
        dtype = np.float64 if col in floats else np.int64 if col in wide else np.int32
        parts = []
        for b in blocks:
            size = b["customer"].size
            if col in b:
                parts.append(np.asarray(b[col]).astype(dtype, copy=False))
            else:
                parts.append(np.full(size, np.nan if col in floats else -1, dtype=dtype))
        out[col] = np.concatenate(parts)
    # One int64 key (customer, time): a single argsort instead of a lexsort.
    span = int(out["ts"].max(initial=0)) + 1
    order = np.argsort(out["customer"].astype(np.int64) * span + out["ts"])
    return {k: v[order] for k, v in out.items()}


def _open_carts_in_exposures(
    exposures: dict[str, np.ndarray], open_carts: tuple[np.ndarray, np.ndarray]
) -> None:
    """Every action's truth of each exposure, with the carts open at its midnight."""
    no_purchase, no_visit = (f[exposures["customer"], exposures["day"]] for f in open_carts)
    for name in lat.ACTIONS:
        churn, purchase = exposures[f"p_churn_{name}"], exposures[f"p_purchase_{name}"]
        exposures[f"p_churn_{name}"] = (churn * no_visit).astype(churn.dtype)
        exposures[f"p_purchase_{name}"] = (1.0 - (1.0 - purchase) * no_purchase).astype(
            purchase.dtype
        )


def simulate_block(rng: np.random.Generator, s: BlockSettings, n: int) -> BlockResult:
    """Simulate ``n`` customers end to end."""
    # Spawned before any draw and never drawn from otherwise: intent leaves the rest unchanged.
    intent_rng = rng.spawn(1)[0]
    traits = lat.draw_traits(rng, n, s.days, s.initial_share, s.history_days)
    paths = lat.build_paths(traits, s.start, s.length, s.hazard_base)
    potential = rng.poisson(paths.rate[:, : s.days])
    # Every new customer visits on the day they sign up.
    new = np.flatnonzero((traits.signup_day >= 0) & (traits.signup_day < s.days))
    potential[new, traits.signup_day[new]] = np.maximum(potential[new, traits.signup_day[new]], 1)
    # Thinning Poisson(rate) keeps Poisson(FADE * rate) sessions for fading days.
    fading = rng.binomial(potential, lat.FADE)
    residual = rng.poisson(lat.RETURN_RATE, potential.shape)
    effects, last, exposures = _run_campaigns(rng, s, traits, paths, potential, fading, residual)
    k = np.arange(s.days)[None, :]
    signed = k >= np.maximum(traits.signup_day, 0)[:, None]
    phase = _state(last[:, None], _fade_end(last, traits)[:, None], k)
    sessions = np.choose(phase, [potential, fading, residual])
    # Campaign visit effects: thin sessions where they fall, add Poisson ones where they rise.
    visits = effects.visits[:, : s.days]
    touched = np.flatnonzero((visits != 1.0).any(axis=1))
    if touched.size:
        m = visits[touched]
        sub = rng.binomial(sessions[touched], np.minimum(m, 1.0))
        base = np.choose(
            phase[touched],
            [
                paths.rate[touched, : s.days],
                lat.FADE * paths.rate[touched, : s.days],
                lat.RETURN_RATE,
            ],
        )
        sessions[touched] = sub + rng.poisson(np.maximum(m - 1.0, 0.0) * base)
    sessions = sessions * signed
    events, n_sessions, n_orders, abandoned = _events(
        rng, s, traits, paths, effects, sessions, phase, signed, exposures, intent_rng
    )
    # Carts still open at a midnight weigh on the windows that start there, whatever the action.
    open_carts = None
    if abandoned is not None:
        horizons = (s.purchase_horizon, s.churn_horizon)
        open_carts = intent.open_cart_factors(abandoned, n, s.days, horizons)
        _open_carts_in_exposures(exposures, open_carts)
    daily = _daily_truth(s, traits, paths, effects, last, exposures, open_carts)
    return BlockResult(traits, events, daily, exposures, n_sessions, n_orders, abandoned)
