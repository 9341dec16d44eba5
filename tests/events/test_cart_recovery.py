"""cart_recovery: a true effect on abandoned carts only, and outcome truth that counts returns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from propensity.events._sim_latent import RECOVERY_BOOST
from propensity.events.simulator import ACTIONS, Simulation, SimulationConfig, simulate

CONFIG = SimulationConfig(customers=8_000, days=120, seed=21, cart_returns=True, campaign_share=0.3)
START = pd.Timestamp(CONFIG.start, tz="UTC")
DAY = pd.Timedelta(days=1)
ARMS = ["cart_recovery", "control"]


@pytest.fixture(scope="module")
def sim():
    return simulate(CONFIG)


@pytest.fixture(scope="module")
def exposures(sim) -> pd.DataFrame:
    """cart_recovery and control exposures whose purchase window closed, with outcomes."""
    x = sim.truth.exposures
    x = x[x["action"].isin(ARMS) & (x["exposure_timestamp"] < START + (CONFIG.days - 15) * DAY)]
    x = x.reset_index(drop=True).assign(midnight=lambda f: f["exposure_timestamp"].dt.floor("D"))
    events = sim.events.select(["customer_id", "event_timestamp", "event_type"]).to_pandas()
    bought = _in_window(x, events[events["event_type"] == "purchase"], "event_timestamp")
    carts = _in_window(x, sim.truth.cart_abandonments, "abandoned_at")
    return x.assign(
        bought=x["event_id"].isin(bought["event_id"]),
        abandons=x["event_id"].isin(carts["event_id"]),
        weight=1.0 / x["propensity"],
    )


def _in_window(x: pd.DataFrame, rows: pd.DataFrame, at: str, days: int = 14) -> pd.DataFrame:
    """``rows`` of each exposure's customer in [its midnight, + days), with its event_id."""
    merged = x[["event_id", "customer_id", "midnight"]].merge(
        rows.drop(columns="event_id", errors="ignore"), on="customer_id"
    )
    return merged[
        (merged[at] >= merged["midnight"]) & (merged[at] < merged["midnight"] + days * DAY)
    ]


def _weighted_rate(frame: pd.DataFrame, arm: str, column: str) -> tuple[float, float]:
    """Inverse-propensity weighted rate of ``column`` in one arm, with its standard error."""
    rows = frame[frame["action"] == arm]
    y, w = rows[column].to_numpy(float), rows["weight"].to_numpy()
    rate = float(np.average(y, weights=w))
    return rate, float(np.sqrt((w**2 * (y - rate) ** 2).sum()) / w.sum())


def test_carts_abandoned_under_cart_recovery_come_back_as_configured(sim, exposures):
    carts = _in_window(exposures, sim.truth.cart_abandonments, "abandoned_at")
    carts = carts.merge(exposures[["event_id", "action", "weight"]], on="event_id")
    carts = carts.assign(back=carts["returned_at"].notna())
    (treated, se_t), (control, se_c) = (_weighted_rate(carts, a, "back") for a in ARMS)
    assert (carts["action"] == "cart_recovery").sum() > 800
    # The realized ratio of return rates is the configured boost (delta-method interval).
    ratio = treated / control
    assert abs(ratio - RECOVERY_BOOST) < 4 * ratio * np.hypot(se_t / treated, se_c / control)
    # The truth of each cart carries the boost too.
    q = carts.groupby("action")["p_return"].mean()
    assert q["cart_recovery"] > 1.8 * q["control"]


def test_only_customers_who_abandon_carts_buy_more(exposures):
    abandon = exposures[exposures["abandons"]]
    others = exposures[~exposures["abandons"]]
    (treated, se_t), (control, se_c) = (_weighted_rate(abandon, a, "bought") for a in ARMS)
    assert treated - control > 3 * np.hypot(se_t, se_c), (treated, control)
    assert treated - control > 0.05
    (treated, se_t), (control, se_c) = (_weighted_rate(others, a, "bought") for a in ARMS)
    assert abs(treated - control) < 3 * np.hypot(se_t, se_c), (treated, control)


