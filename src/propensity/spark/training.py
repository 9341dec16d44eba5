"""Point-in-time training frames on Spark, sampled down to what one machine trains on.

The join is Feast's point-in-time rule written in Spark SQL over the partitioned
Spark tables: for each entity row (customer, cutoff ``t``) and feature view, the
latest snapshot row of that customer with ``t - ttl <= event_timestamp <= t``
(``ttl`` read from the applied Feast view), or nulls. The range join touches at
most ``ttl / 7`` weekly snapshots per row, so it stays a hash join on
``customer_id`` plus a small filter. Feast's own Spark offline store returns the
same values on these tables but is slower, and computes on-demand views only on the
driver (``benchmarks/bench_spark_pit.py``; the figures are in the README).

The labels are :func:`propensity.labels.label_sql` in its Spark dialect, the
same single definition DuckDB runs. Training then stays on one machine:
:func:`stratified_sample` keeps every row of a class up to ``rows / 2`` and samples
the rest, with ``sample_weight = 1 / fraction`` so weighted metrics and fits
estimate the full population; :func:`labeled_frame_spark` is the Spark engine's
:func:`propensity.pipeline.dataset.labeled_frame`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from propensity.events.lake import EventLake
from propensity.features.definitions import (
    ENTITY,
    FEATURES,
    ON_DEMAND_FEATURES,
    batch_views,
    service_views,
)
from propensity.features.snapshots import TIMESTAMP
from propensity.features.streaming_offline import with_streaming_features
from propensity.labels import LabelSpec, check_label_windows, cutoff_table, label_sql
from propensity.pipeline.dataset import SAMPLE_WEIGHT, model_features
from propensity.spark.features import PARTITION, read_events, spark_table_path

if TYPE_CHECKING:
    from propensity.config import Settings
    from propensity.models.spec import ModelSpec

__all__ = [
    "Sample",
    "entity_frame_spark",
    "historical_features_spark",
    "labeled_frame_spark",
    "stratified_sample",
    "training_frame_spark",
]

_ROW = "__entity_row__"


@dataclass(frozen=True)
class Sample:
    """A stratified sample collected to the driver, and how it was drawn."""

    #: The sampled rows, with :data:`~propensity.pipeline.dataset.SAMPLE_WEIGHT`.
    frame: pd.DataFrame
    #: Rows of each label class in the full frame.
    counts: dict[int, int]
    #: Share of each class's rows kept (the weight is its inverse).
    fractions: dict[int, float]

    def describe(self) -> dict[str, Any]:
        """What MLflow records of the sampling (JSON-ready)."""
        return {
            "rows_full": sum(self.counts.values()),
            "rows_sampled": len(self.frame),
            "classes": {
                str(c): {"rows": n, "fraction": self.fractions[c]} for c, n in self.counts.items()
            },
            "weights": f"{SAMPLE_WEIGHT} = 1 / the class's fraction",
        }


def entity_frame_spark(
    settings: Settings,
    spark: Any,
    cutoffs: Sequence[pd.Timestamp],
    label: LabelSpec,
    population: str,
) -> Any:
    """:func:`propensity.labels.entity_frame` on Spark: labelled entity rows (lazy).

    Same rows and values as the DuckDB one (tested), from the same SQL definition in
    Spark's dialect; the label windows are checked against the lake's data end first.

    Examples
    --------
    >>> rows = entity_frame_spark(settings, spark, cutoffs, spec.label, "active")  # doctest: +SKIP
    """
    lake = EventLake(settings.path(settings.lake_dir))
    check_label_windows(lake, cutoffs, label.horizon_days)
    suffix = f"{id(lake):x}"
    read_events(spark, lake.files()).createOrReplaceTempView(f"label_events_{suffix}")
    cuts = spark.createDataFrame(cutoff_table(cutoffs))
    cuts.createOrReplaceTempView(f"label_cuts_{suffix}")
    sql = label_sql(
        f"label_events_{suffix}", f"label_cuts_{suffix}", label, population, dialect="spark"
    )
    return spark.sql(sql).selectExpr(
        ENTITY, TIMESTAMP, "CAST(label AS TINYINT) AS label", "days_since_last"
    )


def historical_features_spark(
    settings: Settings, adapter: Any, entity: pd.DataFrame, service: str, *, spark: Any = None
) -> pd.DataFrame:
    """:meth:`FeatureStoreAdapter.historical` on Spark, collected (the scoring frames).

    The entity rows' snapshots must exist (see
    :func:`propensity.pipeline.dataset.ensure_snapshots`).
    """
    from propensity.spark.session import spark_session

    spark = spark or spark_session(settings.spark)
    views = batch_views(service)
    frame = training_frame_spark(settings, spark, entity, service, adapter.ttls(views)).toPandas()
    frame[TIMESTAMP] = pd.to_datetime(frame[TIMESTAMP], utc=True)
    frame = with_streaming_features(settings, frame, adapter.service_features(service))
    return frame.sort_values([TIMESTAMP, ENTITY], kind="stable").reset_index(drop=True)


def labeled_frame_spark(
    settings: Settings, spec: ModelSpec, cutoffs: Sequence[pd.Timestamp], *, spark: Any = None
) -> tuple[pd.DataFrame, list[str], list[pd.Timestamp], Sample]:
    """Labels, point-in-time features and the stratified sample, on Spark.

    The Spark engine's :func:`propensity.pipeline.dataset.labeled_frame`: snapshots
    missing at ``cutoffs`` are built on Spark, the labelled rows joined to their
    features there, and the frame sampled to ``settings.spark.training_rows`` rows
    (:func:`stratified_sample`, seeded by the spec) before it reaches the driver,
    where the streaming features of the sampled rows are added.

    Returns
    -------
    frame, feature names, snapshots built, Sample
        The frame sorted by cutoff then customer, features as float64, with
        :data:`~propensity.pipeline.dataset.SAMPLE_WEIGHT`.
    """
    from propensity.pipeline.dataset import ensure_snapshots, feature_adapter
    from propensity.spark.session import spark_session

    spark = spark or spark_session(settings.spark)
    stamps = sorted({pd.Timestamp(c) for c in cutoffs})
    missing = ensure_snapshots(settings, stamps)
    adapter = feature_adapter(settings)
    names = list(adapter.service_features(spec.feature_service))
    views = batch_views(spec.feature_service)
    entity = entity_frame_spark(settings, spark, stamps, spec.label, spec.population)
    frame = training_frame_spark(settings, spark, entity, spec.feature_service, adapter.ttls(views))
    sample = stratified_sample(frame, "label", settings.spark.training_rows, seed=spec.seed)
    rows = sample.frame
    rows[TIMESTAMP] = pd.to_datetime(rows[TIMESTAMP], utc=True)
    rows["label"] = rows["label"].astype("int8")
    # After sampling: the lake's tiles are read for the rows that train only.
    rows = with_streaming_features(settings, rows, names)
    rows = rows.sort_values([TIMESTAMP, ENTITY], kind="stable").reset_index(drop=True)
    rows, features = model_features(rows, names, spec)
    return rows, features, missing, Sample(rows, sample.counts, sample.fractions)


def training_frame_spark(
    settings: Settings, spark: Any, entity: Any, service: str, ttls: dict[str, float]
) -> Any:
    """Point-in-time features of ``service`` joined to ``entity`` rows, on Spark (lazy).

    Parameters
    ----------
    settings : Settings
        Reads the Spark tables under ``features_dir``.
    spark : SparkSession
    entity : pandas.DataFrame or pyspark.sql.DataFrame
        ``customer_id``, ``event_timestamp`` and any label columns (kept).
    service : str
        Feature service, e.g. ``churn_v1``.
    ttls : dict
        View name -> time to live in seconds (the applied Feast views',
        ``FeatureStoreAdapter.ttls()``).

    Returns
    -------
    pyspark.sql.DataFrame
        The entity columns, then the service's batch features and on-demand ones
        (computed with the request time = ``event_timestamp``, as offline Feast does).

    Notes
    -----
    A service's streaming features are not in this frame: they are added to the
    collected rows (:func:`historical_features_spark`, :func:`labeled_frame_spark`)
    by :func:`~propensity.features.streaming_offline.with_streaming_features`, the
    DuckDB engine's own computation, so both engines' values are one definition's.
    """
    if isinstance(entity, pd.DataFrame):
        frame = entity.copy()
        frame[TIMESTAMP] = pd.to_datetime(frame[TIMESTAMP], utc=True)
        entity = spark.createDataFrame(frame)
    keep = list(entity.columns)
    rows = entity.selectExpr("*", f"monotonically_increasing_id() AS {_ROW}").localCheckpoint()
    rows.createOrReplaceTempView("pit_entity")
    features_dir = settings.path(settings.features_dir)
    selects, joins = [], []
    views = batch_views(service)
    for k, view in enumerate(views):
        names = [f.name for f in FEATURES if f.view == view]
        table = spark.read.parquet(str(spark_table_path(features_dir, view))).drop(PARTITION)
        table.createOrReplaceTempView(f"pit_{view}")
        cols = ", ".join(f"f.{n}" for n in names)
        spark.sql(
            f"""
            SELECT {_ROW}, {", ".join(names)} FROM (
              SELECT e.{_ROW}, {cols},
                ROW_NUMBER() OVER (PARTITION BY e.{_ROW} ORDER BY f.{TIMESTAMP} DESC) AS rn
              FROM pit_entity e JOIN pit_{view} f
                ON f.{ENTITY} = e.{ENTITY}
               AND f.{TIMESTAMP} <= e.{TIMESTAMP}
               AND f.{TIMESTAMP} >= e.{TIMESTAMP} - make_interval(0, 0, 0, 0, 0, 0, {ttls[view]})
            ) ranked WHERE rn = 1
            """
        ).createOrReplaceTempView(f"pit_hit_{k}")
        joins.append(f"LEFT JOIN pit_hit_{k} h{k} ON h{k}.{_ROW} = e.{_ROW}")
        selects += [f"h{k}.{n}" for n in names]
    entity_cols = ", ".join(f"e.{c}" for c in keep)
    out = spark.sql(
        f"SELECT {entity_cols}, {', '.join(selects)} FROM pit_entity e {' '.join(joins)}"
    )
    if "request_features" in service_views(service):
        # The on-demand features through their one definition, batch by batch in the
        # executors (the request time is the row's cutoff, as offline Feast reads it).
        from propensity.spark.score import _with_last_seen

        (name,) = ON_DEMAND_FEATURES
        # A new DDL schema: StructType.add would change the frame's own (cached) schema.
        fields = [f"`{f.name}` {f.dataType.simpleString()}" for f in out.schema.fields]
        schema = ", ".join([*fields, f"`{name}` double"])
        out = out.mapInPandas(lambda batches: map(_with_last_seen, batches), schema)
    return out


def stratified_sample(frame: Any, label: str, rows: int, seed: int) -> Sample:
    """Sample a Spark frame to about ``rows`` rows stratified by ``label``; collect it.

    Each class keeps ``min(1, (rows / classes) / count)`` of its rows (so a rare
    class is kept whole), and every kept row carries ``sample_weight = 1 / that
    fraction``: weighted sums over the sample estimate those over the full frame.

    Examples
    --------
    >>> sample = stratified_sample(frame, "label", 1_000_000, seed=42)  # doctest: +SKIP
    >>> sample.frame["sample_weight"].sum()  # doctest: +SKIP
    """
    counts = {int(r[0]): int(r[1]) for r in frame.groupBy(label).count().collect()}
    if not counts:
        raise ValueError("the training frame is empty: nothing to sample")
    share = rows / len(counts)
    fractions = {value: min(1.0, share / n) for value, n in counts.items()}
    if all(f == 1.0 for f in fractions.values()):
        taken = frame.toPandas()  # all of it: no sampling pass
    else:
        taken = frame.sampleBy(label, fractions, seed).toPandas()
    taken[SAMPLE_WEIGHT] = 1.0 / taken[label].astype(int).map(fractions).to_numpy(np.float64)
    return Sample(taken, counts, fractions)
