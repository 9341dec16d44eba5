"""Benchmark: the feature build and bulk scoring, DuckDB / in-process vs Spark, one run.

For each event count: the same synthetic events (``bench_features.synthetic_events``,
one customer per ``--per-customer`` events (100), 26 weekly snapshots) are written as
Parquet, then the DuckDB build and the Spark build (``local[2]``, written as Parquet by
the executors) run on them; printed are wall time, peak memory (this process and its children: the
Spark JVM), and Spark's microseconds per event, whose ratio across sizes says
whether its cost per event stays flat. Then bulk scoring of ``--customers``
customers with three models (churn, purchase, next-best-action): the in-process
``score_table`` against ``mapInPandas`` on Spark.

    python benchmarks/bench_spark.py --events 1000000 10000000 --customers 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serving"))

from bench_features import synthetic_events  # noqa: E402

from propensity.config import Spark  # noqa: E402
from propensity.features.definitions import FEATURES  # noqa: E402
from propensity.features.snapshots import compute_features, snapshot_times  # noqa: E402
from propensity.spark.features import compute_features_spark, read_events  # noqa: E402
from propensity.spark.session import spark_session  # noqa: E402


class PeakTreeRSS:
    """Peak resident memory of this process plus its children (the JVM), sampled."""

    def __enter__(self) -> PeakTreeRSS:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.05):
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a child may exit meanwhile
                    total += child.memory_info().rss
            self.peak = max(self.peak, total)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _measure(fn: Callable[[], Any]) -> tuple[float, float]:
    with PeakTreeRSS() as rss:
        began = time.perf_counter()
        fn()
        seconds = time.perf_counter() - began
    return seconds, rss.peak / 2**30


def bench_features(
    spark: Any, sizes: list[int], days: int, folder: Path, per_customer: int = 100
) -> None:
    print(f"{per_customer} events per customer, 26 weekly snapshots")
    print(f"{'events':>12} {'duckdb s':>9} {'GB':>5} {'spark s':>9} {'GB':>5} {'spark us/ev':>11}")
    per_event = []
    for n in sizes:
        path = folder / f"events-{n}.parquet"
        customers = max(n // per_customer, 100)
        pq.write_table(synthetic_events(customers, n, days, seed=1), path)
        end = pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=days)
        times = snapshot_times(end - pd.Timedelta(days=7 * 25), end, daily_days=0)
        duck = _measure(lambda: compute_features(f"read_parquet('{path}')", times))  # noqa: B023
        out = folder / f"spark-{n}"

        def run_spark() -> None:
            frame = compute_features_spark(spark, read_events(spark, [path]), times)  # noqa: B023
            frame.write.mode("overwrite").parquet(str(out))  # noqa: B023

        sp = _measure(run_spark)
        per_event.append(sp[0] / n * 1e6)
        print(
            f"{n:>12,} {duck[0]:>9.1f} {duck[1]:>5.2f} {sp[0]:>9.1f} {sp[1]:>5.2f} "
            f"{per_event[-1]:>11.2f}"
        )
    for n, cost in zip(sizes[1:], per_event[1:], strict=True):
        print(f"spark cost per event at {n:,} / at {sizes[0]:,}: {cost / per_event[0]:.2f}")


def bench_scoring(spark: Any, customers: int, folder: Path) -> None:
    from project import fit_model, fit_nba

    from propensity.pipeline.score import _nba_columns, score_table
    from propensity.spark.score import score_frame_spark

    names = [f.name for f in FEATURES]
    churn = fit_model(names[:30], seed=1, n_rows=6000, n_estimators=300, early_stopping_rounds=None)
    purchase = fit_model(
        names[5:35], seed=2, n_rows=6000, n_estimators=250, early_stopping_rounds=None
    )
    nba = fit_nba(names[:20], seed=3, n_rows=6000, n_estimators=100)
    columns = list(
        dict.fromkeys([*churn.feature_names_, *purchase.feature_names_, *_nba_columns(nba)])
    )
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.gamma(2.0, 3.0, size=(customers, len(columns))), columns=columns)
    frame.insert(0, "customer_id", [f"C{i:08d}" for i in range(customers)])
    path = folder / "scoring.parquet"
    frame.to_parquet(path, index=False)
    local = _measure(lambda: score_table(pd.read_parquet(path), churn, purchase, nba))

    def run_spark() -> None:
        scores = score_frame_spark(spark.read.parquet(str(path)), churn, purchase, nba)
        scores.write.mode("overwrite").parquet(str(folder / "scores"))

    sp = _measure(run_spark)
    print(
        f"bulk scoring {customers:,} customers x 3 models: in-process {local[0]:.1f} s "
        f"({local[1]:.2f} GB), Spark local[2] {sp[0]:.1f} s ({sp[1]:.2f} GB), "
        f"ratio Spark / in-process {sp[0] / local[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--per-customer", type=int, default=100, help="events per customer")
    parser.add_argument("--customers", type=int, default=1_000_000, help="bulk scoring rows")
    parser.add_argument("--no-scoring", action="store_true", help="only the feature build")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    spark = spark_session(Spark(master=args.master, driver_memory="6g", shuffle_partitions=8))
    spark.sql("SELECT 1").collect()  # JVM start-up is not the build's cost
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        bench_features(spark, sorted(args.events), args.days, Path(tmp), args.per_customer)
        if not args.no_scoring:
            bench_scoring(spark, args.customers, Path(tmp))


if __name__ == "__main__":
    main()
