"""Scoring while live events stream in: /score and /score_batch latency, server memory over minutes.

The serving targets of the real-time work, on the SQLite online store with
100,000 customers: while ``POST /events`` takes a sustained 5,000 events/s,
``/score`` p99 <= 10 ms and ``/score_batch`` of 1,000 customers <= 200 ms; and
the serving process's memory flat (within 10 %) over 10 minutes of it.

The project is ``bench_serving.py``'s (100,000 customers online, champions the
size of the quickstart's, compiled). The events are written into a working
copy of it, so a project passed with ``--project`` is left as it was and each
run starts from the same store. Unless ``--as-built``, the copy's churn and
purchase champions are refit on the streaming services (``churn_v3``,
``purchase_v2``, the services of the models' specs; a project built before
they read them has batch-only champions), so every ``/score`` merges the
customer's tiles as the events land.

Three phases against one server (a ``bentoml serve`` subprocess):

A. baseline, no events: cycles of sequential ``/score`` calls for random
   customers and one ``/score_batch`` of 1,000 fresh customers (with reasons);
B. the same cycles for ``--seconds`` while a producer process posts
   ``/events`` batches of 500 paced at ``--rate`` (events of the same
   customers, page views, product views, cart adds and session starts
   stamped within the last minute, so every window counts them); both
   phases side by side with the ratio B/A, and the producer's achieved rate
   and ``/events`` latency;
C. the producer at ``--rate`` for ``--memory-minutes`` with ten ``/score``
   calls a second; the server's resident memory (every process of its tree)
   sampled every 10 s: the first minute's median, the last minute's, the
   maximum and their ratio. RSS counts the pages of the online store's file
   the server has memory-mapped, so the private part (RSS minus shared
   pages) is summarized too. The events accepted and the online store's
   size on disk (the file, its WAL and the ``stream_*`` tables) at the start
   and the end.

The client is ``bench_serving``'s lean ``http.client`` one; the producer is a
process of its own so its JSON work does not hold this process's GIL while
a request is timed. Every figure is printed with the machine's load average:
on a shared 2-core machine the neighbours are measured as well.

With ``--via stream`` the events go through a Redis Stream instead (a
redis-server of the benchmark's own, messages of 500 events, one
``propensity stream`` process applying them to the same online store): the
API process then only scores, as in a deployment whose events arrive on a
stream. The accepted rate is then the consumer's acknowledged one.

Usage: python benchmarks/bench_serving_load.py [--project FOLDER] [--customers 100000]
       [--requests 2000] [--batches 30] [--rate 5000] [--seconds 60]
       [--memory-minutes 10] [--as-built] [--via api|stream]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

from bench_serving import (  # noqa: E402
    _bench_env,
    _Client,
    _load,
    _pct,
    _project,
    _server_cpu,
    _start,
    _timed_posts,
)
from project import FULL_SIZE_TREES, fit_model  # noqa: E402

from propensity.config import Settings  # noqa: E402
from propensity.serving.process import stop  # noqa: E402

BATCH = 500  # events per POST /events
_SAMPLE_SECONDS = 10.0  # between two memory samples in phase C
_LIGHT_SCORES = 10  # /score calls a second in phase C
_STREAMING_SERVICES = {"churn": "churn_v3", "purchase_propensity": "purchase_v2"}
_SQLITE_HEADER = b"SQLite format 3\x00"


# -- the project ------------------------------------------------------------------------


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == _SQLITE_HEADER


def _working_copy(source: Path, target: Path) -> None:
    """Copy a project folder; SQLite files through the backup API (a consistent snapshot
    even while another process writes them)."""
    databases: list[Path] = []

    def skip(folder: str, names: list[str]) -> list[str]:
        out = []
        for name in names:
            path = Path(folder) / name
            if name.endswith(("-wal", "-shm", "-journal")):
                out.append(name)
            elif path.is_file() and _is_sqlite(path):
                databases.append(path)
                out.append(name)
        return out

    shutil.copytree(source, target, ignore=skip)
    for path in databases:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        dst = sqlite3.connect(target / path.relative_to(source))
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()


def _streaming_champions(settings: Settings) -> None:
    """Champions of churn and purchase refit on the streaming services' features."""
    from propensity.features.store import FeatureStoreAdapter
    from propensity.registry import log_run, set_champion

    adapter = FeatureStoreAdapter(settings)
    for seed, (name, service) in enumerate(_STREAMING_SERVICES.items(), start=11):
        features = adapter.service_features(service)
        model = fit_model(
            features, seed, n_rows=6000, n_estimators=FULL_SIZE_TREES[name],
            early_stopping_rounds=None,
        )  # fmt: skip
        example = pd.DataFrame(np.ones((2, len(features))), columns=features)
        # An experiment of its own: the copied ones keep their artifacts in the source folder.
        run = log_run(
            settings.tracking_uri,
            f"{name}-streaming",
            estimator=model,
            input_example=example,
            register_as=name,
        )
        assert run.version is not None
        set_champion(settings.tracking_uri, name, run.version)


