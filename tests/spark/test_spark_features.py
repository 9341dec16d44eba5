"""The Spark feature build equals the DuckDB one, never leaks, and is erasable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TEST_SPARK
from features_testdata import REPO_FEATURE_REPO, events_table, random_events

from propensity.config import Settings
from propensity.events.lake import EventLake
from propensity.features.definitions import (
    FEATURES,
    STREAMING_FEATURES,
    VIEWS,
    batch_views,
    features_of,
)
from propensity.features.snapshots import (
    build_features,
    compute_features,
    feature_table_path,
    snapshot_times,
)
from propensity.jobs.erasure import forget
from propensity.jobs.erasure_scan import find_traces
from propensity.spark.features import (
    PARTITION,
    build_features_spark,
    compute_features_spark,
    spark_table_path,
)

TIMES = snapshot_times("2024-02-05", "2024-04-10", daily_days=2)


def _assert_equal_features(duck: pd.DataFrame, got: pd.DataFrame) -> None:
    """Same rows in the same order, every feature within 1e-9 (NaN where DuckDB has NaN)."""
    key = ["event_timestamp", "customer_id"]
    duck = duck.sort_values(key).reset_index(drop=True)
    got = got.sort_values(key).reset_index(drop=True)
    assert len(got) == len(duck) > 0
    assert got["customer_id"].tolist() == duck["customer_id"].tolist()
    assert (
        pd.to_datetime(got["event_timestamp"], utc=True).tolist()
        == pd.to_datetime(duck["event_timestamp"], utc=True).tolist()
    )
    names = [c for c in duck.columns if c not in key]
    assert names and set(names) <= set(got.columns)
    for name in names:
        a = duck[name].to_numpy(np.float64)
        b = got[name].to_numpy(np.float64)
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=name)


def _spark_frame(spark: Any, table: pa.Table) -> Any:
    return spark.createDataFrame(table.to_pandas())


def test_spark_features_equal_duckdb_and_future_events_never_leak(spark: Any) -> None:
    base = random_events(customers=30, events=2500, days=110, seed=11)
    cutoff = TIMES[-1]
    # Events at and after the last snapshot, touching every theme: none may reach a row.
    planted = events_table(
        [
            (f"C{c:07d}", cutoff + pd.Timedelta(minutes=m), kind, extra)
            for c in range(30)
            for m, kind, extra in [
                (0, "session_start", {"session_id": "late"}),
                (1, "purchase", {"order_id": f"O{c}-1", "price": 999.0, "quantity": 9.0}),
                (2, "feature_use", {"feature_name": "brand_new"}),
                (3, "campaign_exposure", {"action": "discount"}),
                (4, "support_ticket", {}),
            ]
        ]
        + [("C9999999", cutoff + pd.Timedelta(days=2), "session_start")],
        id_prefix="late",
    )
    full = pa.concat_tables([base, planted])
    duck = compute_features(base, TIMES)
    got = compute_features_spark(spark, _spark_frame(spark, full), TIMES).toPandas()
    _assert_equal_features(duck, got)
    assert "C9999999" not in set(got["customer_id"])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, spark: Any) -> Settings:
    root = tmp_path_factory.mktemp("spark-project")
    settings = Settings(root=root, feature_repo=REPO_FEATURE_REPO, spark=TEST_SPARK)
    lake = EventLake(settings.path(settings.lake_dir))
    lake.append(random_events(customers=25, events=2000, days=100, seed=5))
    build_features(settings, TIMES)
    build_features_spark(settings, TIMES, spark=spark)
    return settings


def test_spark_tables_are_partitioned_by_snapshot_and_equal_duckdb_tables(
    built: Settings, spark: Any
) -> None:
    features_dir = built.path(built.features_dir)
    for view in VIEWS:
        folder = spark_table_path(features_dir, view)
        parts = sorted(p.name for p in folder.iterdir() if p.is_dir())
        assert parts == [f"{PARTITION}={t:%Y-%m-%d}" for t in TIMES]
        got = spark.read.parquet(str(folder)).drop(PARTITION).toPandas()
        duck = pq.read_table(feature_table_path(features_dir, view)).to_pandas()
        assert list(got.columns) == list(duck.columns)
        _assert_equal_features(duck, got)


def test_rebuilding_one_snapshot_keeps_the_others(built: Settings, spark: Any) -> None:
    folder = spark_table_path(built.path(built.features_dir), "session")
    before = spark.read.parquet(str(folder)).toPandas()
    build_features_spark(built, [TIMES[0]], spark=spark)
    after = spark.read.parquet(str(folder)).toPandas()
    key = ["event_timestamp", "customer_id"]
    pd.testing.assert_frame_equal(
        after.sort_values(key).reset_index(drop=True)[before.columns],
        before.sort_values(key).reset_index(drop=True),
    )


def test_spark_training_frame_equals_feast_point_in_time_join(built: Settings, spark: Any) -> None:
    from propensity.features.store import FeatureStoreAdapter
    from propensity.pipeline.dataset import SAMPLE_WEIGHT
    from propensity.spark.training import stratified_sample, training_frame_spark

    adapter = FeatureStoreAdapter(built)
    adapter.apply()
    service = "churn_v1"
    ttls = adapter.ttls(batch_views(service))
    rng = np.random.default_rng(0)
    # On snapshots, between them, and past the TTL of the last one (all features null).
    cutoffs = [TIMES[1], TIMES[2] + pd.Timedelta(days=3), TIMES[-1] + pd.Timedelta(days=12)]
    ids = [f"C{c:07d}" for c in range(27)]  # two of them never appear in the lake
    entity = pd.DataFrame(
        [(c, t) for t in cutoffs for c in ids], columns=["customer_id", "event_timestamp"]
    )
    entity["label"] = rng.integers(0, 2, len(entity))
    expected = adapter.historical(entity, service)
    got = training_frame_spark(built, spark, entity, service, ttls).toPandas()
    got["event_timestamp"] = pd.to_datetime(got["event_timestamp"], utc=True)
    key = ["event_timestamp", "customer_id"]
    assert got["label"].tolist() == got.merge(entity, on=key)["label_y"].tolist()
    _assert_equal_features(expected.drop(columns="label"), got.drop(columns="label"))
    assert got.drop(columns=[*key, "label"]).notna().any(axis=None)
    assert (
        got[got["event_timestamp"] == cutoffs[-1]]
        .drop(columns=[*key, "label"])
        .isna()
        .all(axis=None)
    )
    sample = stratified_sample(
        training_frame_spark(built, spark, entity, service, ttls), "label", rows=20, seed=1
    ).frame
    # Each class's weights sum back to about its size in the full frame.
    for value, n in entity["label"].value_counts().items():
        weights = sample.loc[sample["label"] == value, SAMPLE_WEIGHT]
        assert 0 < len(weights) < n
        assert abs(weights.sum() - n) < 0.6 * n


def test_a_streaming_service_on_spark_adds_the_lakes_values_to_the_collected_rows(
    built: Settings, spark: Any
) -> None:
    from propensity.features.store import FeatureStoreAdapter
    from propensity.spark.training import historical_features_spark, training_frame_spark

    adapter = FeatureStoreAdapter(built)
    adapter.apply()
    streaming = [f.name for f in STREAMING_FEATURES]
    # Minutes after real events (and one midnight), so the windows hold counts.
    events = EventLake(built.path(built.lake_dir)).read(["customer_id", "event_timestamp"])
    picked = events.drop_duplicates("customer_id").head(15)
    entity = pd.DataFrame(
        {
            "customer_id": [*picked["customer_id"], "C0000001"],
            "event_timestamp": [
                *(pd.to_datetime(picked["event_timestamp"], utc=True) + pd.Timedelta(minutes=7)),
                TIMES[-1],
            ],
        }
    )
    # The lazy frame holds the batch and on-demand features (churn_v2's) only.
    lazy = training_frame_spark(built, spark, entity, "churn_v3", adapter.ttls(VIEWS))
    assert not set(streaming) & set(lazy.columns)
    assert set(lazy.columns) - {"customer_id", "event_timestamp"} == set(
        adapter.service_features("churn_v2")
    )
    got = historical_features_spark(built, adapter, entity, "churn_v3", spark=spark)
    expected = adapter.historical(entity, "churn_v3")
    assert set(streaming) <= set(got.columns)
    _assert_equal_features(expected, got)
    assert (got["events_30m"] > 0).sum() >= 15


def test_erasure_removes_customers_from_the_spark_tables(built: Settings, spark: Any) -> None:
    features_dir = built.path(built.features_dir)
    gone = ["C0000003", "C0000007"]
    before = spark.read.parquet(str(spark_table_path(features_dir, "basket"))).toPandas()
    assert set(gone) <= set(before["customer_id"])
    report = forget(built, gone, wait_seconds=5)
    assert report.feature_rows["spark/basket"] == int(before["customer_id"].isin(gone).sum())
    assert find_traces(built, gone) == []
    # Spark still reads the rewritten parts, and only the erased rows are missing.
    after = spark.read.parquet(str(spark_table_path(features_dir, "basket"))).toPandas()
    assert not set(gone) & set(after["customer_id"])
    assert len(after) == len(before) - int(before["customer_id"].isin(gone).sum())
    names = [f.name for f in features_of("basket")]
    assert names and all(n in after.columns for n in names)
    assert {f.view for f in FEATURES} == set(VIEWS)


def test_a_path_of_the_spark_tables(tmp_path: Path) -> None:
    assert spark_table_path(tmp_path, "session") == tmp_path / "spark" / "session"
    with pytest.raises(KeyError, match="unknown feature view"):
        spark_table_path(tmp_path, "nope")
