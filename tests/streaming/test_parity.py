"""Online tiles (a day replayed through the real server's ``POST /events``) equal the offline
computation from the lake at the same clocks, window expiry included."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from conftest import Server, as_records, day_of_events, yesterday

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.features.streaming_offline import streaming_features
from propensity.features.tiles import STREAMING_NAMES, clock_micros
from propensity.streaming import EventProcessor


def test_replayed_day_matches_offline_features(project: Settings, server: Server) -> None:
    events = day_of_events()
    day = datetime.combine(yesterday(), time(0), tzinfo=UTC)
    last = events.column("event_timestamp")[-1].as_py()
    clocks = [
        day + timedelta(hours=7, minutes=13, seconds=5),
        day + timedelta(hours=12),
        day + timedelta(hours=18, minutes=44, seconds=59, microseconds=250),
        last,
        last + timedelta(minutes=29),
        last + timedelta(minutes=45),  # 30 min windows expired, 1 h ones not
        last + timedelta(hours=3),  # 1 h expired
        last + timedelta(hours=30),  # everything expired
    ]
    customers = sorted(set(events.column("customer_id").to_pylist()))
    stamps = events.column("event_timestamp")
    online: list[np.ndarray] = []
    reader = EventProcessor(project)
    posted = 0
    for clock in clocks:
        upto = int(pc.sum(pc.less_equal(stamps, pd.Timestamp(clock))).as_py() or 0)
        for start in range(posted, upto, 500):
            answer = server.post(as_records(events.slice(start, min(500, upto - start))))
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["accepted"] == min(500, upto - start) and not body["rejected"]
        posted = upto
        online.append(reader.tiles.read(customers, clock_micros(clock)))
    reader.flush()
    lake = EventLake(project.path(project.lake_dir))
    assert lake.count() == events.num_rows
    entity = pd.DataFrame(
        [(c, pd.Timestamp(clock)) for clock in clocks for c in customers],
        columns=["customer_id", "event_timestamp"],
    )
    offline = streaming_features(lake, entity, project.timezone)[list(STREAMING_NAMES)].to_numpy()
    np.testing.assert_allclose(np.vstack(online), offline, rtol=0, atol=1e-9, equal_nan=True)
    # The comparison means something: values move, and expire.
    by_clock = offline.reshape(len(clocks), len(customers), -1)
    events_30m = STREAMING_NAMES.index("events_30m")
    assert by_clock[3, :, events_30m].sum() > 0
    assert by_clock[5, :, events_30m].sum() == 0
    assert np.nansum(by_clock[7]) == 0
    assert by_clock[1:4, :, STREAMING_NAMES.index("purchases_today")].sum() > 0
