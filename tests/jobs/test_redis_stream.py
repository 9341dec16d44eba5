"""The Redis Streams transport on a real Redis: group, pending, claims, dead letters, erasure."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from propensity.config import Settings, load_settings
from propensity.jobs.redis_stream import RedisStream, connect
from propensity.jobs.transport import DeadLetter, MessageError, decode_events

REDIS_URL = os.environ.get("REDIS_URL", "localhost:6379")


def _redis_or_skip() -> None:
    try:
        connect(REDIS_URL, timeout=1).ping()
    except Exception:
        if "REDIS_URL" in os.environ:
            pytest.fail(f"REDIS_URL is set but no redis-server answers at {REDIS_URL}")
        pytest.skip(f"no redis-server at {REDIS_URL}")


@pytest.fixture
def stream_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings whose stream keys are unique to the test (the shared Redis is not flushed)."""
    _redis_or_skip()
    prefix = f"test-stream-{uuid.uuid4().hex[:10]}"
    env = {
        "PROPENSITY_STREAM__URL": REDIS_URL,
        "PROPENSITY_STREAM__KEY": f"{prefix}:events",
        "PROPENSITY_STREAM__DEAD_LETTER_KEY": f"{prefix}:dead",
        "PROPENSITY_STREAM__CLAIM_IDLE_MS": "300",
        "PROPENSITY_STREAM__BLOCK_MS": "50",
    }
    settings = load_settings(tmp_path, environ=env)
    yield settings
    client = connect(REDIS_URL)
    client.delete(settings.stream.key, settings.stream.dead_letter_key)
    client.close()


def _events(customer: str, n: int, start: int = 0) -> bytes:
    return json.dumps(
        [{"event_id": f"{customer}-{i}", "customer_id": customer} for i in range(start, start + n)]
    ).encode()


def test_group_starts_at_the_beginning_and_reads_in_batches(stream_settings: Settings) -> None:
    producer = RedisStream(stream_settings)
    ids = producer.add([_events("C1", 2), _events("C2", 1), b"{}"])  # before the group exists
    consumer = RedisStream(stream_settings, consumer="a")
    first = consumer.read(2)
    second = consumer.read(2)
    assert [m.id for m in first + second] == ids
    assert decode_events(first[0].payload) == json.loads(_events("C1", 2))
    assert consumer.read(2) == []  # waits block_ms, then nothing
    assert consumer.backlog() == (0, 3)  # all delivered, none acknowledged


def test_a_restarted_consumer_rereads_its_own_pending_batch_first(
    stream_settings: Settings,
) -> None:
    producer = RedisStream(stream_settings)
    ids = producer.add([_events("C1", 1), _events("C2", 1), _events("C3", 1)])
    crashed = RedisStream(stream_settings, consumer="a")
    assert [m.id for m in crashed.read(2)] == ids[:2]  # never acknowledged: it "died"
    restarted = RedisStream(stream_settings, consumer="a")
    again = restarted.read(10)
    assert [m.id for m in again] == ids[:2]
    restarted.ack([m.id for m in again], [])
    assert [m.id for m in restarted.read(10)] == ids[2:]


def test_another_consumer_claims_a_dead_consumers_batch_after_the_idle_time(
    stream_settings: Settings,
) -> None:
    producer = RedisStream(stream_settings)
    ids = producer.add([_events("C1", 1), _events("C2", 1)])
    dead = RedisStream(stream_settings, consumer="dead")
    assert len(dead.read(10)) == 2
    other = RedisStream(stream_settings, consumer="other")
    assert other.read(10) == []  # not idle long enough yet
    time.sleep(stream_settings.stream.claim_idle_ms / 1000 + 0.1)
    other._next_claim = 0.0  # its next claim pass is due
    claimed = other.read(10)
    assert [m.id for m in claimed] == ids
    assert other.claimed == 2
    other.ack(ids, [])
    assert other.backlog() == (0, 0)


def test_ack_writes_dead_letters_with_their_reason(stream_settings: Settings) -> None:
    stream = RedisStream(stream_settings, consumer="a")
    (entry,) = stream.add([b"not json"])
    (message,) = stream.read(10)
    letter = DeadLetter(entry, None, "events", "json", "not UTF-8 JSON", message.payload or b"")
    stream.ack([entry], [letter])
    (dead,) = stream.dead_letters()
    assert dead["message_id"] == entry
    assert (dead["index"], dead["field"], dead["rule"]) == ("", "events", "json")
    assert dead["payload"] == "not json"
    assert dead["consumer"] == "a"
    assert stream.backlog() == (0, 0)


