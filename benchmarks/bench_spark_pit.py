"""Benchmark: point-in-time training frames on Spark, ours against Feast's Spark offline store.

One project lake (``bench_features.synthetic_events``, weekly snapshots) is built
into the partitioned Spark tables ``features_dir/spark/<view>/snapshot=YYYY-MM-DD/``
by ``build_features_spark``. The same entity frame (customers x cutoffs: on a
snapshot, between snapshots, and past the TTL of the last one) is then joined to
the service's batch views, each written to Parquet by the executors, ``--runs``
times in alternation:

(a) ours, ``training_frame_spark`` (it also computes the service's on-demand
    feature, in ``mapInPandas``: that is part of its time);
(b) Feast's Spark offline store, ``get_historical_features(...).to_spark_df()``,
    in a temporary Feast repo (file registry, SQLite online store) whose views are
    the project's views (same schema and TTL) over ``SparkSource``s on the SAME
    tables (``date_partition_column="snapshot"``). Batch views only: Feast's Spark
    store does not compute on-demand views.

Printed: medians and the ratio b / a, then (b) compared with (a) cell by cell
(to 1e-9, NaN equal to NaN), with the mismatching cells per feature.

    python benchmarks/bench_spark_pit.py --customers 20000 --events 2000000 --cutoffs 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_features import synthetic_events  # noqa: E402

from propensity.config import Settings, Spark  # noqa: E402
from propensity.events.lake import EventLake  # noqa: E402
from propensity.features.definitions import ENTITY, features_of, service_views  # noqa: E402
from propensity.features.snapshots import TIMESTAMP, snapshot_times  # noqa: E402
from propensity.features.store import FeatureStoreAdapter  # noqa: E402
from propensity.spark.features import PARTITION, build_features_spark, spark_table_path  # noqa: E402
from propensity.spark.session import spark_session  # noqa: E402
from propensity.spark.training import training_frame_spark  # noqa: E402

FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"
START = pd.Timestamp("2024-01-01", tz="UTC")


#: The one session of both joins: two cores, few shuffle partitions.
SESSION = Spark(master="local[2]", shuffle_partitions=4)


def build_project(root: Path, customers: int, events: int, days: int, spark: Any) -> Settings:
    """A project lake of synthetic events and its Spark feature tables (26 weekly snapshots)."""
    settings = Settings(root=root, feature_repo=FEATURE_REPO, spark=SESSION)
    EventLake(settings.path(settings.lake_dir)).append(
        synthetic_events(customers, events, days, seed=1)
    )
    end = START + pd.Timedelta(days=days)
    times = snapshot_times(end - pd.Timedelta(days=7 * 25), end, daily_days=0)
    build_features_spark(settings, times, spark=spark)
    return settings


def entity_rows(customers: int, cutoffs: int, last: pd.Timestamp, seed: int) -> pd.DataFrame:
    """customers x cutoffs: on snapshots, between them, and one past the last TTL (no features).

    Ids run past the lake's customers by 2 % (rows with no snapshot at all); the
    cutoffs step back weekly from ``last`` with a seeded offset of 0-6 days each.
    """
    rng = np.random.default_rng(seed)
    stamps = [last + pd.Timedelta(days=12)]  # 12 days after the last snapshot: past its 8-day TTL
    for k in range(1, cutoffs):
        stamps.append(
            last - pd.Timedelta(days=7 * k) + pd.Timedelta(hours=int(rng.integers(0, 7 * 24)))
        )
    stamps[1] = last  # exactly on a snapshot (the inclusive bound)
    ids = [f"C{i:07d}" for i in range(int(customers * 1.02))]
    frame = pd.DataFrame([(c, t) for t in sorted(stamps) for c in ids], columns=[ENTITY, TIMESTAMP])
    frame["label"] = rng.integers(0, 2, len(frame)).astype("int8")
    return frame


def feast_spark_store(root: Path, settings: Settings, views: list[str]) -> Any:
    """A Feast repo whose batch views are the project's, over SparkSources on the Spark tables."""
    from feast import FeatureStore, FeatureView
    from feast.infra.offline_stores.contrib.spark_offline_store.spark import (
        SparkOfflineStoreConfig,
    )
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
    from feast.repo_config import RepoConfig

    # After Feast's own import-time filter: its "experimental" notes on every call.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="feast")

    project = {o.name: o for o in FeatureStoreAdapter(settings).definitions()}
    features_dir = settings.path(settings.features_dir)
    objects: list[Any] = [project["customer"]]
    for view in views:
        ours = project[view]  # same entity, schema and TTL as the project's Feast view
        objects.append(
            FeatureView(
                name=view,
                entities=[project["customer"]],
                ttl=ours.ttl,
                schema=ours.schema,
                online=False,
                source=SparkSource(
                    name=f"{view}_spark",
                    path=str(spark_table_path(features_dir, view)),
                    file_format="parquet",
                    timestamp_field=TIMESTAMP,
                    date_partition_column=PARTITION,
                ),
            )
        )
    repo = root / "feast_spark_repo"
    repo.mkdir()
    config = RepoConfig(
        project="pit_bench",
        provider="local",
        registry={"registry_type": "file", "path": str(repo / "registry.db")},
        offline_store=SparkOfflineStoreConfig(),
        online_store={"type": "sqlite", "path": str(repo / "online.db")},
        entity_key_serialization_version=3,
        repo_path=str(repo),
    )
    store = FeatureStore(config=config)
    store.apply(objects)
    return store


