"""The 90-day sums are running sums at T minus those at T - 90: check them directly."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
from features_testdata import late_customers, random_events

from propensity.features.snapshots import compute_features, snapshot_times


def test_long_windows_match_a_direct_pandas_sum() -> None:
    base = random_events(customers=20, events=2500, days=200, seed=21)
    # customers first seen late, so T - 90 falls before their first event
    late = late_customers(
        random_events(customers=5, events=300, days=40, seed=22),
        pd.Timestamp("2024-06-01", tz="UTC"),
    )
    events = pa.concat_tables([base, late])
    # weekly Mondays plus the last 4 days: T - 90 d is between two snapshots, except for
    # Sunday 2024-07-14 whose T - 90 d is the snapshot Monday 2024-04-15
    times = snapshot_times("2024-03-01", "2024-07-17", daily_days=4)
    assert pd.Timestamp("2024-04-15", tz="UTC") in times
    got = compute_features(events, times)
    ev = events.to_pandas()
    ev["revenue"] = (ev["price"] * ev["quantity"]).fillna(0.0)
    for t in times:
        rows = got[got["event_timestamp"] == t].set_index("customer_id")
        window = ev[(ev.event_timestamp < t) & (ev.event_timestamp >= t - pd.Timedelta(days=90))]
        buys = window[window.event_type == "purchase"]
        orders = buys.assign(day=buys.event_timestamp.dt.floor("D")).groupby("customer_id")[
            ["order_id", "day"]
        ]
        expected = {
            "sessions_90d": window[window.event_type == "session_start"]
            .groupby("customer_id")
            .size(),
            "support_tickets_90d": window[window.event_type == "support_ticket"]
            .groupby("customer_id")
            .size(),
            "orders_90d": orders.apply(lambda g: len(g.drop_duplicates())),
            "revenue_90d": buys.groupby("customer_id")["revenue"].sum(),
        }
        assert rows.index.str.startswith("L").any() == (t > pd.Timestamp("2024-06-01", tz="UTC"))
        for name, values in expected.items():
            want = values.reindex(rows.index, fill_value=0).astype(float)
            # counts are exact; revenue is a difference of two running sums
            assert rows[name].to_numpy() == pytest.approx(want.to_numpy(), abs=1e-9), (t, name)
