"""The streaming state in Redis: the same values as the SQLite store, erasure, a killed writer.

Runs against the shared redis-server (``REDIS_URL``, default ``localhost:6379``) in a
database of its own (:data:`DB`), flushed before and after each test.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from conftest import free_port, make_project
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propensity.config import OnlineStore, Settings
from propensity.events.schema import ARROW_SCHEMA
from propensity.features.online import OnlineRows, tile_store
from propensity.features.online import redis_tiles as redis_tiles_module
from propensity.features.online.redis_client import connect
from propensity.features.online.redis_tiles import RedisTileStore, stream_keys
from propensity.features.online.tiles import SqliteTileStore
from propensity.features.tiles import STREAMING_NAMES, TILE_US
from propensity.serving.online import OnlineReader
from propensity.serving.runtime import Runtime
from propensity.streaming import EventProcessor

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("REDIS_URL", "localhost:6379")
#: A database index no other test uses (test_readiness has 7; the rest use 0).
DB = 11
TIMEZONE = "America/New_York"
#: Two days from here cross the spring-forward night of New York (8 March 2026).
START_US = int(datetime(2026, 3, 7, 12, tzinfo=UTC).timestamp()) * 1_000_000
DAY_US = 86_400 * 1_000_000
#: Customer ids with a colon and non-ASCII text: the key layout must keep them apart.
CUSTOMERS = ("C1", "C2", "c:3", "Çü 4")
TYPES = ("session_start", "page_view", "product_view", "add_to_cart", "purchase")


def _url() -> str:
    client = connect(REDIS_URL, timeout=1)
    try:
        client.ping()
    except Exception:
        if "REDIS_URL" in os.environ:
            pytest.fail(f"REDIS_URL is set but no redis-server answers at {REDIS_URL}")
        pytest.skip(f"no redis-server at {REDIS_URL}")
    kwargs = client.connection_pool.connection_kwargs
    url = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)},db={DB}"
    if kwargs.get("password"):
        url += f",password={kwargs['password']}"
    return url


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    address = _url()
    client = connect(address)
    client.flushdb()
    yield address
    client.flushdb()
    client.close()


@pytest.fixture
def redis_db(url: str) -> Iterator[Any]:
    client = connect(url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = {f.name: [r.get(f.name) for r in rows] for f in ARROW_SCHEMA}
    return pa.table(columns, schema=ARROW_SCHEMA)


def _events(n: int, seed: int, customers: int = 40, prefix: str = "e") -> pa.Table:
    """``n`` events with their own ids over the two days from :data:`START_US`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        customer = f"K{rng.randrange(customers):03d}"
        rows.append(
            {
                "event_id": f"{prefix}{i}",
                "customer_id": customer,
                "event_type": rng.choice(TYPES),
                "event_timestamp": START_US + rng.randrange(2 * DAY_US),
                "session_id": f"{customer}-s{rng.randrange(4)}" if rng.random() < 0.8 else None,
            }
        )
    return _table(rows)


