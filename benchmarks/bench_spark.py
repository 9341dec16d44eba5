"""Benchmark: the feature build and bulk scoring, DuckDB / in-process vs Spark, one run.

For each event count: the same synthetic events (``bench_features.synthetic_events``,
one customer per ``--per-customer`` events (100), 26 weekly snapshots) are written as
Parquet, then the DuckDB build and the Spark build (``local[2]``, written as Parquet by
the executors) run on them, each in a fresh process; printed are wall time, peak memory
(that process and its children: the Spark JVM), and Spark's microseconds per event,
whose ratio across sizes says whether its cost per event stays flat. Then bulk scoring
of ``--customers`` customers with three models (churn, purchase, next-best-action): the
in-process ``score_table`` against ``mapInPandas`` on Spark, and the two classifiers
through ``mlflow.pyfunc.spark_udf`` against ``mapInPandas`` with the same two.

    python benchmarks/bench_spark.py --events 1000000 10000000 30000000 --customers 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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
    """Peak resident memory of a process tree (a process and its children), sampled."""

    def __init__(self, pid: int | None = None) -> None:
        self._pid = pid

    def __enter__(self) -> PeakTreeRSS:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        root = psutil.Process(self._pid)
        while not self._stop.wait(0.05):
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a child may exit meanwhile
                    total += proc.memory_info().rss
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


def _build(engine: str, paths: list[str], times: list[Any], out: str, master: str) -> float:
    """One feature build in this (child) process; its wall time, start-up excluded."""
    if engine == "duckdb":
        began = time.perf_counter()
        compute_features(f"read_parquet({paths!r})", times)
        return time.perf_counter() - began
    spark = spark_session(Spark(master=master, driver_memory="6g", shuffle_partitions=8))
    spark.sql("SELECT 1").collect()  # JVM start-up is not the build's cost
    began = time.perf_counter()
    compute_features_spark(spark, read_events(spark, paths), times).write.mode("overwrite").parquet(
        out
    )
    return time.perf_counter() - began


def _measure_child(*args: Any) -> tuple[float, float]:
    """Run :func:`_build` in a fresh process: its time and the peak memory of its tree.

    A fresh process per build, so neither engine's peak includes memory the other
    (or the event generator) left allocated.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        pool.submit(int).result()  # the worker is up and imported
        pid = next(iter(pool._processes))  # noqa: SLF001 -- the worker to watch
        with PeakTreeRSS(pid) as rss:
            seconds = pool.submit(_build, *args).result()
    return seconds, rss.peak / 2**30


def _write_events(folder: Path, n: int, customers: int, days: int) -> list[str]:
    """``n`` synthetic events as Parquet files of at most 5M rows (bounded generator memory)."""
    chunk, paths = 5_000_000, []
    for part, first in enumerate(range(0, n, chunk)):
        path = folder / f"events-{n}-{part}.parquet"
        table = synthetic_events(customers, min(chunk, n - first), days, 1 + part, first)
        pq.write_table(table, path)
        paths.append(str(path))
    return paths


def bench_features(
    sizes: list[int], days: int, folder: Path, per_customer: int = 100, master: str = "local[2]"
) -> None:
    print(f"{per_customer} events per customer, 26 weekly snapshots; each build in a fresh process")
    print(f"{'events':>12} {'duckdb s':>9} {'GB':>5} {'spark s':>9} {'GB':>5} {'spark us/ev':>11}")
    per_event = []
    for n in sizes:
        paths = _write_events(folder, n, max(n // per_customer, 100), days)
        end = pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=days)
        times = snapshot_times(end - pd.Timedelta(days=7 * 25), end, daily_days=0)
        out = str(folder / f"spark-{n}")
        duck = _measure_child("duckdb", paths, times, out, master)
        sp = _measure_child("spark", paths, times, out, master)
        per_event.append(sp[0] / n * 1e6)
        print(
            f"{n:>12,} {duck[0]:>9.1f} {duck[1]:>5.2f} {sp[0]:>9.1f} {sp[1]:>5.2f} "
            f"{per_event[-1]:>11.2f}",
            flush=True,
        )
        for path in paths:
            Path(path).unlink()
    for k in range(1, len(sizes)):
        print(
            f"spark cost per event at {sizes[k]:,} / at {sizes[0]:,}: "
            f"{per_event[k] / per_event[0]:.2f}; / at {sizes[k - 1]:,}: "
            f"{per_event[k] / per_event[k - 1]:.2f}"
        )


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
        f"({local[1]:.2f} GB), Spark local[2] mapInPandas {sp[0]:.1f} s ({sp[1]:.2f} GB), "
        f"ratio Spark / in-process {sp[0] / local[0]:.2f}",
        flush=True,
    )
    bench_spark_udf(spark, path, {"churn": churn, "purchase": purchase}, folder)


def bench_spark_udf(spark: Any, path: Path, models: dict[str, Any], folder: Path) -> None:
    """The same two classifiers through ``mlflow.pyfunc.spark_udf`` (local environment).

    Printed beside ``mapInPandas`` with the same two models, on the same frame;
    the scores must agree. ``env_manager="local"`` because restoring a virtualenv
    or conda environment per executor needs network access and minutes per model.
    """
    import mlflow

    from propensity.registry import log_run
    from propensity.spark.score import score_frame_spark

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    frame = spark.read.parquet(str(path))
    example = pd.read_parquet(path).head(5)
    columns = []
    for name, model in models.items():
        log_run(
            uri,
            name,
            estimator=model,
            input_example=example[model.feature_names_],
            register_as=name,
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, model in models.items():
        udf = mlflow.pyfunc.spark_udf(
            spark, f"models:/{name}/1", result_type="double", env_manager="local"
        )
        columns.append(udf(*model.feature_names_).alias(name))

    def run_udf() -> None:
        frame.select("customer_id", *columns).write.mode("overwrite").parquet(
            str(folder / "udf-scores")
        )

    def run_map() -> None:
        scores = score_frame_spark(frame, models["churn"], models["purchase"])
        scores.write.mode("overwrite").parquet(str(folder / "map-scores"))

    udf_time, udf_gb = _measure(run_udf)
    map_time, map_gb = _measure(run_map)
    by_udf = pd.read_parquet(folder / "udf-scores").sort_values("customer_id")
    by_map = pd.read_parquet(folder / "map-scores").sort_values("customer_id")
    gap = max(
        float(np.abs(by_udf["churn"].to_numpy() - by_map["churn"].to_numpy()).max()),
        float(
            np.abs(by_udf["purchase"].to_numpy() - by_map["purchase_propensity"].to_numpy()).max()
        ),
    )
    print(
        f"two models through spark_udf {udf_time:.1f} s ({udf_gb:.2f} GB) vs mapInPandas "
        f"{map_time:.1f} s ({map_gb:.2f} GB), ratio {udf_time / map_time:.2f}; "
        f"largest score difference {gap:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000]
    )
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--per-customer", type=int, default=100, help="events per customer")
    parser.add_argument("--customers", type=int, default=1_000_000, help="bulk scoring rows")
    parser.add_argument("--no-scoring", action="store_true", help="only the feature build")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        bench_features(sorted(args.events), args.days, Path(tmp), args.per_customer, args.master)
        if not args.no_scoring:
            spark = spark_session(
                Spark(master=args.master, driver_memory="6g", shuffle_partitions=8)
            )
            spark.sql("SELECT 1").collect()  # JVM start-up is not the scoring's cost
            bench_scoring(spark, args.customers, Path(tmp))


if __name__ == "__main__":
    main()