# -- the online store on disk -------------------------------------------------------------


def _store_size(settings: Settings) -> dict[str, float]:
    """MiB of the online store file and its WAL, of the streaming tables; their rows."""
    from propensity.features.definitions import PROJECT

    path = settings.path(settings.online_store.sqlite_path)
    wal = path.with_name(path.name + "-wal")
    out = {
        "file": path.stat().st_size / 2**20,
        "wal": (wal.stat().st_size if wal.exists() else 0) / 2**20,
    }
    prefix = f"stream_{PROJECT}_"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        names = [
            n
            for (n,) in con.execute(
                "SELECT name FROM sqlite_master WHERE tbl_name LIKE ? ESCAPE '\\'",
                (prefix.replace("_", "\\_") + "%",),
            )
        ]
        size = 0
        for name in names:
            (pages,) = con.execute(
                "SELECT pgsize FROM dbstat WHERE name = ? AND aggregate = TRUE", (name,)
            ).fetchone()
            size += pages or 0
        out["stream"] = size / 2**20
        for kind in ("tiles", "applied"):
            (out[kind],) = con.execute(f'SELECT COUNT(*) FROM "{prefix}{kind}"').fetchone()
    finally:
        con.close()
    return out


# -- memory of the server ------------------------------------------------------------------


def _tree(proc: Any) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def _memory(proc: Any) -> tuple[float, float]:
    """RSS and its private part (RSS minus shared, i.e. mapped file, pages), MiB, whole tree."""
    rss = private = 0
    for p in _tree(proc):
        m = p.memory_info()
        rss += m.rss
        private += m.rss - m.shared
    return rss / 2**20, private / 2**20


def _processes(proc: Any) -> str:
    parts = []
    for p in _tree(proc):
        command = " ".join(p.cmdline()[1:4])
        parts.append(f"pid {p.pid} ({command[:60]}): {p.memory_info().rss / 2**20:,.0f} MiB")
    return "; ".join(parts)


def _summary(label: str, samples: list[tuple[float, float]], minutes: float) -> str:
    """First minute's median, last minute's, max, last/first; within 10 %?"""
    end = samples[-1][0]
    first = float(np.median([v for t, v in samples if t <= 60.0]))
    last = float(np.median([v for t, v in samples if t >= end - 60.0]))
    top = max(v for _, v in samples)
    ratio = last / first
    verdict = "yes" if abs(ratio - 1) <= 0.10 else "NO"
    note = " (a run this short: first and last minute overlap)" if minutes <= 2 else ""
    return (
        f"  {label}: first-minute median {first:,.0f} MiB, last-minute median {last:,.0f} MiB, "
        f"max {top:,.0f} MiB, last/first {ratio:.3f} (within ±10%: {verdict}){note}"
    )


# -- the event producer --------------------------------------------------------------------