def _clocks() -> list[int]:
    hour = 3600 * 1_000_000
    end = START_US + 2 * DAY_US
    # Inside the span, at its end, after the 30 min, 1 h and 24 h windows closed.
    return [START_US + 5 * hour, START_US + DAY_US, end, end + hour // 2, end + 2 * hour]


def _same_reads(sqlite: SqliteTileStore, redis: RedisTileStore, clocks: list[int]) -> None:
    ids = [*CUSTOMERS, "nobody", CUSTOMERS[0]]  # an unknown customer, one asked twice
    for clock in clocks:
        np.testing.assert_array_equal(redis.read(ids, clock), sqlite.read(ids, clock))


def _same_staged(sqlite: SqliteTileStore, redis: RedisTileStore, limit: int | None) -> None:
    last_s, table_s = sqlite.staged(limit)
    last_r, table_r = redis.staged(limit)
    assert last_r == last_s
    assert (table_r is None) == (table_s is None)
    if table_s is not None:
        assert table_r is not None and table_r.equals(table_s)
    assert redis.staged_rows() == sqlite.staged_rows()


_event = st.fixed_dictionaries(
    {
        "event_id": st.integers(0, 80).map(lambda i: f"e{i}"),
        "customer_id": st.sampled_from(CUSTOMERS),
        "event_type": st.sampled_from(TYPES),
        # Minutes across two days, and a few crowded ones (tiles that merge).
        "minute": st.one_of(st.integers(0, 2 * 1440), st.sampled_from([0, 1, 719, 1439, 1440])),
        "micro": st.integers(0, TILE_US - 1),
        "session_id": st.one_of(st.none(), st.sampled_from(["s0", "s1", "s2"])),
    }
)
_deliveries = st.lists(
    st.tuples(st.lists(_event, min_size=1, max_size=25), st.booleans()), min_size=1, max_size=6
)


def _batch(events: list[dict[str, Any]]) -> pa.Table:
    rows = [
        {
            **{k: e[k] for k in ("event_id", "customer_id", "event_type")},
            "event_timestamp": START_US + e["minute"] * TILE_US + e["micro"],
            "session_id": None
            if e["session_id"] is None
            else f"{e['customer_id']}/{e['session_id']}",
        }
        for e in events
    ]
    return _table(rows)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    deliveries=_deliveries,
    cut=st.integers(0, 3 * 1440),
    limit=st.one_of(st.none(), st.integers(1, 60)),
    later=st.lists(_event, min_size=1, max_size=10),
    later_changes=st.booleans(),
)
def test_redis_store_matches_the_sqlite_store(
    url: str, deliveries: list, cut: int, limit: int | None, later: list, later_changes: bool
) -> None:
    connect(url).flushdb()
    with tempfile.TemporaryDirectory() as folder:
        sqlite = SqliteTileStore(Path(folder) / "online.db", "prop", timezone=TIMEZONE)
        redis = RedisTileStore(url, "prop", timezone=TIMEZONE)
        for events, redeliver in deliveries:
            batch = _batch(events)
            for _ in range(2 if redeliver else 1):  # a redelivered batch: all duplicates
                assert redis.apply(batch) == sqlite.apply(batch)
        _same_reads(sqlite, redis, _clocks())
        _same_staged(sqlite, redis, None)
        _same_staged(sqlite, redis, limit)
        # The change feed: the same customers marked by the same batches, cleaned alike.
        assert redis.dirty(1000) == sqlite.dirty(1000)
        seen = sqlite.dirty(3)
        sqlite.clean(seen)
        redis.clean(seen)
        assert redis.dirty(1000) == sqlite.dirty(1000)
        # Expiry, then a late batch (its old ids may be expired: applied again in both).
        before = START_US // TILE_US + cut
        assert redis.expire(before) == sqlite.expire(before)
        # A late batch marked changed or not (the trigger runner's exposures are not).
        applied = redis.apply(_batch(later), changes=later_changes)
        assert applied == sqlite.apply(_batch(later), changes=later_changes)
        _same_reads(sqlite, redis, [*_clocks(), START_US + 4 * DAY_US])
        assert redis.holds(CUSTOMERS) == sqlite.holds(CUSTOMERS)
        assert redis.dirty(1000) == sqlite.dirty(1000)
        last, _ = sqlite.staged(limit)
        sqlite.unstage(last)
        redis.unstage(last)
        _same_staged(sqlite, redis, None)
        sqlite.close()
        redis.close()


def test_expire_visits_only_customers_with_old_state(redis_db: Any, url: str) -> None:
    store = RedisTileStore(url, "prop")
    store.apply(_events(300, seed=1))
    index = stream_keys("prop")["customers"]
    cut = START_US // TILE_US + 1440
    old = redis_db.zcount(index, "-inf", f"({cut}")
    assert 0 < old < redis_db.zcard(index)
    deleted = store.expire(cut)
    assert deleted > 0
    # Afterwards nobody holds anything older, so the next call finds no one.
    assert redis_db.zcount(index, "-inf", f"({cut}") == 0
    assert store.expire(cut) == 0
    assert redis_db.zcount(stream_keys("prop")["applied"], "-inf", f"({cut}") == 0
    # Past every tile: every customer's keys are gone, the staged events stay for the lake.
    store.expire(cut + 3 * 1440)
    names = {k.decode() for k in redis_db.scan_iter(match="*")}
    staged = {"_stream:staged:prop", "_stream:staged_rows:prop", "_stream:batch:prop"}
    assert names == staged | {"_stream:dirty:prop"}  # the change feed waits for the runner