def test_true_uplift_matches_outcomes_and_grows_with_abandonment(sim, exposures):
    uplift = exposures["p_purchase_cart_recovery"] - exposures["p_purchase_control"]
    (treated, se_t), (control, se_c) = (_weighted_rate(exposures, a, "bought") for a in ARMS)
    true = np.average(uplift, weights=exposures["weight"])
    assert abs((treated - control) - true) < 4 * np.hypot(se_t, se_c), (treated - control, true)
    assert (uplift >= 0).all() and true > 0.03
    # Carts abandoned in the 30 days before the exposure (what batch features see) reveal it.
    before = exposures.assign(midnight=exposures["midnight"] - 30 * DAY)
    prior = _in_window(before, sim.truth.cart_abandonments, "abandoned_at", days=30)
    counts = prior.groupby("event_id").size().reindex(exposures["event_id"], fill_value=0)
    assert uplift[counts.to_numpy() >= 3].mean() > 1.5 * uplift[counts.to_numpy() == 0].mean()
    # It acts on purchases only: no visit, so the churn truth is the control's.
    assert (exposures["p_churn_cart_recovery"] == exposures["p_churn_control"]).all()


def test_without_intent_cart_recovery_has_no_effect():
    x = simulate(CONFIG.model_copy(update={"customers": 1_000, "cart_returns": False})).truth
    exposed = x.exposures
    assert (exposed["action"] == "cart_recovery").any()
    for outcome in ("purchase", "churn"):
        pd.testing.assert_series_equal(
            exposed[f"p_{outcome}_cart_recovery"],
            exposed[f"p_{outcome}_control"],
            check_names=False,
        )


def _window_hits(frame: pd.DataFrame, events: pd.DataFrame, horizon: int) -> np.ndarray:
    """Per row (customer_id, day): any of ``events`` in days [day, day + horizon)."""
    ids = {c: i for i, c in enumerate(pd.unique(frame["customer_id"]))}
    counts = np.zeros((len(ids), CONFIG.days + horizon + 1))
    known = events[events["customer_id"].isin(ids)]
    np.add.at(counts, (known["customer_id"].map(ids).to_numpy(), known["day"].to_numpy()), 1)
    running = np.concatenate([np.zeros((len(ids), 1)), counts.cumsum(axis=1)], axis=1)
    row, day = frame["customer_id"].map(ids).to_numpy(), frame["day"].to_numpy()
    return running[row, day + horizon] - running[row, day] > 0


def _labelled(config: SimulationConfig) -> tuple[Simulation, pd.DataFrame, pd.DataFrame]:
    """A simulation, its session starts and purchases with their day."""
    sim = simulate(config)
    events = sim.events.select(["customer_id", "event_timestamp", "event_type"]).to_pandas()
    events = events[events["event_type"].isin(["purchase", "session_start"])]
    events = events.assign(day=(events["event_timestamp"] - START).dt.days)
    return sim, events, events[events["event_type"] == "purchase"]


@pytest.mark.parametrize("horizons", [(14, 30), (1, 2)], ids=["14d-30d", "1d-2d"])
def test_truth_counts_cart_returns(horizons):
    """Daily and exposure truth agree with realized labels once carts come back to buy.

    One-day windows stress what a return adds beyond a session's own purchase:
    the daily purchase check there misses by about 5 standard errors if the truth
    ignores returns that cross the window's end, or carts still open at its midnight.
    """
    hp, hc = horizons
    config = CONFIG.model_copy(update={"purchase_horizon_days": hp, "churn_horizon_days": hc})
    # The daily truth assumes no later campaign: check it where there is none.
    quiet, events, bought = _labelled(config.model_copy(update={"campaign_share": 0.0}))
    daily = quiet.truth.customer_daily
    daily = daily.assign(
        customer_id=daily["customer_id"].astype(str),
        day=(daily["date"] - START.tz_localize(None)).dt.days,
    )
    # Midnights whose windows do not overlap: a customer's rows are then uncorrelated.
    at = {
        o: daily[(daily["day"] % h == 0) & (daily["day"] < config.days - h)]
        for o, h in (("purchase", hp), ("churn", hc))
    }
    checks = [
        ("daily purchase", at["purchase"]["p_purchase"], _window_hits(at["purchase"], bought, hp)),
        ("daily churn", at["churn"]["p_churn"], ~_window_hits(at["churn"], events, hc)),
    ]
    sim, events, bought = _labelled(config)
    x = sim.truth.exposures.assign(day=lambda f: (f["exposure_timestamp"] - START).dt.days)
    x = x[x["day"] < config.days - hc].reset_index(drop=True)
    for action in ACTIONS:
        mine = x[x["action"] == action]
        checks.append((action, mine[f"p_purchase_{action}"], _window_hits(mine, bought, hp)))
        checks.append((action, mine[f"p_churn_{action}"], ~_window_hits(mine, events, hc)))
    for name, p, y in checks:
        p = p.to_numpy(float)
        z = (y.sum() - p.sum()) / np.sqrt((p * (1 - p)).sum())
        assert abs(z) < 4, (name, y.mean(), p.mean(), z)
