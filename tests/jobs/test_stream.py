"""``propensity stream`` with real processes: SIGKILLed consumers, a restarted Redis, dead letters.

Every test runs the real event processor in ``propensity stream`` processes
against a redis-server of its own (append-only, fsync always), and checks the
end state against the same events applied once by a processor in the test:
streaming feature values equal at a fixed clock (a double-counted event would
raise a count) and the lake holding each event_id once.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stream_project import (
    RedisServer,
    cli,
    group_progress,
    make_events,
    make_project,
    run_cli,
    write_jsonl,
)

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.jobs.redis_stream import RedisStream
from propensity.streaming.processor import EventProcessor

pytestmark = [
    pytest.mark.slow,
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]

NOW = datetime.now(UTC).replace(microsecond=0)
CLOCK = NOW + timedelta(seconds=1)  # after every event, before any window expires


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _expected(tmp_path: Path, events: list[dict[str, Any]]) -> Any:
    """The streaming values of the events applied once, in one call, by a processor of its own."""
    settings = make_project(tmp_path / "baseline", "127.0.0.1:1")
    processor = EventProcessor(settings)
    result = processor.process(events, received_at=NOW)
    assert result.accepted == len(events) and not result.rejected
    customers = sorted({e["customer_id"] for e in events})
    return customers, processor.read(customers, CLOCK)


def _check_applied_once(settings: Settings, events: list[dict[str, Any]], expected: Any) -> None:
    customers, values = expected
    online = EventProcessor(settings).read(customers, CLOCK)
    np.testing.assert_array_equal(np.asarray(online), np.asarray(values))
    lake = EventLake(settings.path(settings.lake_dir)).read_table(["event_id"])
    ids = lake.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)), "an event_id is in the lake twice"
    assert set(ids) == {e["event_id"] for e in events}


def _producer(settings: Settings, tmp_path: Path, events: list[dict[str, Any]], parts: int):
    """A thread that runs one ``propensity stream --produce`` process per part, in turn."""
    files = [write_jsonl(events[i::parts], tmp_path / f"part{i}.jsonl") for i in range(parts)]
    errors: list[str] = []

    def produce() -> None:
        for file in files:
            try:
                run_cli(settings, "stream", "--produce", str(file), "--per-message", "10")
            except AssertionError as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread, errors


def _lag(client: Any, settings: Settings) -> int | None:
    """Entries the consumer group has not read yet (None before the group exists)."""
    groups = client.xinfo_groups(settings.stream.key)
    return groups[0].get("lag") if groups else None


def _wait_busy(client: Any, settings: Settings, since: int, timeout: float = 120) -> None:
    """Until the group has read past ``since`` with a batch in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        read, pending = group_progress(client, settings.stream.key, settings.stream.group)
        if read > since and pending:
            return
        time.sleep(0.01)
    raise AssertionError("the consumer never started a batch")