def test_forget_removes_every_key_and_staged_row_of_the_customers(
    redis_db: Any, url: str, tmp_path: Path
) -> None:
    gone, kept = ["K001", "c:3"], "K002"
    events = _events(600, seed=2, customers=6)
    mixed = events.to_pylist()
    for i, row in enumerate(mixed[:40]):  # an id with a colon, mixed into every batch
        row.update(customer_id="c:3", session_id="c:3-s1", event_id=f"x{i}")
    events = _table(mixed)
    redis = RedisTileStore(url, "prop")
    sqlite = SqliteTileStore(tmp_path / "online.db", "prop")
    for start in range(0, events.num_rows, 100):
        redis.apply(events.slice(start, 100))
        sqlite.apply(events.slice(start, 100))
    clock = START_US + 2 * DAY_US
    before = redis.read([kept], clock)
    held = redis.holds([kept])
    assert redis.holds(gone) == sqlite.holds(gone) > 0
    assert redis.forget(gone) == sqlite.forget(gone)
    assert redis.holds(gone) == 0
    for key in redis_db.scan_iter(match="*"):
        assert not any(c.encode() in key for c in gone), key
    erased = {r["event_id"] for r in events.to_pylist() if r["customer_id"] in gone}
    applied = {m.decode() for m in redis_db.zrange(stream_keys("prop")["applied"], 0, -1)}
    assert applied and not applied & erased
    _, staged = redis.staged()
    assert staged is not None and not set(gone) & set(staged.column("customer_id").to_pylist())
    assert staged.num_rows == events.num_rows - len(erased)
    # The others are untouched; an erased customer's redelivered events are new again.
    np.testing.assert_array_equal(redis.read([kept], clock), before)
    assert redis.holds([kept]) == held
    assert np.nansum(redis.read(gone, clock)) == 0


_WRITER = """
import sys
import pyarrow as pa
from propensity.features.online.redis_tiles import RedisTileStore

url, project, path, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
events = pa.ipc.open_file(path).read_all()
store = RedisTileStore(url, project)
print("ready", flush=True)
for start in range(0, events.num_rows, size):
    store.apply(events.slice(start, size))
"""


def _counted(client: Any, store: RedisTileStore, customers: list[str]) -> tuple[int, int, int]:
    """Events counted in the tiles, ids recorded as applied, events staged."""
    with client.pipeline(transaction=False) as pipe:
        for c in customers:
            pipe.hgetall(store.state_key(c))
        hashes = pipe.execute()
    tiles = sum(int(v.split(b",")[0]) for h in hashes for f, v in h.items() if f[:1] == b"t")
    return tiles, client.zcard(store.keys["applied"]), store.staged_rows()


def test_a_killed_writer_then_a_redelivery_loses_and_doubles_nothing(
    redis_db: Any, url: str, tmp_path: Path
) -> None:
    events = _events(40_000, seed=3, customers=2_000)
    customers = sorted(set(events.column("customer_id").to_pylist()))
    path = tmp_path / "events.arrow"
    with pa.ipc.new_file(path, events.schema) as writer:
        writer.write_table(events)
    store = RedisTileStore(url, "fault")
    counter = store.keys["batch"]
    rng = random.Random(5)
    applied = 0
    for _ in range(6):  # killed six times, each run redelivering from the first batch
        writer_process = subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, "fault", str(path), "500"],
            stdout=subprocess.PIPE,
        )
        assert writer_process.stdout is not None
        assert writer_process.stdout.readline().strip() == b"ready"
        target = int(redis_db.get(counter) or 0) + rng.randrange(2, 8)
        deadline = time.monotonic() + 60
        while int(redis_db.get(counter) or 0) < target and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))  # about one batch: anywhere in the next apply
        writer_process.send_signal(signal.SIGKILL)
        writer_process.wait(timeout=10)
        applied = int(redis_db.get(counter)) * 500
        # Whatever the kill interrupted, each batch is counted, recorded and staged whole or
        # not at all.
        assert _counted(redis_db, store, customers) == (applied, applied, applied)
    assert 0 < applied < events.num_rows, "the writer finished before it was killed"
    reports = [store.apply(events.slice(s, 500)) for s in range(0, events.num_rows, 500)]
    assert sum(r.duplicates for r in reports) == applied
    assert sum(r.applied for r in reports) == events.num_rows - applied
    clean = SqliteTileStore(tmp_path / "clean.db", "fault")
    clean.apply(events)
    for clock in _clocks():
        np.testing.assert_array_equal(store.read(customers, clock), clean.read(customers, clock))
    _, staged = store.staged()
    assert staged is not None
    ids = staged.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)) == events.num_rows


