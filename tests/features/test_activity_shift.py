"""The activity_shift view (churn_v2): values against a direct pandas computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from features_testdata import events_table, late_customers, random_events

from propensity.features.definitions import SERVICES, features_of, service_views
from propensity.features.snapshots import compute_features, snapshot_times
from propensity.features.sql import feature_sql

T = pd.Timestamp("2024-05-01", tz="UTC")
DAY = pd.Timedelta(days=1)
SHIFT = ["session_rate_90d", "session_overdue", "session_drop_score"]


def _sessions(customer: str, times: list[pd.Timestamp]) -> list[tuple[object, ...]]:
    return [(customer, t, "session_start") for t in times]


HAND = events_table(
    # C1: first seen 121 days before T; a session every other day from T - 90 to T - 30
    # (31 sessions, 0.5 a day over the 62 baseline days), then one at T - 9.5 days only.
    [("C1", T - 121 * DAY, "page_view")]
    + _sessions("C1", [T - k * DAY for k in range(90, 29, -2)] + [T - 9.5 * DAY])
    # at T and later: never counted
    + _sessions("C1", [T, T + 3 * DAY])
    # C2: a newcomer (20 days), a session every day: too short a history for a baseline.
    + _sessions("C2", [T - k * DAY for k in range(20, 0, -1)])
    # C3: 100 days of email opens, never a session.
    + [("C3", T - k * DAY, "email_open") for k in range(100, 0, -10)]
    # C4: as C1, plus a session one second before T (it counts in the last day).
    + [("C4", T - 121 * DAY, "page_view")]
    + _sessions("C4", [T - k * DAY for k in range(90, 29, -2)] + [T - 9.5 * DAY])
    + _sessions("C4", [T - pd.Timedelta(seconds=1)])
)


def _drop(counts: dict[int, float], rate: float) -> float:
    """Largest Poisson log-likelihood ratio of a fall below ``rate``, written out."""
    best = 0.0
    for k, n in counts.items():
        mu = rate * k
        if n < mu:
            best = max(best, mu - n + (n * math.log(n / mu) if n > 0 else 0.0))
    return best


def _reference(events: pa.Table, t: pd.Timestamp) -> pd.DataFrame:
    """The three features at ``t`` from the raw events, one row per known customer."""
    ev = events.to_pandas()
    ev = ev[ev.event_timestamp < t]
    rows = {}
    for customer, own in ev.groupby("customer_id"):
        starts = own.event_timestamp[own.event_type == "session_start"]
        tenure = (t - own.event_timestamp.min()) / DAY
        observed = min(90.0, max(tenure, 1.0))
        count = {k: float((starts >= t - k * DAY).sum()) for k in (1, 3, 7, 14, 28, 90)}
        since = (t - starts.max()) / DAY if len(starts) else math.nan
        base_days = observed - 28
        rows[customer] = {
            "session_rate_90d": count[90] / observed,
            "session_overdue": since * count[90] / observed,
            "session_drop_score": _drop(
                {k: count[k] for k in (1, 3, 7, 14, 28)}, (count[90] - count[28]) / base_days
            )
            if base_days >= 14
            else math.nan,
        }
    return pd.DataFrame.from_dict(rows, orient="index")[SHIFT]


@pytest.fixture(scope="module")
def hand() -> pd.DataFrame:
    return compute_features(HAND, [T]).set_index("customer_id")


def test_values_of_a_customer_whose_visits_stopped(hand: pd.DataFrame) -> None:
    row = hand.loc["C1"]
    assert row["session_rate_90d"] == pytest.approx(32 / 90)
    assert row["session_overdue"] == pytest.approx(9.5 * 32 / 90)
    # baseline 0.5/day; the 28-day window (1 session for 14 expected) is the largest fall
    assert row["session_drop_score"] == pytest.approx(13 - math.log(14))


def test_missing_values_follow_the_documented_semantics(hand: pd.DataFrame) -> None:
    newcomer, silent = hand.loc["C2"], hand.loc["C3"]
    # a 20-day history: the rate is over those days; no baseline before the last 28 days
    assert newcomer["session_rate_90d"] == pytest.approx(1.0)
    assert newcomer["session_overdue"] == pytest.approx(1.0)
    assert math.isnan(newcomer["session_drop_score"])
    # never a session: a rate of 0, nothing to be overdue from, nothing that could fall
    assert silent["session_rate_90d"] == 0.0
    assert math.isnan(silent["session_overdue"])
    assert silent["session_drop_score"] == 0.0
    assert {f.name: f.missing for f in features_of("activity_shift")} == {
        "session_rate_90d": "zero",
        "session_overdue": "null",
        "session_drop_score": "null",
    }


def test_events_at_or_after_the_snapshot_never_count(hand: pd.DataFrame) -> None:
    # C4 is C1 plus a session one second before T; C1's sessions at T and after are ignored
    with_last = hand.loc["C4"]
    assert with_last["session_rate_90d"] == pytest.approx(33 / 90)
    assert with_last["session_overdue"] == pytest.approx(33 / 90 / 86400)
    counts = {1: 1.0, 3: 1.0, 7: 1.0, 14: 2.0, 28: 2.0}
    assert with_last["session_drop_score"] == pytest.approx(_drop(counts, 0.5))
    truncated = HAND.filter(pc.less(HAND["event_timestamp"], pa.scalar(T)))
    alone = compute_features(truncated, [T]).set_index("customer_id")
    pd.testing.assert_frame_equal(alone[SHIFT], hand[SHIFT])


@pytest.mark.parametrize("seed", [31, 32])
def test_values_match_a_direct_pandas_computation(seed: int) -> None:
    base = random_events(customers=15, events=2000, days=150, seed=seed)
    # newcomers, so some snapshots have no baseline, or a partial one
    late = late_customers(
        random_events(customers=5, events=300, days=60, seed=seed + 100),
        pd.Timestamp("2024-04-10", tz="UTC"),
    )
    events = pa.concat_tables([base, late])
    times = snapshot_times("2024-02-05", "2024-05-30", step_days=14)
    got = compute_features(events, times).set_index(["event_timestamp", "customer_id"])
    for t in times:
        want = _reference(events, t)
        have = got.loc[t][SHIFT].reindex(want.index)
        np.testing.assert_allclose(have.to_numpy(), want.to_numpy(), rtol=1e-9, atol=1e-9)
    # the samples reach each branch: no baseline yet, and both a fall and none
    drop = got["session_drop_score"]
    assert drop.isna().any() and (drop == 0).any() and (drop > 0).any()


def test_churn_v2_is_churn_v1_plus_activity_shift() -> None:
    # churn_v1 is frozen (a change of features is a new service version)
    assert service_views("churn_v1") == (
        "session",
        "basket",
        "adoption",
        "engagement",
        "lifecycle",
        "request_features",
    )
    v1, v2 = SERVICES["churn_v1"], SERVICES["churn_v2"]
    assert [v for v in v2 if v not in v1] == ["activity_shift"]
    assert set(v1) <= set(v2)
    assert "activity_shift" not in SERVICES["purchase_v1"] + SERVICES["nba_v1"]


def test_shift_sql_is_portable_text() -> None:
    for dialect in ("duckdb", "spark"):
        sql = feature_sql("events", dialect=dialect)
        assert "LN(" in sql and "GREATEST(" in sql and "LEAST(" in sql
        assert "sessions_1d" in sql and "sessions_28d" in sql