class _StreamSender:
    """Sends a batch as one message of the Redis Stream; counts what the consumer acked."""

    def __init__(self, config: str) -> None:
        from propensity.config import load_settings
        from propensity.jobs.redis_stream import RedisStream

        self.stream = RedisStream(load_settings(Path(config).parent, environ={}))
        self.stream.backlog()  # creates the group before the consumer's first read
        self.before = 0
        self.before = self.acknowledged()  # a phase counts its own events only

    def post(self, body: dict[str, Any]) -> tuple[int, bytes, Any]:
        self.stream.add([json.dumps(body["events"]).encode()])
        return 202, b"", None

    def acknowledged(self) -> int:
        groups = self.stream.client.xinfo_groups(self.stream.key)
        group = next(g for g in groups if g["name"].decode() == self.stream.group)
        return (int(group["entries-read"] or 0) - int(group["pending"])) * BATCH - self.before

    def close(self) -> None:
        self.stream.client.close()


def _produce(target: str, ids: list[str], rate: float, seed: int, ctl: dict[str, Any]) -> None:
    """Send batches of ``BATCH`` new events paced at ``rate`` until ``ctl['stop']`` is set.

    ``target`` is the server's URL (``POST /events``) or a project's ``propensity.yaml``
    (messages of its Redis Stream, which a ``propensity stream`` process consumes).
    """
    from bench_stream import _event

    rng = random.Random(seed)
    stream = target.endswith(".yaml")
    client: Any = _StreamSender(target) if stream else _Client(target)
    token = uuid.uuid4().hex[:8]  # ids new to any store, whichever run wrote it before
    interval = BATCH / rate
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    totals: Counter[str] = Counter()
    ctl["ready"].set()
    ctl["go"].wait()
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    while not ctl["stop"].is_set():
        wait = start + n * interval - time.perf_counter()
        if wait > 0 and ctl["stop"].wait(wait):
            break
        customers = [ids[rng.randrange(len(ids))] for _ in range(BATCH)]
        body = {"events": [_event(f"{token}-{n}-{k}", c, rng) for k, c in enumerate(customers)]}
        t = time.perf_counter()
        status, data, _ = client.post("/events", body) if not stream else client.post(body)
        latencies.append(time.perf_counter() - t)
        statuses[status] += 1
        if stream and n % 20 == 0:
            ctl["accepted"].value = client.acknowledged()
        if status == 200:
            answer = json.loads(data)
            for key in ("accepted", "duplicates", "suppressed"):
                totals[key] += answer[key]
            totals["rejected"] += len(answer["rejected"])
            with ctl["accepted"].get_lock():
                ctl["accepted"].value += answer["accepted"]
        n += 1
    now = time.perf_counter()
    if stream:
        # The consumer's share of the window: what it acknowledged by now.
        totals["accepted"] = ctl["accepted"].value = client.acknowledged()
        totals["behind_events"] = n * BATCH - totals["accepted"]
    client.close()
    ctl["out"].put(
        {
            "cpu": time.process_time() - cpu,
            "seconds": now - start,
            "batches": n,
            "behind": max(0.0, now - (start + n * interval)),
            "latencies": latencies,
            "statuses": dict(statuses),
            **totals,
        }
    )


class _Producer:
    """The producer process: started, released, stopped; its figures."""

    def __init__(self, target: str, ids: list[str], rate: float, seed: int) -> None:
        context = mp.get_context("spawn")  # no fork of a process holding MLflow's threads
        self.ctl = {
            "ready": context.Event(),
            "go": context.Event(),
            "stop": context.Event(),
            "accepted": context.Value("q", 0),
            "out": context.Queue(),
        }
        self.process = context.Process(target=_produce, args=(target, ids, rate, seed, self.ctl))
        self.process.start()
        if not self.ctl["ready"].wait(120):
            raise RuntimeError("the event producer did not start")

    def go(self) -> None:
        self.ctl["go"].set()

    @property
    def accepted(self) -> int:
        return int(self.ctl["accepted"].value)

    def stop(self) -> dict[str, Any]:
        self.ctl["stop"].set()
        result: dict[str, Any] = self.ctl["out"].get(timeout=120)
        self.process.join(timeout=30)
        return result


