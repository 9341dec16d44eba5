"""``forget`` removes a customer's streaming state; the audit scan finds nothing after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from propensity.config import Settings
from propensity.features.tiles import STREAMING_NAMES
from propensity.jobs.erasure import forget
from propensity.jobs.erasure_scan import find_traces
from propensity.streaming import EventProcessor


def _events(customer: str, n: int, now: datetime) -> list[dict]:
    return [
        {
            "event_id": f"{customer}-{i}",
            "customer_id": customer,
            "event_type": "add_to_cart" if i % 3 else "product_view",
            "session_id": f"{customer}-s",
            "event_timestamp": (now - timedelta(minutes=i)).isoformat(),
        }
        for i in range(n)
    ]


def test_forget_removes_tiles_staged_events_and_applied_ids(project: Settings) -> None:
    now = datetime.now(UTC)
    processor = EventProcessor(project)
    processor.process(_events("C0000777", 30, now) + _events("C0000778", 12, now))
    processor.flush()  # some of C0000777's events in the lake, more staged only
    processor.process(_events("C0000777", 40, now)[30:])
    assert processor.tiles.holds(["C0000777"]) > 0
    report = forget(project, ["C0000777"])
    assert report.streaming_rows > 0
    assert report.traces == []
    assert find_traces(project, ["C0000777"]) == []
    assert processor.tiles.holds(["C0000777"]) == 0
    values = processor.read(["C0000777", "C0000778"], now)
    assert np.nansum(values[0]) == 0
    assert values[1, STREAMING_NAMES.index("events_24h")] == 12
    # Erased: a redelivery of the customer's events is suppressed, not re-applied.
    again = processor.process(_events("C0000777", 5, now))
    assert (again.accepted, again.suppressed) == (0, 5)
    assert processor.tiles.holds(["C0000777"]) == 0
