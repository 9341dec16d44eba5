"""The live-event processing path: validation, consent, idempotence, durability, the lake."""

from __future__ import annotations

import glob
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propensity.config import Settings, load_settings
from propensity.events.suppression import SuppressionList
from propensity.features.tiles import STREAMING_NAMES, _local_midnights, today_start_minutes
from propensity.streaming import EventProcessor

NOW = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)


def _settings(root: Path) -> Settings:
    return load_settings(root)


def _event(i: int, customer: str = "C1", kind: str = "page_view", minutes: float = 0.0) -> dict:
    return {
        "event_id": f"e{i}",
        "customer_id": customer,
        "event_type": kind,
        "session_id": f"s-{customer}",
        "event_timestamp": (NOW - timedelta(minutes=minutes)).isoformat(),
    }


def _col(values: np.ndarray, name: str) -> np.ndarray:
    return values[:, STREAMING_NAMES.index(name)]


def test_counts_add_up_and_bad_rows_are_named_and_quarantined(tmp_path: Path) -> None:
    processor = EventProcessor(_settings(tmp_path))
    records = [
        _event(0),
        {"customer_id": "C1", "event_type": "teleport", "event_timestamp": NOW.isoformat()},
        ["not", "an", "object"],
        {**_event(3), "event_timestamp": (NOW + timedelta(minutes=6)).isoformat()},
        {**_event(4), "price": -1},
        _event(0),  # the same event twice in one batch
    ]
    result = processor.process(records, received_at=NOW)
    assert (result.accepted, result.duplicates, result.suppressed) == (1, 1, 0)
    rejected = {(r.index, r.field, r.rule) for r in result.rejected}
    assert rejected == {
        (1, "event_type", "unknown_event_type"),
        (2, "(row)", "bad_json"),
        (3, "event_timestamp", "future_timestamp"),
        (4, "price", "negative"),
    }
    assert all(r.message.startswith(f"row {r.index}: {r.field}") for r in result.rejected)
    stored = pq.read_table(glob.glob(str(tmp_path / "data/quarantine/*.parquet"))[0])
    assert sorted(stored.column("rule").to_pylist()) == sorted(r[2] for r in rejected)


def test_future_tolerance_accepts_a_slightly_early_clock(tmp_path: Path) -> None:
    processor = EventProcessor(_settings(tmp_path))
    early = {**_event(1), "event_timestamp": (NOW + timedelta(minutes=4)).isoformat()}
    assert processor.process([early], received_at=NOW).accepted == 1


def test_redelivery_changes_nothing(tmp_path: Path) -> None:
    processor = EventProcessor(_settings(tmp_path))
    batch = [_event(i, kind="product_view", minutes=i) for i in range(20)]
    first = processor.process(batch, received_at=NOW)
    before = processor.read(["C1"], NOW)
    again = processor.process(batch[::-1], received_at=NOW)
    assert (first.accepted, again.accepted, again.duplicates) == (20, 0, 20)
    np.testing.assert_array_equal(processor.read(["C1"], NOW), before)
    # A second processor (another server process) sees the same applied ids.
    other = EventProcessor(_settings(tmp_path))
    assert other.process(batch[:3], received_at=NOW).duplicates == 3


