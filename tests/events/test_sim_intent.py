"""In-session intent: abandoned carts come back to buy, with their truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from propensity.events._sim_intent import RETURN_MEAN_HOURS, p_bought_by
from propensity.events.simulator import (
    SimulationConfig,
    load_truth,
    simulate,
    simulate_to,
    write_simulation,
)

CONFIG = SimulationConfig(customers=3_000, days=60, seed=11, cart_returns=True)
_KEY = ["customer_id", "event_timestamp", "event_type", "product_id", "session_id"]


@pytest.fixture(scope="module")
def runs():
    plain = simulate(CONFIG.model_copy(update={"cart_returns": False}))
    return plain, simulate(CONFIG)


def _frame(sim) -> pd.DataFrame:
    return sim.events.select(_KEY + ["order_id", "price"]).to_pandas()


def test_intent_only_adds_return_visits(runs):
    plain, with_intent = runs
    before, after = _frame(plain), _frame(with_intent)
    merged = before.merge(after, on=_KEY, how="left", indicator=True)
    assert (merged["_merge"] == "both").all(), "turning intent on changed another event"
    added = after.merge(before, on=_KEY, how="left", indicator=True)
    added = added[added["_merge"] == "left_only"]
    assert set(added["event_type"]) == {
        "session_start",
        "product_view",
        "checkout_start",
        "purchase",
    }
    truth = with_intent.truth.cart_abandonments
    assert (added["event_type"] == "session_start").sum() == truth["returned_at"].notna().sum()
    assert plain.truth.cart_abandonments.empty


def test_a_return_buys_what_its_abandoned_session_carted(runs):
    _, sim = runs
    events = _frame(sim)
    truth = sim.truth.cart_abandonments
    back = truth[truth["returned_at"].notna()]
    assert len(back) > 100
    assert (back["returned_at"] > back["abandoned_at"]).all()
    carts = events[events["event_type"] == "add_to_cart"]
    carted = carts.groupby("session_id")["product_id"].apply(frozenset)
    starts = events[events["event_type"] == "session_start"].set_index(
        ["customer_id", "event_timestamp"]
    )["session_id"]
    visit = starts.loc[list(zip(back["customer_id"], back["returned_at"], strict=True))].to_numpy()
    lines = events[events["event_type"] == "purchase"]
    bought = lines.groupby("session_id")["product_id"].apply(frozenset)
    assert (bought.loc[visit].to_numpy() == carted.loc[back["session_id"]].to_numpy()).all()
    # Orders and sessions of return visits are new ids, never reused.
    assert lines.groupby("order_id")["session_id"].nunique().max() == 1
    assert starts.index.is_unique and starts.is_unique
    # An abandoned session has carts and no purchase.
    assert not back["session_id"].isin(lines["session_id"]).any()


def test_truth_matches_the_observed_return_rate(runs):
    """Returns within 24 hours agree with the true probability (binomial interval)."""
    _, sim = runs
    truth = sim.truth.cart_abandonments
    end = pd.Timestamp(CONFIG.start, tz="UTC") + pd.Timedelta(days=CONFIG.days)
    day = pd.Timedelta(hours=24)
    closed = truth[truth["abandoned_at"] + day < end]
    within = (closed["returned_at"] - closed["abandoned_at"]) <= day
    p = p_bought_by(
        closed["p_return"].to_numpy(),
        np.zeros(len(closed), dtype=np.int64),
        np.full(len(closed), int(day / pd.Timedelta(microseconds=1))),
    )
    expected, sd = p.sum(), np.sqrt((p * (1 - p)).sum())
    assert abs(within.sum() - expected) < 4 * sd
    # The probability carries signal: the top half by truth is clearly likelier to return,
    # and each half returns as often as its truth says.
    high = (closed["p_return"] > closed["p_return"].median()).to_numpy()
    assert p[high].mean() > 1.2 * p[~high].mean()
    for half in (high, ~high):
        spread = np.sqrt((p[half] * (1 - p[half])).sum())
        assert abs(within.to_numpy()[half].sum() - p[half].sum()) < 4 * spread
    # The delay law: mean observed delay of returns near the documented mean.
    delay = (
        closed.loc[within, "returned_at"] - closed.loc[within, "abandoned_at"]
    ).dt.total_seconds()
    assert 0.7 * RETURN_MEAN_HOURS < delay.mean() / 3600 < 1.1 * RETURN_MEAN_HOURS


def test_abandonment_truth_round_trips_on_disk(runs, tmp_path):
    _, sim = runs
    write_simulation(sim, tmp_path)
    loaded = load_truth(tmp_path).cart_abandonments
    pd.testing.assert_frame_equal(loaded, sim.truth.cart_abandonments)


def test_streamed_simulation_writes_the_same_abandonments(runs, tmp_path):
    _, sim = runs
    simulate_to(CONFIG, tmp_path)
    pd.testing.assert_frame_equal(
        load_truth(tmp_path).cart_abandonments, sim.truth.cart_abandonments
    )