def _events_line(result: dict[str, Any], rate: float) -> str:
    achieved = result.get("accepted", 0) / result["seconds"]
    lat = result["latencies"]
    return (
        f"  events: target {rate:,.0f}/s, accepted {achieved:,.0f}/s "
        f"({result.get('accepted', 0):,} in {result['seconds']:.0f} s, {result['batches']:,} "
        f"batches; duplicates {result.get('duplicates', 0)}, rejected "
        f"{result.get('rejected', 0)}; statuses {result['statuses']}); behind schedule at the "
        f"end {result['behind']:.1f} s; producer CPU {result['cpu'] / result['seconds']:.2f} "
        "cores\n"
        f"  {'XADD' if 'behind_events' in result else 'POST /events'} of {BATCH}: "
        f"p50 {_pct(lat, 50):.1f} ms, p99 {_pct(lat, 99):.1f} ms, max {_pct(lat, 100):.1f} ms"
        + (
            f"; sent and not yet acknowledged at the end: {result['behind_events']:,} events"
            if "behind_events" in result
            else ""
        )
    )


class _Consumer:
    """A redis-server of its own and a ``propensity stream`` process on the working copy."""

    def __init__(self, root: Path, tmp: Path) -> None:
        import yaml
        from bench_stream import _consumer, _free_port

        from propensity.config import load_settings

        port = _free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(tmp)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        config_path = root / "propensity.yaml"
        config = yaml.safe_load(config_path.read_text()) or {}
        config["stream"] = {"url": f"127.0.0.1:{port}", "block_ms": 200, "log_seconds": 5}
        config_path.write_text(yaml.safe_dump(config))
        self.target = str(config_path)
        time.sleep(0.5)
        self.process = _consumer(load_settings(root, environ={}))
        self.began = time.perf_counter()

    def line(self) -> str:
        times = psutil.Process(self.process.pid).cpu_times()
        cores = (times.user + times.system) / (time.perf_counter() - self.began)
        return f"  propensity stream consumer: {cores:.2f} cores on average since it started"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.redis.terminate()
        self.redis.wait(timeout=10)


# -- scoring traffic -----------------------------------------------------------------------


def _cycles(
    client: _Client,
    proc: Any,
    ids: list[str],
    rng: np.random.Generator,
    per_cycle: int,
    *,
    cycles: int | None = None,
    until: float | None = None,
) -> dict[str, Any]:
    """Cycles of ``per_cycle`` /score calls and one /score_batch of 1,000 fresh customers."""
    out: dict[str, Any] = {"score": [], "own": [], "batch": [], "batch_own": []}
    out["errors"] = Counter()
    cpu_score = cpu_batch = 0.0
    n = 0
    cpu, began, own_cpu = _server_cpu(proc), time.perf_counter(), time.process_time()
    while (cycles is None or n < cycles) and (until is None or time.perf_counter() < until):
        bodies = [{"customer_id": ids[i]} for i in rng.integers(0, len(ids), per_cycle)]
        times, c, own = _timed_posts(client, proc, "/score", bodies, out["errors"])
        out["score"] += times
        out["own"] += own
        cpu_score += c * len(bodies)
        batch = {"customer_ids": [ids[i] for i in rng.choice(len(ids), 1000, replace=False)]}
        times, c, own = _timed_posts(client, proc, "/score_batch", [batch], out["errors"])
        out["batch"] += times
        out["batch_own"] += own
        cpu_batch += c
        n += 1
    wall = time.perf_counter() - began
    out["cores"] = (_server_cpu(proc) - cpu) / wall
    out["client_cores"] = (time.process_time() - own_cpu) / wall
    out["cpu_score"] = cpu_score / max(n * per_cycle, 1) * 1e3
    out["cpu_batch"] = cpu_batch / max(n, 1) * 1e3
    out["seconds"] = wall
    return out


