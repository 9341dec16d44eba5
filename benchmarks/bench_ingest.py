"""Benchmark: ingest synthetic canonical events (Parquet) into an empty lake, then re-ingest.

Prints wall and CPU seconds, events/s, peak RSS (absolute and above the
process's baseline) and the machine's load average for the first ingest (all
rows new) and the re-ingest (all rows duplicates).

    python benchmarks/bench_ingest.py --rows 10000000
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.events.ingest import ingest
from propensity.events.lake import EventLake
from propensity.events.schema import ARROW_SCHEMA, EVENT_TYPES

_TYPES = [t for t in EVENT_TYPES if t != "campaign_exposure"]


def make_events(rows: int, customers: int, seed: int) -> pa.Table:
    """Random canonical events over one year (fast: vectorized numpy)."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-01-01T00:00:00", "us").astype(np.int64)
    span = 365 * 86_400 * 1_000_000
    customer = rng.integers(0, customers, rows)
    kinds = rng.integers(0, len(_TYPES), rows)
    types = pa.DictionaryArray.from_arrays(pa.array(kinds, pa.int32()), pa.array(_TYPES))
    is_purchase = types.indices.to_numpy() == _TYPES.index("purchase")
    prices = np.round(rng.gamma(2.0, 20.0, rows), 2)
    cust_ids = pa.array(np.char.add("C", np.char.zfill(customer.astype(str), 7)))
    event_ids = pa.array(np.char.add("E", np.arange(rows).astype(str)))
    columns = {f.name: pa.nulls(rows, f.type) for f in ARROW_SCHEMA}
    columns.update(
        customer_id=cust_ids,
        event_id=event_ids,
        event_timestamp=pa.array(start + rng.integers(0, span, rows), pa.timestamp("us", tz="UTC")),
        event_type=types.cast(pa.string()),
        session_id=pa.array(np.char.add("S", (np.arange(rows) // 8).astype(str))),
        price=pa.array(np.where(is_purchase, prices, np.nan), from_pandas=True),
        quantity=pa.array(np.where(is_purchase, 1.0, np.nan), from_pandas=True),
        device=pa.array(np.array(["desktop", "mobile", "tablet"])[rng.integers(0, 3, rows)]),
    )
    return pa.table(columns).cast(pa.schema([pa.field(f.name, f.type) for f in ARROW_SCHEMA]))


class _PeakRSS:
    """Samples this process's RSS every 50 ms (ru_maxrss cannot be reset between phases)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        events = make_events(args.rows, args.customers, args.seed)
        source = root / "events.parquet"
        pq.write_table(events, source, row_group_size=1_000_000)
        del events
        print(f"generated {args.rows:,} events in {time.perf_counter() - t0:.1f} s", flush=True)
        lake = EventLake(root / "lake")
        base_rss = psutil.Process().memory_info().rss
        for label in ("first ingest (all new)", "re-ingest (all duplicates)"):
            with _PeakRSS() as rss:
                cpu0 = sum(psutil.Process().cpu_times()[:2])
                t0 = time.perf_counter()
                report = ingest([source], lake, root / "quarantine")
                seconds = time.perf_counter() - t0
                # CPU seconds are reported too: wall time is unreliable on a busy machine.
                cpu = sum(psutil.Process().cpu_times()[:2]) - cpu0
            load = os.getloadavg()
            print(
                f"{label}: {seconds:.1f} s wall, {cpu:.1f} s CPU, "
                f"{report.read / seconds:,.0f} events/s, "
                f"accepted={report.accepted:,} duplicates={report.duplicates:,}, "
                f"peak RSS {rss.peak / 2**30:.2f} GB "
                f"(+{(rss.peak - base_rss) / 2**30:.2f} GB above the baseline "
                f"{base_rss / 2**30:.2f} GB), "
                f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)",
                flush=True,
            )
        maxrss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"process max RSS over the whole run: {maxrss_gb:.2f} GB; "
            f"lake files {len(lake.files())}"
        )


if __name__ == "__main__":
    main()