def test_erased_and_withdrawn_customers_are_dropped_and_counted(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    processor = EventProcessor(settings)
    assert processor.process([_event(1, "C9")], received_at=NOW).accepted == 1
    SuppressionList.of(settings).add(["C9"], {"reason": "test"})
    withdrawn = {**_event(3, "C7"), "consent": False}
    result = processor.process(
        [_event(2, "C9"), _event(4, "C7"), withdrawn, _event(5, "C1")], received_at=NOW
    )
    assert (result.accepted, result.suppressed, result.rejected) == (1, 3, [])


def test_late_event_updates_its_own_minute(tmp_path: Path) -> None:
    processor = EventProcessor(_settings(tmp_path))
    processor.process([_event(1, minutes=0)], received_at=NOW)
    # Arrives now, happened 45 minutes ago: in the 1 h window, not the 30 min one.
    processor.process([_event(2, minutes=45)], received_at=NOW)
    values = processor.read(["C1"], NOW)
    assert _col(values, "events_30m")[0] == 1
    assert _col(values, "events_1h")[0] == 2


def test_windows_decay_without_new_events(tmp_path: Path) -> None:
    processor = EventProcessor(_settings(tmp_path))
    processor.process([_event(1, kind="add_to_cart")], received_at=NOW)
    at = {m: processor.read(["C1"], NOW + timedelta(minutes=m)) for m in (0, 29, 31, 61, 1441)}
    assert [_col(at[m], "cart_adds_30m")[0] for m in (0, 29, 31)] == [1, 1, 0]
    assert [_col(at[m], "cart_adds_1h")[0] for m in (31, 61)] == [1, 0]
    assert _col(at[31], "cart_open_24h")[0] == 1
    assert _col(at[1441], "cart_open_24h")[0] == 0
    assert np.isnan(_col(at[1441], "minutes_since_last_event")[0])
    assert _col(at[29], "minutes_since_last_cart_add")[0] == pytest.approx(29.0)


def test_flush_moves_staged_events_into_the_lake_once(tmp_path: Path) -> None:
    processor = EventProcessor(_settings(tmp_path))
    processor.process([_event(i, minutes=i) for i in range(30)], received_at=NOW)
    assert processor.tiles.staged_rows() == 30
    assert processor.flush() == 30
    processor.process([_event(i, minutes=i) for i in range(40)], received_at=NOW)
    processor.flush()
    assert processor.lake.count() == 40
    assert processor.tiles.staged_rows() == 0
    ids = processor.lake.read(["event_id"])["event_id"]
    assert ids.is_unique


def test_a_flush_takes_what_was_staged_when_it_began_not_what_arrives_meanwhile(
    tmp_path: Path,
) -> None:
    """A producer keeps staging while a flush runs: the flush moves what was staged
    when it began, in chunks of ``flush_rows``, and leaves the rest for the next one
    (chasing the producer appended a small lake file every few batches)."""
    settings = load_settings(
        tmp_path,
        environ={
            "PROPENSITY_STREAMING__FLUSH_ROWS": "1000",
            "PROPENSITY_STREAMING__FLUSH_SECONDS": "3600",
        },
    )
    processor = EventProcessor(settings)
    batch = 100
    for k in range(25):  # 2,500 staged before the flush
        processor.process(
            [_event(k * batch + i, minutes=i % 50) for i in range(batch)], received_at=NOW
        )
    flushing, producing, stop = threading.Event(), threading.Event(), threading.Event()
    produced = [0]

    def produce() -> None:
        flushing.wait(10)  # from the flush's first chunk on: its count is taken by then
        k = 25
        while not stop.is_set() and k < 325:  # bounded: a flush that chases it still ends
            processor.process(
                [_event(k * batch + i, minutes=i % 50) for i in range(batch)], received_at=NOW
            )
            produced[0] += batch
            producing.set()
            k += 1

    appends: list[int] = []
    append = processor.lake.append

    def counted(table: Any) -> int:  # the real append, counted
        flushing.set()
        producing.wait(10)  # the producer stages more while this flush runs
        appends.append(table.num_rows)
        return append(table)

    processor.lake.append = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=produce)
    thread.start()
    try:
        added = processor.flush()
    finally:
        stop.set()
        thread.join()
    # three chunks cover the 2,500: the last one may take up to a chunk of the new rows
    assert len(appends) == 3 and 2500 <= added <= 3000, appends
    assert all(n <= 1000 for n in appends)
    # what the producer added beyond that waits for the next flush: nothing lost or doubled
    assert processor.tiles.staged_rows() == 2500 + produced[0] - added
    processor.flush()
    assert processor.lake.count() == 2500 + produced[0]
    assert processor.lake.read(["event_id"])["event_id"].is_unique