def _timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def compare(ours: pd.DataFrame, feast: pd.DataFrame, names: list[str]) -> dict[str, Any]:
    """Mismatching cells of ``feast`` against ``ours``, per feature, on the same (row, cutoff)."""
    key = [TIMESTAMP, ENTITY]
    for frame in (ours, feast):
        frame[TIMESTAMP] = pd.to_datetime(frame[TIMESTAMP], utc=True)
    joined = ours.merge(feast, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
    out: dict[str, Any] = {
        "rows_a": len(ours),
        "rows_b": len(feast),
        "only_a": int((joined["_merge"] == "left_only").sum()),
        "only_b": int((joined["_merge"] == "right_only").sum()),
        "features": {},
    }
    both = joined[joined["_merge"] == "both"]
    bad_rows = np.zeros(len(both), bool)
    for name in names:
        a = both[f"{name}_a"].to_numpy(np.float64)
        b = both[f"{name}_b"].to_numpy(np.float64)
        same = np.isclose(a, b, rtol=1e-9, atol=1e-9) | (np.isnan(a) & np.isnan(b))
        out["features"][name] = int((~same).sum())
        bad_rows |= ~same
    out["labels_differ"] = int((both["label_a"] != both["label_b"]).sum())
    out["bad_cutoffs"] = both.loc[bad_rows, TIMESTAMP].value_counts().sort_index().to_dict()
    out["null_a"] = int(both[[f"{n}_a" for n in names]].isna().to_numpy().sum())
    out["null_b"] = int(both[[f"{n}_b" for n in names]].isna().to_numpy().sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--cutoffs", type=int, default=10, help="entity rows = customers x this")
    parser.add_argument("--service", default="churn_v1")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.cutoffs < 2:
        parser.error("--cutoffs must be at least 2 (one past the TTL, one on a snapshot)")
    spark = spark_session(SESSION)
    spark.sql("SELECT 1").collect()  # JVM start-up is no one's cost
    views = [v for v in service_views(args.service) if v != "request_features"]
    names = [f.name for v in views for f in features_of(v)]
    with tempfile.TemporaryDirectory(prefix="bench-spark-pit-") as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        settings = build_project(root / "project", args.customers, args.events, args.days, spark)
        last = max(
            pd.Timestamp(p.name.split("=", 1)[1], tz="UTC")
            for p in spark_table_path(settings.path(settings.features_dir), "session").iterdir()
        )
        print(
            f"lake: {args.events:,} events, {args.customers:,} customers, Spark tables of "
            f"{len(views)} views built in {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        entity_path = root / "entity.parquet"
        entity_rows(args.customers, args.cutoffs, last, seed=7).to_parquet(
            entity_path, index=False, coerce_timestamps="us"
        )
        # Both joins read the same entity rows from Parquet, as a Spark frame.
        entity = spark.read.parquet(str(entity_path))
        rows = entity.count()
        store = feast_spark_store(root, settings, views)
        ttls = {v: store.get_feature_view(v).ttl.total_seconds() for v in views}
        refs = [f"{v}:{f.name}" for v in views for f in features_of(v)]
        out_a, out_b = root / "ours", root / "feast"

        def ours() -> None:
            frame = training_frame_spark(settings, spark, entity, args.service, ttls)
            frame.write.mode("overwrite").parquet(str(out_a))

        def feast() -> None:
            job = store.get_historical_features(entity_df=entity, features=refs)
            job.to_spark_df().write.mode("overwrite").parquet(str(out_b))

        times: dict[str, list[float]] = {"ours": [], "feast": []}
        error = None
        for run in range(args.runs):
            times["ours"].append(_timed(ours))
            if error is None:
                try:
                    times["feast"].append(_timed(feast))
                except Exception as exc:  # report Feast's failure, keep measuring ours
                    error = f"{type(exc).__name__}: {exc}"
            print(
                f"run {run + 1}: ours {times['ours'][-1]:.2f} s"
                + (f", feast {times['feast'][-1]:.2f} s" if error is None else ""),
                flush=True,
            )
        a = statistics.median(times["ours"])
        print(
            f"entity rows {rows:,} ({args.cutoffs} cutoffs), {len(views)} batch views, "
            f"{len(names)} features, service {args.service}"
        )
        print(f"(a) ours training_frame_spark -> Parquet: median of {args.runs} {a:.2f} s")
        if error is not None:
            print(f"(b) Feast Spark offline store FAILED: {error}")
            return
        b = statistics.median(times["feast"])
        print(f"(b) Feast SparkOfflineStore -> Parquet:   median of {args.runs} {b:.2f} s")
        print(f"ratio b / a: {b / a:.2f}")
        result = compare(pd.read_parquet(out_a), pd.read_parquet(out_b), names)
        cells = sum(result["features"].values())
        print(
            f"correctness: rows a {result['rows_a']:,}, b {result['rows_b']:,}; "
            f"only in a {result['only_a']}, only in b {result['only_b']}; labels differ "
            f"{result['labels_differ']}; null feature cells a {result['null_a']:,}, "
            f"b {result['null_b']:,}"
        )
        print(
            f"mismatching cells (1e-9, NaN == NaN): {cells:,} of {result['rows_a'] * len(names):,}"
        )
        for name, n in result["features"].items():
            if n:
                print(f"  {name}: {n:,}")
        for stamp, n in result["bad_cutoffs"].items():
            print(f"  rows with a mismatch at cutoff {stamp}: {n:,}")


if __name__ == "__main__":
    main()
