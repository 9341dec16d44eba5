"""Benchmark: live events through the Redis Stream end to end, beside direct calls and Feast push.

Starts a redis-server of its own (no persistence) and a ``propensity stream``
consumer process on a temporary project (SQLite online store, or with
``--online redis`` the streaming state in that Redis; the lake), then:

1. **freshness**: ``--events`` single-event messages, each for a customer of
   its own, paced at ``--rate``; a reader polls the online streaming features
   (``EventProcessor.read``) and records when each customer's
   ``minutes_since_last_event`` appears: p50 / p99 / max from ``XADD`` to
   visible. Baseline: the same one-event batch through ``process`` + ``read``
   in this process, no transport.
2. **throughput**: messages of ``--per-message`` events with new ids, the
   backlog kept ahead of the consumer, over ``--seconds``: events/s
   acknowledged. Baselines in the same run: ``EventProcessor.process`` on the
   same batches in this process (no transport), and Feast's ``store.push()``
   of the same events into a push-source feature view on SQLite.

    python benchmarks/bench_stream.py [--events 10000] [--rate 500] [--seconds 60]
        [--online sqlite|redis]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from propensity.config import Settings, load_settings
from propensity.features.tiles import STREAMING_NAMES
from propensity.jobs.redis_stream import RedisStream, connect
from propensity.streaming.processor import EventProcessor

_KINDS = ("page_view", "product_view", "add_to_cart", "session_start")
_VISIBLE = STREAMING_NAMES.index("minutes_since_last_event")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _event(event_id: str, customer: str, rng: random.Random) -> dict:
    at = datetime.now(UTC) - timedelta(seconds=rng.uniform(0, 60))
    return {
        "event_id": event_id,
        "customer_id": customer,
        "event_type": rng.choice(_KINDS),
        "event_timestamp": at.isoformat().replace("+00:00", "Z"),
        "session_id": f"{customer}-s",
        "product_id": f"P{rng.randrange(100)}",
    }


def _pct(values: list[float]) -> str:
    a = np.asarray(values) * 1e3
    return (
        f"p50 {np.percentile(a, 50):.1f} ms, p99 {np.percentile(a, 99):.1f} ms, "
        f"max {a.max():.1f} ms"
    )


def _project(root: Path, port: int, batch_size: int, online: str | None = None) -> Settings:
    """A project reading the stream at ``port``; its streaming state in Redis at ``online``."""
    root.mkdir(parents=True)
    config: dict[str, Any] = {
        "stream": {
            "url": f"127.0.0.1:{port}",
            "block_ms": 200,
            "batch_size": batch_size,
            "log_seconds": 5,
        }
    }
    if online is not None:
        config["online_store"] = {"kind": "redis", "redis_url": online}
    (root / "propensity.yaml").write_text(yaml.safe_dump(config))
    return load_settings(root, environ={})


def _consumer(settings: Settings) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "propensity.cli", "stream", "--config", str(settings.root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_consumer(settings: Settings, client) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if client.xinfo_consumers(settings.stream.key, settings.stream.group):
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError("the consumer did not start")


def freshness(settings: Settings, n: int, rate: float, tmp: Path, baseline_s: float) -> None:
    rng = random.Random(1)
    stream = RedisStream(settings)
    reader = EventProcessor(settings)
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    lock = threading.Lock()
    done = threading.Event()
    read_costs: list[float] = []

    def poll() -> None:
        while not done.is_set() or len(seen) < len(sent):
            with lock:
                waiting = [c for c in sent if c not in seen][:500]
            if not waiting:
                time.sleep(0.001)
                continue
            t0 = time.time()
            values = reader.read(waiting, datetime.now(UTC) + timedelta(seconds=1))
            t1 = time.time()
            read_costs.append(t1 - t0)
            for customer, row in zip(waiting, values, strict=True):
                if not np.isnan(row[_VISIBLE]):
                    seen[customer] = t1
            if done.is_set() and time.time() - t1 > 60:
                break

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.time()
    for i in range(n):
        customer = f"F{i:07d}"
        payload = json.dumps([_event(f"fresh-{i}", customer, rng)]).encode()
        due = start + i / rate
        pause = due - time.time()
        if pause > 0:
            time.sleep(pause)
        with lock:
            sent[customer] = time.time()
        stream.add([payload])
    done.set()
    thread.join(timeout=120)
    latencies = [seen[c] - sent[c] for c in sent if c in seen]
    print(
        f"freshness over the stream, {len(latencies):,} of {n:,} events visible "
        f"(one per message, {rate:,.0f}/s): XADD -> online read {_pct(latencies)}; "
        f"read poll {_pct(read_costs)}"
    )
    # Baseline: the same path with no transport, in this process.
    direct = EventProcessor(_project(tmp / "direct-fresh", 1, 1, _direct_online(settings)))
    costs: list[float] = []
    t_end = time.perf_counter() + baseline_s
    for i in range(n):
        if costs and time.perf_counter() > t_end:
            break
        customer = f"D{i:07d}"
        t0 = time.perf_counter()
        direct.process([_event(f"direct-{i}", customer, rng)])
        direct.read([customer], datetime.now(UTC) + timedelta(seconds=1))
        costs.append(time.perf_counter() - t0)
    print(f"baseline, process + read in process (no stream), one event: {_pct(costs)}")


def _batches(prefix: str, count: int, per_message: int, customers: int, seed: int):
    rng = random.Random(seed)
    for m in range(count):
        yield [
            _event(f"{prefix}-{m}-{j}", f"C{rng.randrange(customers):07d}", rng)
            for j in range(per_message)
        ]


def throughput(settings: Settings, seconds: float, per_message: int, customers: int) -> float:
    stream = RedisStream(settings)
    client = connect(stream.url)
    key = settings.stream.key
    stop = threading.Event()

    def produce() -> None:
        m = 0
        while not stop.is_set():
            lag = client.xinfo_groups(key)[0].get("lag") or 0
            if lag > 200:
                time.sleep(0.01)
                continue
            payloads = [
                json.dumps(b).encode() for b in _batches(f"t{m}", 20, per_message, customers, m)
            ]
            stream.add(payloads)
            m += 1

    def read_count() -> int:
        info = client.xinfo_groups(key)[0]
        return int(info.get("entries-read") or 0) - int(info["pending"])

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    time.sleep(5)  # warm up
    first, t0 = read_count(), time.monotonic()
    time.sleep(seconds)
    last, t1 = read_count(), time.monotonic()
    stop.set()
    thread.join()
    rate = (last - first) * per_message / (t1 - t0)
    print(
        f"throughput through the stream: {rate:,.0f} events/s over {t1 - t0:.0f} s "
        f"(messages of {per_message}, {settings.stream.batch_size} messages per read)"
    )
    return rate


def _direct_online(settings: Settings) -> str | None:
    """The baselines' Redis streaming state: the consumer's server, a database of their own."""
    if settings.online_store.kind != "redis":
        return None
    return f"{settings.online_store.redis_url.split(',')[0]},db=2"


def direct_rate(
    settings: Settings, tmp: Path, per_message: int, batch_size: int, customers: int, seconds: float
):
    processor = EventProcessor(_project(tmp / "direct", 1, 1, _direct_online(settings)))
    size = per_message * batch_size
    events = 0
    t0 = time.perf_counter()
    for m, batch in enumerate(_batches("d", 10**9, size, customers, 7)):
        processor.process(batch)
        events += len(batch)
        if time.perf_counter() - t0 > seconds or m > 10_000:
            break
    processor.flush()
    rate = events / (time.perf_counter() - t0)
    print(f"baseline, EventProcessor.process of {size}-event batches in process: {rate:,.0f}/s")
    return rate


def feast_push_store(tmp: Path) -> Any:
    """A Feast repo on SQLite with a push source ``events_push`` of raw events (no tiles)."""
    import pandas as pd
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, PushSource
    from feast.types import String

    repo = tmp / "feast_repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text(
        yaml.safe_dump(
            {
                "project": "bench",
                "registry": str(repo / "registry.db"),
                "provider": "local",
                "online_store": {"type": "sqlite", "path": str(repo / "online.db")},
                "entity_key_serialization_version": 3,
            }
        )
    )
    pd.DataFrame(
        {
            "customer_id": ["x"],
            "event_timestamp": [pd.Timestamp.now(tz="UTC")],
            "event_type": ["page_view"],
            "product_id": ["P1"],
            "session_id": ["s"],
        }
    ).to_parquet(repo / "seed.parquet")
    customer = Entity(name="customer", join_keys=["customer_id"])
    batch = FileSource(path=str(repo / "seed.parquet"), timestamp_field="event_timestamp")
    push = PushSource(name="events_push", batch_source=batch)
    view = FeatureView(
        name="last_event",
        entities=[customer],
        schema=[Field(name=n, dtype=String) for n in ("event_type", "product_id", "session_id")],
        source=push,
        ttl=timedelta(days=1),
    )
    store = FeatureStore(repo_path=str(repo))
    store.apply([customer, batch, push, view])
    return store


def feast_push_rate(tmp: Path, per_message: int, customers: int, seconds: float) -> float:
    """Feast's own store.push() of the same events (one row per event) into SQLite."""
    import pandas as pd
    from feast.data_source import PushMode

    store = feast_push_store(tmp)
    events = 0
    t0 = time.perf_counter()
    for batch_events in _batches("f", 10**9, per_message, customers, 11):
        frame = pd.DataFrame(batch_events)
        frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
        store.push("events_push", frame.drop(columns=["event_id"]), to=PushMode.ONLINE)
        events += len(frame)
        if time.perf_counter() - t0 > seconds:
            break
    rate = events / (time.perf_counter() - t0)
    print(f"baseline, Feast store.push() of {per_message}-event frames into SQLite: {rate:,.0f}/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=10_000, help="freshness events")
    parser.add_argument("--rate", type=float, default=500.0, help="freshness events/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="throughput window")
    parser.add_argument("--per-message", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100, help="messages per read")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument(
        "--online", choices=["sqlite", "redis"], default="sqlite", help="streaming state's store"
    )
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; streaming state in "
        f"{args.online}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        port = _free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        consumer = None
        try:
            time.sleep(0.5)
            online = f"127.0.0.1:{port},db=1" if args.online == "redis" else None
            settings = _project(tmp / "project", port, args.batch_size, online)
            client = connect(f"127.0.0.1:{port}")
            consumer = _consumer(settings)
            _wait_consumer(settings, client)
            freshness(settings, args.events, args.rate, tmp, args.baseline_seconds)
            stream_rate = throughput(settings, args.seconds, args.per_message, args.customers)
            direct = direct_rate(
                settings,
                tmp,
                args.per_message,
                args.batch_size,
                args.customers,
                args.baseline_seconds,
            )
            feast = feast_push_rate(tmp, args.per_message, args.customers, args.baseline_seconds)
            print(
                f"ratios: stream / direct process {stream_rate / direct:.2f}; "
                f"stream / Feast push {stream_rate / feast:.1f}"
            )
        finally:
            if consumer is not None:
                consumer.send_signal(signal.SIGTERM)
                consumer.wait(timeout=120)
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