class _NoBatchRows:
    """A batch read holding no rows: the streaming columns alone, as /score's reader has them."""

    feature_names = list(STREAMING_NAMES)

    def read(self, customer_ids: list[str], now: float) -> OnlineRows:
        n = len(customer_ids)
        return OnlineRows(
            np.full((n, len(STREAMING_NAMES)), np.nan),
            np.full(n, np.nan),
            np.zeros(n, bool),
            np.ones(n, bool),
        )


def _redis_project(root: Path, url: str) -> Settings:
    settings = make_project(root)
    return settings.model_copy(update={"online_store": OnlineStore(kind="redis", redis_url=url)})


def test_events_processed_on_a_redis_project_are_read_by_the_scoring_runtime(
    redis_db: Any, url: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    records = [
        {
            "event_id": f"live-{i}",
            "customer_id": f"C{i % 3}",
            "event_type": TYPES[i % len(TYPES)],
            "session_id": f"C{i % 3}-s",
            "event_timestamp": (now - timedelta(minutes=i)).isoformat(),
        }
        for i in range(60)
    ]
    settings = _redis_project(tmp_path / "redis", url)
    processor = EventProcessor(settings)
    assert isinstance(processor.tiles, RedisTileStore)
    result = processor.process(records, received_at=now)
    assert (result.accepted, result.rejected) == (60, [])
    assert processor.process(records[:10], received_at=now).duplicates == 10
    # The tiles are in Redis, under the Feast project's suffix; not in the SQLite file.
    assert redis_db.exists("_stream:c:C0:propensity")
    assert not settings.path(settings.online_store.sqlite_path).exists()
    baseline = EventProcessor(make_project(tmp_path / "sqlite"))
    baseline.process(records, received_at=now)
    customers = ["C0", "C1", "C2", "C9"]
    runtime = Runtime(settings)
    assert isinstance(runtime.streaming, RedisTileStore)
    clock = now.timestamp() + 1
    reader = OnlineReader(_NoBatchRows(), clock=lambda: clock, streaming=runtime.streaming)
    rows = reader.read(customers)
    expected = baseline.read(customers, now + timedelta(seconds=1))
    np.testing.assert_array_equal(rows.matrix, expected)
    assert rows.matrix[0, STREAMING_NAMES.index("events_24h")] == 20
    assert rows.stale.tolist() == [False, False, False, True]  # fresh events: not stale
    # The lake's side: staged in Redis, flushed once.
    assert processor.flush() == 60
    assert processor.tiles.staged_rows() == 0


def test_the_factory_picks_the_store_of_the_settings(url: str, tmp_path: Path) -> None:
    sqlite = make_project(tmp_path / "a")
    assert isinstance(tile_store(sqlite), SqliteTileStore)
    store = tile_store(_redis_project(tmp_path / "b", url), project="other")
    assert isinstance(store, RedisTileStore)
    assert (store.project, store.timezone, store.url) == ("other", sqlite.timezone, url)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_durability_is_waited_for_or_noted_once(
    redis_db: Any, url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.setattr(redis_tiles_module, "_NOTED", set())
    caplog.set_level(logging.WARNING, logger=redis_tiles_module.__name__)
    batch = _events(20, seed=4)
    # The shared server runs without the append-only file: said once, not per call.
    store = RedisTileStore(url, "prop")
    store.apply(batch)
    RedisTileStore(url, "prop").apply(batch.slice(0, 5))
    assert sum("without the append-only file" in r.message for r in caplog.records) == 1
    caplog.clear()
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        aof = RedisTileStore(f"127.0.0.1:{port}", "prop")
        deadline = time.monotonic() + 20
        while True:
            try:
                aof.client.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        version = tuple(int(p) for p in aof.client.info("server")["redis_version"].split(".")[:2])
        for part in range(4):
            assert aof.apply(batch.slice(part * 5, 5)).applied == 5
        notes = [r.message for r in caplog.records if "WAITAOF" in r.message]
        # 7.2 and later: each apply waited for the fsync; before: noted once, not failed.
        assert len(notes) == (0 if version >= (7, 2) else 1)
        assert not any("without the append-only file" in r.message for r in caplog.records)
    finally:
        server.terminate()
        server.wait(timeout=10)
