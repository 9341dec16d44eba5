"""Benchmark: feature SQL over 100k customers / 10M events, 26 weekly snapshots.

Prints the DuckDB build time and peak memory for all registry features, beside a
plain pandas implementation of three of the same features (sessions_30d,
revenue_90d, days_since_last_purchase) run in the same process, and the ratio.

    python benchmarks/bench_features.py [--customers 100000] [--events 10000000]
    python benchmarks/bench_features.py --source simulator --customers 20000 --days 180
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
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.events.schema import ARROW_SCHEMA
from propensity.features.definitions import FEATURES
from propensity.features.snapshots import compute_features, snapshot_times, snapshot_times_for

TYPES = np.array(
    [
        "session_start",
        "page_view",
        "product_view",
        "search",
        "add_to_cart",
        "checkout_start",
        "purchase",
        "feature_use",
        "email_open",
        "email_click",
        "support_ticket",
        "campaign_exposure",
    ]
)
WEIGHTS = np.array([10, 30, 20, 8, 6, 3, 3, 10, 4, 2, 0.5, 3.5])


def _strings(prefix: str, values: np.ndarray) -> pa.Array:
    # Arrow casts integers to strings ~50x faster than numpy's char functions.
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")


def synthetic_events(
    customers: int, events: int, days: int, seed: int, first_id: int = 0
) -> pa.Table:
    """Vectorized random events in the canonical schema.

    ``first_id`` numbers the event and order ids from there, so tables generated
    in chunks (another seed each) share customers but never an id.
    """
    rng = np.random.default_rng(seed)
    activity = rng.gamma(0.8, 1.0, customers)
    cust = rng.choice(customers, events, p=activity / activity.sum())
    start = np.datetime64("2024-01-01T00:00:00", "us")
    offset = rng.integers(0, days * 86_400_000_000, events)
    code = rng.choice(len(TYPES), events, p=WEIGHTS / WEIGHTS.sum())
    kind = TYPES[code]
    purchase = kind == "purchase"
    names = pa.array([f"C{i:07d}" for i in range(customers)])
    feature = np.where(kind == "feature_use", rng.integers(0, 25, events), -1)
    action = np.where(kind == "campaign_exposure", rng.integers(0, 3, events), -1)
    cols = {
        "customer_id": names.take(pa.array(cust)),
        "event_id": _strings("E", np.arange(first_id, first_id + events)),
        "event_timestamp": pa.array(start + offset.astype("timedelta64[us]"), pa.timestamp("us")),
        "event_type": pa.array(TYPES).take(pa.array(code)),
        "session_id": _strings("S", cust * 1000 + offset // 3_600_000_000 % 1000),
        "order_id": pc.if_else(
            pa.array(purchase),
            _strings("O", np.arange(first_id, first_id + events)),
            pa.scalar(None, pa.string()),
        ),
        "price": np.where(purchase, rng.gamma(2.0, 20.0, events), np.nan),
        "quantity": np.where(purchase, rng.integers(1, 4, events).astype(float), np.nan),
        "feature_name": pa.array([f"f{i}" for i in range(25)]).take(
            pa.array(feature, mask=feature < 0)
        ),
        "action": pa.array(["discount", "loyalty_points", "control"]).take(
            pa.array(action, mask=action < 0)
        ),
    }
    arrays = []
    for field in ARROW_SCHEMA:
        if field.name in cols:
            values = cols[field.name]
            if isinstance(values, np.ndarray):
                arrays.append(pa.array(values, field.type, from_pandas=True))
            else:
                arrays.append(values.cast(field.type))
        else:
            arrays.append(pa.nulls(events, field.type))
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)


def simulated_events(customers: int, days: int, seed: int) -> pa.Table:
    """Realistic events from the package's simulator (heavier than synthetic_events)."""
    from propensity.events.simulator import SimulationConfig, simulate

    return simulate(SimulationConfig(customers=customers, days=days, seed=seed)).events