def _side_by_side(a: dict[str, Any], b: dict[str, Any], rate: float) -> None:
    print(f"\n{'':34s}{'A: no events':>14s}{f'B: {rate:,.0f} ev/s':>16s}{'B/A':>8s}{'target':>10s}")
    rows = [
        ("/score p50 ms", _pct(a["score"], 50), _pct(b["score"], 50), ""),
        ("/score p99 ms", _pct(a["score"], 99), _pct(b["score"], 99), "<= 10"),
        ("  server time p50 ms", _pct(a["own"], 50), _pct(b["own"], 50), ""),
        ("  server time p99 ms", _pct(a["own"], 99), _pct(b["own"], 99), ""),
        ("/score_batch 1000 p50 ms", _pct(a["batch"], 50), _pct(b["batch"], 50), ""),
        ("/score_batch 1000 p99 ms", _pct(a["batch"], 99), _pct(b["batch"], 99), "<= 200"),
        ("  server time p50 ms", _pct(a["batch_own"], 50), _pct(b["batch_own"], 50), ""),
        ("server CPU ms per /score", a["cpu_score"], float("nan"), ""),
        ("server CPU ms per /score_batch", a["cpu_batch"], float("nan"), ""),
        ("server CPU, cores busy", a["cores"], b["cores"], ""),
        ("this client's CPU, cores busy", a["client_cores"], b["client_cores"], ""),
    ]
    for label, x, y, target in rows:
        print(f"{label:34s}{x:14.2f}{y:16.2f}{y / x:8.2f}{target:>10s}")
    counts = [f"{len(x['score']):,}, {len(x['batch'])}" for x in (a, b)]
    print(f"{'requests: /score, /score_batch':34s}{counts[0]:>14s}{counts[1]:>16s}")
    errors = [str(dict(x["errors"])) for x in (a, b)]
    print(f"{'errors (status: count)':34s}{errors[0]:>14s}{errors[1]:>16s}")
    print("(B's server CPU per request is not separable from the events' and is not shown)")


