"""Benchmark: in-process get_online_features for churn_v2, 1 and 1,000 customers.

Builds features for a seeded random population, materializes them into SQLite
(stock Feast path) and times ``FeatureStoreAdapter.online`` (p50 / p99).

    python benchmarks/bench_online.py [--customers 5000] [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.features.snapshots import build_features
from propensity.features.store import FeatureStoreAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_features import synthetic_events  # noqa: E402


def _timed(call, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50)) * 1e3, float(np.percentile(times, 99)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1] / "feature_repo"
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(root=Path(tmp), feature_repo=repo)
        EventLake(settings.path(settings.lake_dir)).append(
            synthetic_events(args.customers, args.events, 120, seed=3)
        )
        end = pd.Timestamp("2024-04-29", tz="UTC")
        build_features(settings, [end - pd.Timedelta(days=7), end])
        store = FeatureStoreAdapter(settings)
        t0 = time.perf_counter()
        store.apply()
        print(f"apply: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        store.materialize()
        print(f"materialize {args.customers:,} customers (stock): {time.perf_counter() - t0:.1f} s")
        ids = [f"C{i:07d}" for i in range(args.customers)]
        rng = np.random.default_rng(0)
        n_feat = len(store.service_features("churn_v2"))
        store.online(ids[:1], "churn_v2", request_time=end)  # warm the registry cache
        for n, repeats in ((1, args.repeats), (1000, max(10, args.repeats // 10))):
            p50, p99 = _timed(
                lambda n=n: store.online(
                    list(rng.choice(ids, n, replace=False)), "churn_v2", request_time=end
                ),
                repeats,
            )
            print(
                f"online churn_v2 ({n_feat} features), {n:>5} customers: "
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms ({repeats} calls)"
            )


if __name__ == "__main__":
    main()