def test_staged_events_reach_the_lake_with_no_further_batch(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, environ={"PROPENSITY_STREAMING__FLUSH_SECONDS": "0.2"})
    processor = EventProcessor(settings)
    processor.process([_event(i, minutes=i) for i in range(25)], received_at=NOW)
    deadline = time.monotonic() + 30
    # The flusher commits to the lake, then unstages: wait for both.
    while (processor.lake.count() < 25 or processor.tiles.staged_rows()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert processor.lake.count() == 25
    assert processor.tiles.staged_rows() == 0
    # close() stops the flusher thread and flushes what came after its last look.
    processor.process([_event(i, minutes=i) for i in range(25, 30)], received_at=NOW)
    processor.close()
    assert processor.lake.count() == 30
    assert processor._flusher is not None and not processor._flusher.is_alive()


def test_restaging_after_a_crash_between_lake_commit_and_unstage_adds_nothing(
    tmp_path: Path,
) -> None:
    processor = EventProcessor(_settings(tmp_path))
    processor.process([_event(i) for i in range(10)], received_at=NOW)
    last, table = processor.tiles.staged()
    assert table is not None
    processor.lake.append(table)  # the lake committed, then the process died
    assert processor.flush() == 0
    assert processor.lake.count() == 10


_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=6)
)
# Objects and arrays, empty ones too, under any key: JSON bodies as a fuzzer sends them.
_NESTED = st.recursive(
    _VALUE,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_RECORD = st.one_of(
    st.dictionaries(
        st.sampled_from(
            ["customer_id", "event_type", "event_timestamp", "event_id", "price", "consent"]
        )
        | st.text(max_size=5),
        st.one_of(
            _VALUE,
            st.sampled_from(["C1", "page_view", "purchase", "2026-06-01T11:59:00Z"]),
            _NESTED,
        ),
    ),
    _VALUE,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=st.lists(_RECORD, max_size=8))
def test_any_batch_is_fully_accounted_for(tmp_path: Path, records: list) -> None:
    processor = EventProcessor(_settings(tmp_path))
    result = processor.process(records, received_at=NOW)
    total = result.accepted + result.duplicates + result.suppressed + len(result.rejected)
    assert total == len(records)
    assert sorted({r.index for r in result.rejected}) == sorted(r.index for r in result.rejected)


def test_nested_values_are_rejected_not_a_crash(tmp_path: Path) -> None:
    # A body schemathesis sent to /events: empty objects nested in objects crashed
    # Arrow's take when the rows were quarantined (the server answered 500).
    body = json.loads((Path(__file__).parent / "nested_events.json").read_text())
    result = EventProcessor(_settings(tmp_path)).process(body["events"], received_at=NOW)
    assert result.accepted == 0
    assert [(r.index, r.field) for r in result.rejected] == [(i, "customer_id") for i in range(5)]


def test_purchases_today_restart_at_local_midnight(tmp_path: Path) -> None:
    (tmp_path / "propensity.yaml").write_text("timezone: America/New_York\n")
    processor = EventProcessor(load_settings(tmp_path, environ={}))
    # 03:30 UTC on 1 June is 23:30 on 31 May in New York.
    late = datetime(2026, 6, 1, 3, 30, tzinfo=UTC)
    buy = {"customer_id": "C1", "event_type": "purchase", "price": 5.0, "quantity": 1.0}
    processor.process(
        [{**buy, "event_id": "p1", "event_timestamp": late.isoformat()}], received_at=late
    )
    before = processor.read(["C1"], late + timedelta(minutes=20))  # 23:50 local
    after = processor.read(["C1"], late + timedelta(minutes=40))  # 00:10 local, next day
    assert _col(before, "purchases_today")[0] == 1
    assert _col(after, "purchases_today")[0] == 0
    assert _col(after, "events_1h")[0] == 1


@settings(max_examples=300, deadline=None)
@given(
    clock_us=st.integers(0, 4_102_444_800 * 10**6),  # 1970 to 2100
    timezone=st.sampled_from(
        ["UTC", "America/New_York", "Europe/Paris", "Asia/Kolkata", "America/Havana"]
    ),
)
def test_the_cached_midnight_of_one_clock_equals_the_vectorized_one(
    clock_us: int, timezone: str
) -> None:
    # Havana's DST starts at midnight (a day without 00:00), Kolkata is off by 30 min.
    near = np.array([clock_us, clock_us + 1, clock_us + 59_999_999], np.int64)
    expected = _local_midnights(near, timezone)
    for k in range(3):
        assert (
            today_start_minutes(near[k : k + 1].repeat(2), timezone).tolist() == [expected[k]] * 2
        )
    assert today_start_minutes(near, timezone).tolist() == expected.tolist()


def test_the_change_feed_keeps_a_customer_changed_again_after_it_was_read(
    tmp_path: Path,
) -> None:
    processor = EventProcessor(_settings(tmp_path))
    processor.process([_event(1, "C1"), _event(2, "C2")], received_at=NOW)
    marks = processor.tiles.dirty(10)
    assert sorted(c for c, _ in marks) == ["C1", "C2"]
    processor.process([_event(3, "C1")], received_at=NOW)  # C1 changes before the clean
    processor.tiles.clean(marks)
    assert [c for c, _ in processor.tiles.dirty(10)] == ["C1"]
    processor.tiles.clean(processor.tiles.dirty(10))
    processor.process([_event(3, "C1")], received_at=NOW)  # a duplicate changes nothing
    assert processor.tiles.dirty(10) == []
    # The trigger runner's own exposures: applied to the tiles, no change to evaluate;
    # a change marked before stays marked with its own batch.
    processor.process([_event(4, "C2")], received_at=NOW)
    marked = processor.tiles.dirty(10)
    result = processor.process([_event(5, "C1"), _event(6, "C2")], received_at=NOW, changes=False)
    assert result.accepted == 2 and processor.tiles.dirty(10) == marked
    assert _col(processor.read(["C1"], NOW), "events_1h")[0] == 3


@settings(max_examples=60, deadline=None)
@given(
    clock_minute=st.integers(min_value=30_000_000, max_value=31_000_000),
    age_minutes=st.integers(min_value=24 * 60, max_value=10 * 24 * 60),
)
def test_expired_state_merges_like_no_state(clock_minute: int, age_minutes: int) -> None:
    """A customer whose tiles and session have all expired reads as one without any state.

    The stateless customer takes merge's shortcut; the expired one the general path.
    """
    from propensity.features.tiles import TILE_COLUMNS, Sessions, Tiles, merge

    clock = np.array([clock_minute * 60_000_000 + 59_000_000], np.int64)
    today = today_start_minutes(clock, "UTC")
    minute = np.array([clock_minute - age_minutes], np.int64)
    stamp = minute * 60_000_000
    values = {c: (stamp if c.endswith("_us") else np.ones(1, np.int64)) for c in TILE_COLUMNS}
    expired = merge(
        Tiles(np.zeros(1, np.int64), minute, values),
        Sessions(np.zeros(1, np.int64), stamp, np.ones(1, np.int64)),
        clock,
        today,
    )
    stateless = merge(Tiles.empty(), Sessions.empty(), clock, today)
    np.testing.assert_array_equal(expired, stateless)
    assert stateless.shape == (1, len(STREAMING_NAMES))
    assert stateless.flags.writeable  # a caller's own array, not the shared row


def test_a_first_read_waits_for_a_writer_of_a_store_not_yet_in_wal_mode(tmp_path: Path) -> None:
    """A store another process just made in rollback-journal mode, its write lock held:
    switching it to WAL fails at once ("database is locked", no busy handler there),
    so the tile store's first connection waits for the lock instead of failing."""
    import sqlite3

    from propensity.features.online.tiles import SqliteTileStore

    path = tmp_path / "online_store.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE feast_table (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO feast_table VALUES (1)")
    fresh = sqlite3.connect(path, timeout=5, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        fresh.execute("PRAGMA journal_mode=WAL")  # what a first connection used to do
    fresh.close()
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    store = SqliteTileStore(path, "propensity")
    started = time.monotonic()
    values = store.read(["C1"], 0)
    assert values.shape[0] == 1 and time.monotonic() - started >= 0.25
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
