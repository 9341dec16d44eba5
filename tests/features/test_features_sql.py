"""Feature values on hand-built events, and point-in-time correctness."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from features_testdata import events_table, random_events

from propensity.features.definitions import FEATURES
from propensity.features.snapshots import compute_features, snapshot_times
from propensity.features.sql import feature_sql

HAND = events_table(
    [
        ("C1", "2024-01-01 10:00", "session_start", {"session_id": "s1"}),
        ("C1", "2024-01-01 10:05", "add_to_cart", {"session_id": "s1"}),
        ("C1", "2024-01-01 10:10", "purchase",
         {"session_id": "s1", "order_id": "o1", "price": 10.0, "quantity": 2.0}),
        ("C1", "2024-01-03 10:00", "session_start", {"session_id": "s2"}),
        ("C1", "2024-01-03 10:05", "add_to_cart", {"session_id": "s2"}),
        ("C1", "2024-01-04 12:00", "campaign_exposure", {"action": "discount"}),
        ("C1", "2024-01-04 13:00", "email_open"),
        ("C1", "2024-01-05 09:00", "feature_use", {"feature_name": "a"}),
        ("C1", "2024-01-05 10:00", "email_open"),
        ("C1", "2024-01-05 10:01", "email_click"),
        ("C1", "2024-01-06 09:00", "purchase", {"order_id": "o2", "price": 30.0, "quantity": 1.0}),
        ("C1", "2024-01-07 12:00", "support_ticket"),
        ("C1", "2024-01-09 09:00", "purchase", {"order_id": "o3", "price": 5.0, "quantity": 1.0}),
        ("C1", "2024-01-10 08:00", "session_start", {"session_id": "s3"}),  # on T: excluded
        ("C2", "2024-01-02 09:00", "feature_use", {"feature_name": "b"}),
        ("C3", "2023-11-01 12:00", "feature_use", {"feature_name": "a"}),
        ("C3", "2023-12-20 12:00", "feature_use", {"feature_name": "b"}),
        ("C3", "2024-01-05 12:00", "feature_use", {"feature_name": "a"}),
    ]
)  # fmt: skip

TIMES = ["2023-11-01", "2023-12-05", "2024-01-10", "2024-01-25"]


@pytest.fixture(scope="module")
def hand() -> pd.DataFrame:
    return compute_features(HAND, TIMES).set_index(["customer_id", "event_timestamp"])


def _at(frame: pd.DataFrame, customer: str, day: str) -> pd.Series:
    return frame.loc[(customer, pd.Timestamp(day, tz="UTC"))]


def test_output_contract(hand: pd.DataFrame) -> None:
    assert list(hand.columns) == [f.name for f in FEATURES]
    assert all(str(dtype) == "float64" for dtype in hand.dtypes)
    assert 35 <= len(FEATURES) <= 50
    # present only once they have an event before T
    rows = set(hand.index)
    assert ("C3", pd.Timestamp("2023-11-01", tz="UTC")) not in rows
    assert ("C3", pd.Timestamp("2023-12-05", tz="UTC")) in rows
    assert ("C1", pd.Timestamp("2023-12-05", tz="UTC")) not in rows
    assert len(hand) == 1 + 3 + 3


def test_exact_values_of_a_shopper(hand: pd.DataFrame) -> None:
    row = _at(hand, "C1", "2024-01-10")
    expected = {
        "sessions_7d": 1,
        "sessions_14d": 2,
        "sessions_30d": 2,
        "session_trend_7d_28d": (1 / 7) / (1 / 28),
        "days_since_last_session": 6 + 14 / 24,
        "events_per_session_30d": 13 / 2,
        "active_days_30d": 7,
        "orders_30d": 3,
        "revenue_90d": 55.0,
        "avg_order_value_90d": 55 / 3,
        "order_value_slope_last5": -7.5,  # 20, 30, 5
        "items_per_basket_slope_last5": -0.5,  # 2, 1, 1
        "days_since_last_purchase": 15 / 24,
        "cart_sessions_30d": 2,
        "cart_abandonment_rate_30d": 0.5,
        "features_used_ever": 1,
        "features_used_30d": 1,
        "adoption_breadth": 0.5,  # catalog {a, b}
        "days_since_first_feature_use": 4 + 15 / 24,
        "email_opens_30d": 2,
        "email_open_rate_30d": 2.0,  # per exposure
        "email_click_rate_30d": 0.5,  # per open
        "support_tickets_30d": 1,
        "tenure_days": 8 + 14 / 24,
        "lifetime_orders": 3,
        "lifetime_revenue": 55.0,
        "exposures_7d": 1,
        "discounts_30d": 1,
        "days_since_last_exposure": 5.5,
        "last_event_epoch": pd.Timestamp("2024-01-09 09:00", tz="UTC").timestamp(),
    }
    for name, value in expected.items():
        assert row[name] == pytest.approx(value), name
    assert math.isnan(row["basket_value_recent_vs_older"])  # no orders 30-90 days back


def test_missing_values_are_zero_counts_and_nan_otherwise(hand: pd.DataFrame) -> None:
    row = _at(hand, "C2", "2024-01-10")
    assert row["sessions_30d"] == 0 and row["lifetime_orders"] == 0 and row["exposures_30d"] == 0
    for name in ("days_since_last_session", "cart_abandonment_rate_30d", "email_open_rate_30d"):
        assert math.isnan(row[name]), name
    assert math.isnan(row["order_value_slope_last5"])


def test_distinct_features_in_window(hand: pd.DataFrame) -> None:
    # C3 uses a on 11-01 and 01-05, b on 12-20
    got = {
        day: (
            _at(hand, "C3", day)["features_used_ever"],
            _at(hand, "C3", day)["features_used_30d"],
            _at(hand, "C3", day)["features_newly_adopted_30d"],
        )
        for day in ("2023-12-05", "2024-01-10", "2024-01-25")
    }
    assert got == {"2023-12-05": (1, 0, 0), "2024-01-10": (2, 2, 1), "2024-01-25": (2, 1, 0)}
    assert _at(hand, "C3", "2023-12-05")["adoption_breadth"] == 1.0  # catalog {a} only


def _truncate(table: pa.Table, cutoff: pd.Timestamp) -> pa.Table:
    return table.filter(
        pc.less(
            table["event_timestamp"], pa.scalar(cutoff, table.schema.field("event_timestamp").type)
        )
    )


def test_point_in_time_future_events_never_leak() -> None:
    base = random_events(customers=40, events=3000, days=120, seed=3)
    cutoff = pd.Timestamp("2024-03-04", tz="UTC")
    # plant future events that would change every theme if they leaked: a continuing
    # order id, new feature names (catalog), exposures, sessions, tickets...
    planted = events_table(
        [
            (f"C{c:07d}", cutoff + pd.Timedelta(minutes=m), kind, extra)
            for c in range(40)
            for m, kind, extra in [
                (0, "session_start", {"session_id": "late"}),
                (1, "purchase", {"order_id": f"O{c}-1", "price": 999.0, "quantity": 9.0}),
                (2, "feature_use", {"feature_name": "brand_new"}),
                (3, "campaign_exposure", {"action": "discount"}),
                (4, "add_to_cart", {"session_id": "late"}),
                (5, "support_ticket", {}),
                (6, "email_open", {}),
            ]
        ]
        + [("C9999999", cutoff + pd.Timedelta(days=2), "session_start")]
    )
    full = pa.concat_tables([base, planted])
    times = [cutoff - pd.Timedelta(days=7), cutoff]
    leaked = compute_features(full, times)
    clean = compute_features(_truncate(base, cutoff), times)
    pd.testing.assert_frame_equal(leaked, clean)
    assert "C9999999" not in set(leaked["customer_id"])


def test_snapshots_computed_together_equal_computed_alone() -> None:
    events = random_events(customers=30, events=2000, days=100, seed=5)
    times = snapshot_times("2024-02-01", "2024-04-10", daily_days=3)
    together = compute_features(events, times)
    for t in (times[0], times[4], times[-1]):
        alone = compute_features(_truncate(events, t), [t])
        part = together[together["event_timestamp"] == t].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone)


def test_windows_match_a_direct_pandas_count() -> None:
    events = random_events(customers=25, events=2500, days=100, seed=11)
    t = pd.Timestamp("2024-03-25", tz="UTC")
    got = compute_features(events, [t]).set_index("customer_id")
    ev = events.to_pandas()
    for days, name, kind in (
        (7, "sessions_7d", "session_start"),
        (90, "support_tickets_90d", "support_ticket"),
    ):
        window = ev[(ev.event_timestamp < t) & (ev.event_timestamp >= t - pd.Timedelta(days=days))]
        counts = window[window.event_type == kind].groupby("customer_id").size()
        expected = counts.reindex(got.index, fill_value=0).astype(float)
        pd.testing.assert_series_equal(got[name], expected, check_names=False)


def test_snapshot_times_weekly_and_daily() -> None:
    times = snapshot_times("2024-01-01", "2024-02-01", weekday=2, step_days=14, daily_days=3)
    days = [t.strftime("%m-%d") for t in times]
    assert days == ["01-03", "01-17", "01-30", "01-31", "02-01"]
    assert all(t.tz is not None and t == t.normalize() for t in times)
    with pytest.raises(ValueError, match="midnight"):
        compute_features(HAND, ["2024-01-10 12:00"])


def test_spark_dialect_uses_spark_functions() -> None:
    sql = feature_sql("events", dialect="spark")
    assert "unix_micros(" in sql and "epoch_us" not in sql and "IGNORE NULLS" not in sql
    with pytest.raises(ValueError, match="dialect"):
        feature_sql("events", dialect="oracle")
