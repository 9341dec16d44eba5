"""The simulator: determinism, the canonical schema, and truth that matches outcomes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from propensity.events.schema import ARROW_SCHEMA, EVENT_TYPES
from propensity.events.simulator import (
    ACTIONS,
    SimulationConfig,
    load_truth,
    simulate,
    simulate_to,
    write_simulation,
)

CONFIG = SimulationConfig(customers=2_000, days=120, seed=7)
START = pd.Timestamp("2026-01-01", tz="UTC")


@pytest.fixture(scope="module")
def sim():
    return simulate(CONFIG)


@pytest.fixture(scope="module")
def frames(sim):
    events = sim.events.select(["customer_id", "event_timestamp", "event_type"]).to_pandas()
    events["day"] = (events["event_timestamp"] - START).dt.days
    daily = sim.truth.customer_daily.copy()
    daily["day"] = (daily["date"] - START.tz_localize(None)).dt.days
    daily["customer_id"] = daily["customer_id"].astype(str)
    return events, daily


def _labels(events: pd.DataFrame, daily: pd.DataFrame, cutoff: int) -> tuple[pd.DataFrame, ...]:
    """Realized churn and purchase labels at a cutoff, per the contract definitions."""
    active = events[events["event_type"].isin(["session_start", "purchase"])]
    bought = events[events["event_type"] == "purchase"]
    before = set(active.loc[active["day"].between(cutoff - 30, cutoff - 1), "customer_id"])
    after = set(active.loc[active["day"].between(cutoff, cutoff + 29), "customer_id"])
    buyers = set(bought.loc[bought["day"].between(cutoff, cutoff + 13), "customer_id"])
    first = events.groupby("customer_id")["day"].min()
    known = set(first[first < cutoff].index)
    truth = daily[daily["day"] == cutoff].set_index("customer_id")
    churn = truth.loc[sorted(before), ["p_churn"]].assign(
        y=lambda f: [c not in after for c in f.index]
    )
    purchase = truth.loc[sorted(known), ["p_purchase"]].assign(
        y=lambda f: [c in buyers for c in f.index]
    )
    return churn, purchase


def test_same_seed_same_tables_and_other_seed_differs(sim):
    again = simulate(CONFIG)
    assert again.events.equals(sim.events)
    pd.testing.assert_frame_equal(again.truth.customer_daily, sim.truth.customer_daily)
    pd.testing.assert_frame_equal(again.truth.exposures, sim.truth.exposures)
    other = simulate(CONFIG.model_copy(update={"seed": 8}))
    assert not other.events.equals(sim.events)


def test_events_follow_the_canonical_schema(sim):
    events = sim.events
    assert events.schema == ARROW_SCHEMA
    assert pc.count_distinct(events["event_id"]).as_py() == events.num_rows
    assert set(pc.unique(events["event_type"]).to_pylist()) == set(EVENT_TYPES)
    purchases = events.filter(pc.equal(events["event_type"], "purchase"))
    assert purchases["order_id"].null_count == 0 and purchases["product_id"].null_count == 0
    assert pc.min(purchases["price"]).as_py() >= 0 and pc.min(purchases["quantity"]).as_py() >= 1
    sessions = events.filter(pc.equal(events["event_type"], "page_view"))
    assert sessions["session_id"].null_count == 0
    exposures = events.filter(pc.equal(events["event_type"], "campaign_exposure"))
    assert set(pc.unique(exposures["action"]).to_pylist()) == set(ACTIONS)
    assert pc.min(exposures["propensity"]).as_py() >= 0.05
    uses = events.filter(pc.equal(events["event_type"], "feature_use"))
    assert uses["feature_name"].null_count == 0


def test_no_event_before_signup(sim, frames):
    events, _ = frames
    signup = sim.truth.customers.set_index("customer_id")["signup_date"]
    first = events.groupby("customer_id")["event_timestamp"].min().dt.date
    assert (first >= signup.loc[first.index]).all()
    daily = sim.truth.customer_daily
    joined = signup.loc[daily["customer_id"].astype(str)].to_numpy()
    assert (daily["date"].dt.date.to_numpy() > joined).all()


def test_truth_is_calibrated_against_realized_labels(frames):
    events, daily = frames
    parts = [_labels(events, daily, cutoff) for cutoff in (40, 60, 80)]
    for column, index in (("p_churn", 0), ("p_purchase", 1)):
        frame = pd.concat([p[index] for p in parts])
        decile = pd.qcut(frame[column].rank(method="first"), 10, labels=False)
        table = frame.groupby(decile).agg(p=(column, "mean"), y=("y", "mean"), n=("y", "size"))
        # Binomial noise of a decile is at most ~0.03 here; the margin leaves room for it.
        assert np.abs(table["p"] - table["y"]).max() < 0.06, table
        assert table["y"].iloc[-1] > table["y"].iloc[0] + 0.4, table
        assert abs(frame[column].mean() - frame["y"].mean()) < 0.02


def test_base_rates_are_in_the_intended_range(frames):
    events, daily = frames
    churn, purchase = _labels(events, daily, 60)
    assert 0.08 < churn["y"].mean() < 0.3
    assert 0.1 < purchase["y"].mean() < 0.4


def test_randomized_exposures_match_true_uplift(sim, frames):
    events, _ = frames
    exposures = sim.truth.exposures
    # Only exposures whose 14-day window closes inside the simulated period.
    end = START + pd.Timedelta(days=CONFIG.days - 14)
    exposures = exposures[exposures["exposure_timestamp"] < end]
    bought = events[events["event_type"] == "purchase"][["customer_id", "event_timestamp"]]
    merged = exposures[["event_id", "customer_id", "exposure_timestamp"]].merge(
        bought, on="customer_id"
    )
    lag = merged["event_timestamp"] - merged["exposure_timestamp"].dt.floor("D")
    hit = merged[(lag >= pd.Timedelta(0)) & (lag < pd.Timedelta(days=14))]["event_id"].unique()
    exposures = exposures.assign(y=exposures["event_id"].isin(hit))
    # Inverse-propensity weights undo the covariate-dependent assignment.
    weights = 1.0 / exposures["propensity"]
    for action in ACTIONS:
        mine = exposures["action"] == action
        y, w = exposures.loc[mine, "y"], weights[mine]
        realized = np.average(y, weights=w)
        # Standard error of the weighted mean: weights of 20 (rare arms) make it ~0.05.
        se = np.sqrt((w**2 * (y - realized) ** 2).sum()) / w.sum()
        true_rate = np.average(exposures[f"p_purchase_{action}"], weights=weights)
        assert abs(realized - true_rate) < 4 * se, (action, realized, true_rate, se)
    uplift = exposures["p_purchase_discount"] - exposures["p_purchase_control"]
    assert uplift.mean() > 0.02
    # The best action differs by customer, so a personalized policy can beat any single action.
    best = np.argmax(exposures[[f"p_purchase_{a}" for a in ACTIONS]].to_numpy(), axis=1)
    assert len(np.unique(best)) >= 3


def test_onboarding_helps_only_new_customers(sim):
    # The whole audience: alive customers seldom churn within 30 days (disengagement
    # fades in over days), so the churn effects show mostly on fading and dormant ones.
    x = sim.truth.exposures
    effect = x["p_churn_onboarding_email"] - x["p_churn_control"]
    assert effect[x["tenure_days"] < 60].mean() < -0.01
    assert effect[x["tenure_days"] >= 60].mean() > 0


def test_adoption_lowers_and_friction_raises_churn(sim):
    daily = sim.truth.customer_daily
    alive = daily[daily["alive"]]
    low, high = alive["adoption"] < 1, alive["adoption"] > 6
    assert alive.loc[low, "hazard"].mean() > alive.loc[high, "hazard"].mean()
    customers = sim.truth.customers.set_index("customer_id")
    friction = customers.loc[alive["customer_id"].astype(str), "friction"].to_numpy()
    assert alive["p_churn"][friction > 1].mean() > alive["p_churn"][friction < 0.2].mean()
    tickets = sim.events.filter(pc.equal(sim.events["event_type"], "support_ticket"))
    per_customer = pd.Series(tickets["customer_id"].to_pylist()).value_counts()
    with_tickets = customers["friction"].loc[per_customer.index[per_customer >= 3]].mean()
    assert with_tickets > customers["friction"].mean()


def test_write_and_load_round_trip(sim, tmp_path):
    write_simulation(sim, tmp_path)
    assert sorted(p.name for p in (tmp_path / "events").glob("part-*.parquet"))
    truth = load_truth(tmp_path)
    assert len(truth.customer_daily) == len(sim.truth.customer_daily)
    assert truth.customer_daily["p_churn"].dtype == np.float32
    cols = {f"p_{o}_{a}" for o in ("purchase", "churn") for a in ACTIONS}
    assert cols <= set(truth.exposures.columns)
    assert (tmp_path / "simulation.json").exists()


def test_truth_every_days_thins_the_daily_table():
    small = SimulationConfig(customers=300, days=40, seed=3)
    full = simulate(small).truth.customer_daily
    thin = simulate(small.model_copy(update={"truth_every_days": 7})).truth.customer_daily
    assert set(thin["date"].dt.day_of_year - 1) <= set(range(0, 40, 7))
    merged = thin.merge(full, on=["customer_id", "date"], suffixes=("", "_full"))
    assert len(merged) == len(thin)
    np.testing.assert_allclose(merged["p_churn"], merged["p_churn_full"], rtol=1e-5)


def test_simulate_to_streams_the_same_tables(tmp_path):
    small = SimulationConfig(customers=5_000, days=30, seed=5)  # two blocks
    write_simulation(simulate(small), tmp_path / "memory")
    meta = simulate_to(small, tmp_path / "stream")
    events = [
        pq.read_table(tmp_path / d / "events").sort_by("event_id") for d in ("memory", "stream")
    ]
    assert events[0].equals(events[1]) and meta["events"] == events[0].num_rows
    for name in ("customers", "customer_daily", "exposures"):
        mem, streamed = (
            pq.read_table(tmp_path / d / "truth" / f"{name}.parquet").to_pandas()
            for d in ("memory", "stream")
        )
        pd.testing.assert_frame_equal(mem, streamed, check_categorical=False)
    daily = pq.read_schema(tmp_path / "stream" / "truth" / "customer_daily.parquet")
    assert daily.field("date").type == pa.date32() and daily.field("p_churn").type == pa.float32()
    assert pa.types.is_dictionary(daily.field("customer_id").type)