def _wait_read(client: Any, settings: Settings, target: int, timeout: float = 120) -> None:
    """Until the group has read ``target`` entries, or all there are for now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        read, pending = group_progress(client, settings.stream.key, settings.stream.group)
        lag = _lag(client, settings)
        if read >= target or (lag == 0 and pending):
            return
        time.sleep(0.01)


@pytest.mark.parametrize("online", ["sqlite", "redis"])
def test_sigkilled_consumers_lose_nothing_and_count_nothing_twice(
    tmp_path: Path, redis_server: RedisServer, online: str
) -> None:
    rng = random.Random(16)
    # Enough parts that the producer still feeds the stream at the 4th kill: the consumer
    # drains a part in well under a second, and a drained stream starts no batch to kill.
    events = make_events(2_400, customers=40, seed=1, now=NOW)
    settings = make_project(tmp_path / "project", redis_server.url, online)
    client = redis_server.client()
    # A backlog first (a loaded machine may starve the producer), then more while killing.
    backlog, live, held = events[:800], events[800:1600], events[1600:]
    first = write_jsonl(backlog, tmp_path / "first.jsonl")
    run_cli(settings, "stream", "--produce", str(first), "--per-message", "10")
    producer, errors = _producer(settings, tmp_path, live, parts=4)
    # Held back: a kill that finds the stream drained first tops it up, so it has a batch
    # to land in however fast the consumers were.
    reserve = [write_jsonl(held[i::8], tmp_path / f"reserve{i}.jsonl") for i in range(8)]
    in_flight = kills = 0
    while kills < 4 or (in_flight < 2 and kills < 8):  # until two kills met a batch in flight
        # A consumer drains a batch in milliseconds: keep several batches waiting, so that
        # it is still mid-batch, not idle on a drained stream, when the kill lands.
        if (_lag(client, settings) or 0) < 4 * settings.stream.batch_size and reserve:
            run_cli(settings, "stream", "--produce", str(reserve.pop()), "--per-message", "10")
        since, _ = group_progress(client, settings.stream.key, settings.stream.group)
        # Two names: a restarted "a" re-reads its own pending batch, "b" claims the other's.
        consumer = cli(settings, "stream", "--consumer", "ab"[kills % 2])
        try:
            _wait_busy(client, settings, since)
            # Killed in its 1st to 3rd batch, anywhere in it: reading, processing,
            # flushing to the lake, acknowledging.
            target = since + rng.randint(0, 2) * settings.stream.batch_size + 1
            _wait_read(client, settings, target)
            time.sleep(rng.uniform(0, 0.005))  # a few batches' time at most: lag remains
        finally:  # killed on a failed wait too: no consumer outlives the test
            consumer.send_signal(signal.SIGKILL)
            consumer.wait(timeout=10)
        in_flight += group_progress(client, settings.stream.key, settings.stream.group)[1] > 0
        kills += 1
    producer.join(timeout=300)
    assert not errors, errors
    assert in_flight >= 2, "the kills should land while batches were unacknowledged"
    for file in reserve:
        run_cli(settings, "stream", "--produce", str(file), "--per-message", "10")
    out = run_cli(settings, "stream", "--consumer", "a", "--drain")
    assert "0 rejected" in out
    _check_applied_once(settings, events, _expected(tmp_path, events))
    assert group_progress(client, settings.stream.key, settings.stream.group)[1] == 0


@pytest.mark.parametrize("online", ["sqlite", "redis"])
def test_a_redis_restart_under_a_running_consumer_loses_nothing(
    tmp_path: Path, redis_server: RedisServer, online: str
) -> None:
    events = make_events(2_000, customers=30, seed=2, now=NOW)
    # With the online store in the same Redis, the tiles are killed mid-write too.
    settings = make_project(tmp_path / "project", redis_server.url, online)
    client = redis_server.client()
    consumer = cli(settings, "stream", "--consumer", "a")
    producer, errors = _producer(settings, tmp_path, events, parts=2)
    _wait_busy(client, settings, 0)  # a batch in flight: its ack meets a dead server
    redis_server.kill()  # SIGKILL: only what was fsynced survives
    time.sleep(1.0)
    redis_server.start()
    client = redis_server.client()
    producer.join(timeout=300)
    assert not errors, errors
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        read, pending = group_progress(client, settings.stream.key, settings.stream.group)
        lag = client.xinfo_groups(settings.stream.key)[0].get("lag")
        if lag == 0 and pending == 0:
            break
        time.sleep(0.2)
    consumer.send_signal(signal.SIGTERM)  # graceful: finishes the batch, acks, flushes
    out, _ = consumer.communicate(timeout=60)
    assert consumer.returncode == 0, out
    assert "Traceback" not in out
    _check_applied_once(settings, events, _expected(tmp_path, events))


def test_bad_messages_and_rejected_events_go_to_dead_letters_with_their_reason(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    good = make_events(6, customers=3, seed=3, now=NOW)
    unknown = dict(good[0], event_id="bad-type", event_type="teleport")
    negative = dict(good[1], event_id="bad-price", event_type="purchase", price=-5.0)
    settings = make_project(tmp_path / "project", redis_server.url)
    stream = RedisStream(settings)
    ids = stream.add(
        [
            json.dumps(good[:3]).encode(),
            b'[{"event_id": "x", ',  # cut off
            b"42",
            json.dumps([good[3], "not an event", unknown]).encode(),
            json.dumps(good[4]).encode(),  # one event, no array
            json.dumps([negative, good[5]]).encode(),
        ]
    )
    stream.client.xadd(settings.stream.key, {"payload": b"{}"})  # no events field
    out = run_cli(settings, "stream", "--drain")
    assert "6 accepted" in out and "3 rejected" in out
    dead = {(d["message_id"], d["index"]): d for d in stream.dead_letters()}
    assert len(dead) == 6
    assert dead[(ids[1], "")]["rule"] == "json"
    assert dead[(ids[1], "")]["payload"] == '[{"event_id": "x", '
    assert (dead[(ids[2], "")]["field"], dead[(ids[2], "")]["rule"]) == ("events", "shape")
    item = dead[(ids[3], "1")]
    assert (item["rule"], json.loads(item["payload"])) == ("bad_json", "not an event")
    typed = dead[(ids[3], "2")]
    assert typed["field"] == "event_type" and json.loads(typed["payload"]) == unknown
    priced = dead[(ids[5], "0")]
    assert priced["field"] == "price" and json.loads(priced["payload"]) == negative
    missing = [d for d in dead.values() if d["rule"] == "missing_field"]
    assert len(missing) == 1 and missing[0]["field"] == "events"
    assert group_progress(stream.client, settings.stream.key, settings.stream.group)[1] == 0
    _check_applied_once(settings, good, _expected(tmp_path, good))


def test_produce_names_the_bad_line_and_sends_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = make_project(tmp_path / "project", redis_server.url)
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_id": "e1"}\n\n[1, 2]\n')
    process = cli(settings, "stream", "--produce", str(path))
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "line 3: expected an event object, got list" in out
    assert "Traceback" not in out
    assert redis_server.client().exists(settings.stream.key) == 0