def test_tidy_trims_acknowledged_entries_and_keeps_pending_ones(stream_settings: Settings) -> None:
    stream = RedisStream(stream_settings, consumer="a")
    ids = stream.add([_events(f"C{i}", 1) for i in range(6)])
    batch = stream.read(4)
    stream.ack([m.id for m in batch[:2]], [])  # 2 done, 2 pending, 2 undelivered
    trimmed = stream.tidy()
    client = connect(REDIS_URL)
    left = [e[0].decode() for e in client.xrange(stream_settings.stream.key)]
    assert trimmed == 2
    assert left == ids[2:]
    stream.ack([m.id for m in batch[2:]] + [m.id for m in stream.read(10)], [])
    stream.tidy()
    # Only the last delivered entry stays (MINID keeps it), all acknowledged.
    assert [e[0].decode() for e in client.xrange(stream_settings.stream.key)] == ids[-1:]


def test_erasure_removes_a_customers_events_and_keeps_the_others(
    stream_settings: Settings,
) -> None:
    stream = RedisStream(stream_settings, consumer="a")
    mixed = json.loads(_events("C1", 2)) + json.loads(_events("C10", 1))
    stream.add([json.dumps(mixed).encode(), _events("C1", 1, 5), _events("C2", 1), b"[C1 broken"])
    dead = DeadLetter("1-0", 0, "event_type", "unknown_type", "bad", _events("C1", 1, 9))
    other = DeadLetter("1-0", 1, "event_type", "unknown_type", "bad", _events("C2", 1, 9))
    stream.ack([], [dead, other])
    erased = stream.erase_customers(["C1"])
    assert (erased.entries, erased.events, erased.dead_letters) == (3, 4, 1)
    client = connect(REDIS_URL)
    left = [
        item
        for _, fields in client.xrange(stream_settings.stream.key)
        for item in json.loads(fields[b"events"])
    ]
    assert sorted(e["event_id"] for e in left) == ["C10-0", "C2-0"]  # C10 is not C1
    assert [d["payload"] for d in stream.dead_letters()] == [_events("C2", 1, 9).decode()]


def test_a_pending_entry_erased_meanwhile_is_acknowledged_not_returned(
    stream_settings: Settings,
) -> None:
    stream = RedisStream(stream_settings, consumer="a")
    ids = stream.add([_events("C1", 1), _events("C2", 1)])
    assert len(stream.read(10)) == 2  # then the consumer dies
    stream.erase_customers(["C1"])
    restarted = RedisStream(stream_settings, consumer="a")
    assert [m.id for m in restarted.read(10)] == ids[1:]
    assert restarted.backlog() == (0, 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(), json_values, max_size=4), max_size=5))
def test_decode_returns_every_object_of_an_array(events: list[dict]) -> None:
    assert decode_events(json.dumps(events).encode()) == events


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode_accepts_or_names_the_rule_never_anything_else(payload: bytes) -> None:
    try:
        items = decode_events(payload)
    except MessageError as exc:
        assert exc.field == "events"
        assert exc.rule in {"json", "shape"}
    else:
        assert isinstance(items, list)
        value = json.loads(payload)
        assert items == (value if isinstance(value, list) else [value])


def test_missing_events_field_is_named() -> None:
    with pytest.raises(MessageError, match="no 'events' field") as info:
        decode_events(None)
    assert info.value.rule == "missing_field"


def test_forget_erases_pending_events_and_dead_letters(stream_settings: Settings) -> None:
    from propensity.jobs.erasure import forget

    stream = RedisStream(stream_settings, consumer="a")
    stream.add([_events("C7", 2), _events("C8", 1)])
    stream.ack([], [DeadLetter("1-0", 0, "price", "negative", "bad", _events("C7", 1, 4))])
    report = forget(stream_settings, ["C7"], scan=False)
    assert (report.stream_events, report.stream_entries, report.stream_dead_letters) == (2, 1, 1)
    assert "stream: 2 events in 1 entries, 1 dead letters" in report.summary()
    left = [m.payload for m in stream.read(10)]
    assert left == [_events("C8", 1)]
    assert stream.dead_letters() == []


def test_forget_names_an_unreachable_stream(tmp_path: Path) -> None:
    from propensity.jobs.erasure import forget

    settings = load_settings(tmp_path, environ={"PROPENSITY_STREAM__URL": "127.0.0.1:1"})
    report = forget(settings, ["C7"], scan=False)
    (trace,) = report.traces
    assert "not reachable" in str(trace)
