"""Benchmark: live events into the streaming tiles (SQLite) and the event lake.

Prints, for the same simulated events in the same run:

* the baseline: ``propensity ingest`` of the events as one JSON Lines file (events/s);
* ``EventProcessor.process`` in process, batches of 500, flushes to the lake included;
* Feast's own ``store.push()`` of the same events, batches of 500, into a push-source
  feature view on SQLite (final values only: no tiles, no lake, no validation);
* ``POST /events`` on the real BentoML server, batches of 500 from ``--clients``
  concurrent clients, sustained for ``--seconds``; the read-your-writes check
  (after each answer, the tiles read back hold the batch's events); the
  server's resident memory (all its processes) at the start and the end.

    python benchmarks/bench_events.py [--customers 3000] [--seconds 30] [--clients 2]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pyarrow as pa

from propensity.config import load_settings
from propensity.events.ingest import ingest
from propensity.events.simulator import SimulationConfig, simulate
from propensity.features.tiles import STREAMING_NAMES, clock_micros
from propensity.streaming import EventProcessor

BATCH = 500


def _records(table: pa.Table) -> list[dict[str, Any]]:
    out = []
    for row in table.to_pylist():
        record = {k: v for k, v in row.items() if v is not None}
        record["event_timestamp"] = row["event_timestamp"].isoformat()
        out.append(record)
    return out


def _project(root: Path) -> Any:
    root.mkdir(parents=True)
    (root / "propensity.yaml").write_text("mlflow_tracking_uri: sqlite:///data/mlflow.db\n")
    return load_settings(root, environ={})


def _rss(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def _cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of a server and each of its processes, by pid."""
    proc = psutil.Process(pid)
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            out[p.pid] = times.user + times.system
    return out


def _relabel(records: list[dict[str, Any]], round_: int) -> list[dict[str, Any]]:
    # Fresh ids per round, so a sustained run keeps applying new events.
    return [{**r, "event_id": f"{r['event_id']}-{round_}"} for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()

    start = datetime.now(UTC).date() - timedelta(days=1)
    events = simulate(SimulationConfig(customers=args.customers, days=1, seed=3, start=start))
    table = events.events.sort_by("event_timestamp")
    records = _records(table)
    n = len(records)
    print(f"events: {n:,} from {args.customers:,} customers × 1 day")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        # Baseline: the file path, same events.
        settings = _project(base / "ingest")
        path = base / "events.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        t0 = time.perf_counter()
        ingest([path], settings.path(settings.lake_dir), settings.path(settings.quarantine_dir))
        ingest_rate = n / (time.perf_counter() - t0)
        print(f"baseline  propensity ingest (JSON Lines file):   {ingest_rate:>10,.0f} events/s")

        # In process: the processing path itself.
        settings = _project(base / "inproc")
        processor = EventProcessor(settings)
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            processor.process(records[i : i + BATCH])
        processor.flush()
        inproc = n / (time.perf_counter() - t0)
        print(
            f"EventProcessor.process, batches of {BATCH} + lake:  {inproc:>10,.0f} events/s "
            f"({inproc / ingest_rate:.2f}× baseline)"
        )

        # Feast's push of the same events, for comparison.
        from bench_stream import feast_push_store
        from feast.data_source import PushMode

        store = feast_push_store(base)
        frame = table.select(["customer_id", "event_timestamp", "event_type", "product_id",
                              "session_id"]).to_pandas()  # fmt: skip
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            store.push("events_push", frame.iloc[i : i + BATCH], to=PushMode.ONLINE)
        push = n / (time.perf_counter() - t0)
        print(
            f"Feast store.push(), batches of {BATCH}, SQLite:      {push:>10,.0f} events/s "
            f"(ours {inproc / push:.1f}× Feast's)"
        )

        # Over HTTP, the real server.
        settings = _project(base / "http")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
        environ.update(
            PROPENSITY_CONFIG=str(settings.root / "propensity.yaml"),
            BENTOML_HOME=str(base / "bentoml"),
            PROPENSITY_SERVING__BATCH_LIMIT=str(BATCH),
        )
        command = [
            sys.executable, "-m", "bentoml", "serve", "propensity.serving.service:Scoring",
            "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        log = open(base / "server.log", "wb")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            command, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/docs.json", timeout=2).status_code == 200:
                        break
                if server.poll() is not None:
                    raise SystemExit((base / "server.log").read_text()[-2000:])
                time.sleep(0.5)
            rss_start = _rss(server.pid)
            reader = EventProcessor(settings)
            stop_at = time.monotonic() + args.seconds
            sent = [0] * args.clients
            stale_reads = [0]
            batches = [records[i : i + BATCH] for i in range(0, n, BATCH)]
            column = STREAMING_NAMES.index("events_24h")

            def client(k: int) -> None:
                # A lean client, as bench_serving's: one keep-alive http.client connection and
                # orjson bodies (httpx and json.dumps took a fifth of a core on this machine).
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                headers = {"content-type": "application/json"}
                round_ = 0
                try:
                    while time.monotonic() < stop_at:
                        for j, batch in enumerate(batches):
                            if j % args.clients != k or time.monotonic() >= stop_at:
                                continue
                            body = _relabel(batch, round_)
                            customer = body[0]["customer_id"]
                            # The batch's own latest time: its events are inside every window.
                            clock = clock_micros(
                                datetime.fromisoformat(body[-1]["event_timestamp"])
                            )
                            before = reader.tiles.read([customer], clock)[0, column]
                            payload = orjson.dumps({"events": body})
                            connection.request("POST", "/events", payload, headers)
                            answer = connection.getresponse()
                            data = answer.read()
                            if answer.status != 200:
                                raise RuntimeError(
                                    f"/events answered {answer.status}: {data[:300]!r}"
                                )
                            sent[k] += orjson.loads(data)["accepted"]
                            after = reader.tiles.read([customer], clock)[0, column]
                            mine = sum(1 for r in body if r["customer_id"] == customer)
                            if after - before < mine:
                                stale_reads[0] += 1
                        round_ += 1
                finally:
                    connection.close()

            cpu_start = _cpu(server.pid)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - t0
            cpu_end = _cpu(server.pid)
            rss_end = _rss(server.pid)
            rate = sum(sent) / elapsed
            print(
                f"POST /events, batches of {BATCH}, {args.clients} clients, "
                f"{elapsed:.0f} s: {rate:>10,.0f} events/s ({rate / ingest_rate:.2f}× baseline)"
            )
            print(
                f"read-your-writes: {stale_reads[0]} of {sum(sent) // BATCH} answers "
                "not yet visible in the tiles (0 expected)"
            )
            print(f"server memory: {rss_start:,.0f} MB at start, {rss_end:,.0f} MB at the end")
            busy = sorted(
                ((cpu_end[pid] - cpu_start.get(pid, 0.0)) / elapsed for pid in cpu_end),
                reverse=True,
            )
            shown = ", ".join(f"{c:.2f}" for c in busy if c > 0.01)
            print(f"server CPU, cores per process: {shown}")
        finally:
            # The workers too: BentoML's outlive a lone parent.
            family = [psutil.Process(server.pid)]
            with contextlib.suppress(psutil.Error):
                family += family[0].children(recursive=True)
            for proc in family:
                with contextlib.suppress(psutil.Error):
                    proc.terminate()
            for proc in psutil.wait_procs(family, timeout=30)[1]:
                proc.kill()
            server.wait(timeout=30)
            log.close()


if __name__ == "__main__":
    main()
