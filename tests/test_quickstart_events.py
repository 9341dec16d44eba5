"""The quickstart's live-events demo moves the customer's streaming features."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from propensity.config import load_settings
from propensity.features.tiles import STREAMING_NAMES
from propensity.quickstart import demo_events
from propensity.streaming import EventProcessor

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def _value(values: np.ndarray, name: str) -> float:
    return float(values[0, STREAMING_NAMES.index(name)])


def test_demo_events_are_accepted_and_change_the_streaming_features(tmp_path: Path) -> None:
    processor = EventProcessor(load_settings(tmp_path, environ={}))
    before = processor.read(["C0000001"], NOW)
    events = demo_events("C0000001", NOW)
    result = processor.process(events, received_at=NOW)
    assert (result.accepted, result.rejected, result.suppressed) == (len(events), [], 0)
    after = processor.read(["C0000001"], NOW)
    assert _value(before, "events_30m") == 0
    assert np.isnan(_value(before, "minutes_since_last_event"))
    assert _value(after, "events_30m") == len(events)
    assert _value(after, "product_views_30m") == 2
    assert _value(after, "cart_open_24h") == 1
    assert _value(after, "session_product_views") == 2
    # Not stale: the serving reader calls a customer fresh when this is a number.
    assert 0 <= _value(after, "minutes_since_last_event") < 1
    # A second run (a later clock) is a new session, not a batch of duplicates.
    again = processor.process(demo_events("C0000001", NOW + timedelta(minutes=1)))
    assert again.accepted == len(events)