def pandas_baseline(path: Path, times: list[pd.Timestamp]) -> pd.DataFrame:
    """Three features the naive way: filter the events for every snapshot."""
    ev = pd.read_parquet(
        path, columns=["customer_id", "event_timestamp", "event_type", "price", "quantity"]
    )
    ev["revenue"] = ev["price"] * ev["quantity"]
    out = []
    for t in times:
        past = ev[ev["event_timestamp"] < t]
        present = pd.DataFrame(index=pd.Index(past["customer_id"].unique(), name="customer_id"))
        s = past[
            (past["event_type"] == "session_start")
            & (past["event_timestamp"] >= t - pd.Timedelta(days=30))
        ]
        present["sessions_30d"] = s.groupby("customer_id").size()
        p = past[past["event_type"] == "purchase"]
        recent = p[p["event_timestamp"] >= t - pd.Timedelta(days=90)]
        present["revenue_90d"] = recent.groupby("customer_id")["revenue"].sum()
        last = p.groupby("customer_id")["event_timestamp"].max()
        present["days_since_last_purchase"] = (t - last).dt.total_seconds() / 86400
        present[["sessions_30d", "revenue_90d"]] = present[["sessions_30d", "revenue_90d"]].fillna(
            0
        )
        out.append(present.reset_index().assign(event_timestamp=t))
    return pd.concat(out, ignore_index=True)


class PeakRSS:
    """Sample the process RSS in a thread (resource's ru_maxrss never goes down)."""

    def __enter__(self) -> PeakRSS:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--snapshots", type=int, default=26)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--source",
        choices=["synthetic", "simulator"],
        default="synthetic",
        help="simulator: the package's simulator, snapshots as build_features picks them",
    )
    parser.add_argument("--memory-limit", default="2.5GB", help="DuckDB memory_limit (spills)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the pandas baseline")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.parquet"
        t0 = time.perf_counter()
        if args.source == "simulator":
            events = simulated_events(args.customers, args.days, args.seed)
            stamps = events["event_timestamp"]
            times = snapshot_times_for(pc.min(stamps).as_py(), pc.max(stamps).as_py())
        else:
            events = synthetic_events(args.customers, args.events, args.days, args.seed)
            end = pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=args.days)
            times = snapshot_times(
                end - pd.Timedelta(weeks=args.snapshots - 1),
                end,
                daily_days=0,
                weekday=end.weekday(),
            )
        pq.write_table(events, path)
        print(
            f"{args.source}: {events.num_rows:,} events for {args.customers:,} customers "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        del events
        # Arrow's allocator keeps the generator's freed memory: hand it back so the
        # baseline is the process, not the synthetic data.
        pa.default_memory_pool().release_unused()
        rss0 = psutil.Process().memory_info().rss
        print(f"process RSS before the query: {rss0 / 2**30:.2f} GB")
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            frame = compute_features(
                f"read_parquet('{path}')", times, memory_limit=args.memory_limit, threads=2
            )
            sql_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"duckdb: {len(FEATURES)} features x {len(times)} snapshots = {len(frame):,} rows "
            f"in {sql_s:.1f} s (CPU {cpu_s:.1f} s), peak RSS {mem.peak / 2**30:.2f} GB "
            f"(+{(mem.peak - rss0) / 2**30:.2f} GB)"
        )
        # Other processes on the machine slow the query down: say how busy it was.
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average (1, 5, 15 min) after the query: {load} on {os.cpu_count()} CPUs")
        del frame
        if args.no_baseline:
            return
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            base = pandas_baseline(path, times)
            pd_s = time.perf_counter() - t0
        print(
            f"pandas baseline: 3 features x {len(times)} snapshots = {len(base):,} rows "
            f"in {pd_s:.1f} s, peak RSS {mem.peak / 2**30:.2f} GB"
        )
        print(f"ratio pandas(3 features) / duckdb({len(FEATURES)} features) = {pd_s / sql_s:.2f}")
        print(
            f"max RSS of the process (resource): "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"
        )


if __name__ == "__main__":
    main()