def _phase_c(
    client: _Client, proc: Any, target: str, ids: list[str], args: argparse.Namespace, settings: Any
) -> None:
    rng = np.random.default_rng(7)
    seconds = args.memory_minutes * 60
    before = _store_size(settings)
    print(
        f"\n[{_load()}] phase C: events at {args.rate:,.0f}/s for {args.memory_minutes:g} min, "
        f"{_LIGHT_SCORES} /score a second; server memory every {_SAMPLE_SECONDS:.0f} s",
        flush=True,
    )
    print(f"  server processes: {_processes(proc)}")
    producer = _Producer(target, ids, args.rate, seed=2)
    rss: list[tuple[float, float]] = []
    private: list[tuple[float, float]] = []
    scores: list[float] = []
    errors: Counter[int] = Counter()
    producer.go()
    began, cpu = time.perf_counter(), _server_cpu(proc)
    next_sample = began
    next_line = began + 60
    try:
        while (now := time.perf_counter()) < began + seconds + 0.5:
            if now >= next_sample:
                r, p = _memory(proc)
                rss.append((now - began, r))
                private.append((now - began, p))
                next_sample += _SAMPLE_SECONDS
            if now >= next_line:
                print(
                    f"  [{_load()}] {(now - began) / 60:.0f} min: RSS {rss[-1][1]:,.0f} MiB "
                    f"(private {private[-1][1]:,.0f}), events accepted {producer.accepted:,}",
                    flush=True,
                )
                next_line += 60
            t = time.perf_counter()
            status, _, _ = client.post("/score", {"customer_id": ids[int(rng.integers(len(ids)))]})
            if status == 200:
                scores.append(time.perf_counter() - t)
            else:
                errors[status] += 1
            time.sleep(max(0.0, t + 1 / _LIGHT_SCORES - time.perf_counter()))
    finally:
        result = producer.stop()
    cores = (_server_cpu(proc) - cpu) / (time.perf_counter() - began)
    after = _store_size(settings)
    print(f"  samples: {len(rss)}; server processes at the end: {_processes(proc)}")
    print(_summary("RSS", rss, args.memory_minutes))
    print(_summary("private (RSS minus shared pages)", private, args.memory_minutes))
    print(_events_line(result, args.rate))
    print(
        f"  /score (light traffic): p50 {_pct(scores, 50):.2f} ms, p99 {_pct(scores, 99):.2f} ms "
        f"over {len(scores):,} calls; errors {dict(errors)}; server CPU {cores:.2f} cores busy"
    )
    print(
        f"  online store on disk: file {before['file']:,.0f} → {after['file']:,.0f} MiB, "
        f"WAL {before['wal']:,.0f} → {after['wal']:,.0f} MiB; stream_* tables "
        f"{before['stream']:,.1f} → {after['stream']:,.1f} MiB (tiles {before['tiles']:,} → "
        f"{after['tiles']:,} rows, applied ids {before['applied']:,} → {after['applied']:,})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000, help="/score calls in phase A")
    parser.add_argument("--batches", type=int, default=30, help="/score_batch calls in phase A")
    parser.add_argument("--rate", type=float, default=5000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of phase B")
    parser.add_argument("--memory-minutes", type=float, default=10.0, help="length of phase C")
    parser.add_argument(
        "--project", type=Path, help="a project built by bench_serving.py (copied, not changed)"
    )
    parser.add_argument(
        "--as-built", action="store_true", help="serve the project's champions, not streaming ones"
    )
    parser.add_argument(
        "--via",
        choices=["api", "stream"],
        default="api",
        help="events through POST /events, or a Redis Stream and a propensity stream process",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        t = time.perf_counter()
        if args.project is not None:
            _project(args.project, args.customers)  # built there first if it is not yet
            _working_copy(args.project, root)
        project = _project(root, args.customers)
        settings = project.settings
        ids = project.customers[: args.customers - 5]  # the last five are offline only
        if not args.as_built:
            _streaming_champions(settings)
        print(
            f"[{_load()}] project ready in {time.perf_counter() - t:.0f} s: {args.customers:,} "
            f"customers online, champions "
            f"{'as built' if args.as_built else 'churn on churn_v3, purchase on purchase_v2'}",
            flush=True,
        )
        env = _bench_env()
        env["PROPENSITY_CONFIG"] = str(root / "propensity.yaml")
        log = Path(tmp) / "server.log"
        t = time.perf_counter()
        proc, url = _start("propensity.serving.service:Scoring", env, log=log)
        client = _Client(url)
        consumer = _Consumer(root, Path(tmp)) if args.via == "stream" else None
        target = consumer.target if consumer is not None else url
        try:
            print(f"[{_load()}] server ready in {time.perf_counter() - t:.0f} s", flush=True)
            rng = np.random.default_rng(0)
            per_cycle = max(args.requests // args.batches, 1)
            _cycles(client, proc, ids, rng, 100, cycles=3)  # warm: threads, connections, pages
            print(
                f"[{_load()}] phase A: no events, {args.batches} cycles of {per_cycle} /score "
                "and one /score_batch of 1,000",
                flush=True,
            )
            a = _cycles(client, proc, ids, rng, per_cycle, cycles=args.batches)
            print(
                f"[{_load()}] phase B: the same cycles for {args.seconds:g} s, events at "
                f"{args.rate:,.0f}/s",
                flush=True,
            )
            producer = _Producer(target, ids, args.rate, seed=1)
            producer.go()
            try:
                b = _cycles(
                    client, proc, ids, rng, per_cycle, until=time.perf_counter() + args.seconds
                )
            finally:
                events = producer.stop()
            print(f"[{_load()}] phases A and B, server RSS {_memory(proc)[0]:,.0f} MiB")
            _side_by_side(a, b, args.rate)
            print(_events_line(events, args.rate))
            if args.memory_minutes > 0:
                _phase_c(client, proc, target, ids, args, settings)
            if consumer is not None:
                print(consumer.line())
            print(f"\n[{_load()}] done")
        finally:
            client.close()
            if consumer is not None:
                consumer.stop()
            family = _tree(proc)[1:]
            stop(proc)
            # BentoML's workers can outlive their parent.
            for child in psutil.wait_procs(family, timeout=20)[1]:
                child.kill()
            errors = [line for line in log.read_text().splitlines() if "Traceback" in line]
            if errors:
                print(f"server log: {len(errors)} tracebacks; its end:")
                print("\n".join(log.read_text().splitlines()[-30:]))


if __name__ == "__main__":
    main()
