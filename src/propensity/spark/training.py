"""Point-in-time training frames on Spark, sampled down to what one machine trains on.

The join is Feast's point-in-time rule written in Spark SQL over the partitioned
Spark tables: for each entity row (customer, cutoff ``t``) and feature view, the
latest snapshot row of that customer with ``t - ttl <= event_timestamp <= t``
(``ttl`` read from the applied Feast view), or nulls. The range join touches at
most ``ttl / 7`` weekly snapshots per row, so it stays a hash join on
``customer_id`` plus a small filter. Feast's own Spark offline store is not used
(it is contrib: no on-demand views, materialization through the driver).

Training then stays on one machine: :func:`stratified_sample` keeps every row of a
class up to ``rows / 2`` and samples the rest, with ``sample_weight = 1 / fraction``
so weighted metrics and fits estimate the full population.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from propensity.features.definitions import ENTITY, FEATURES, ON_DEMAND_FEATURES, service_views
from propensity.features.snapshots import TIMESTAMP
from propensity.spark.features import PARTITION, spark_table_path

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = ["SAMPLE_WEIGHT", "stratified_sample", "training_frame_spark"]

#: Column of the sampling weights (1 / the row's class sampling fraction).
SAMPLE_WEIGHT = "sample_weight"
_ROW = "__entity_row__"


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
        The entity columns, then the service's features (on-demand ones computed
        with the request time = ``event_timestamp``, as offline Feast does).
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
    views = [v for v in service_views(service) if v != "request_features"]
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


def stratified_sample(frame: Any, label: str, rows: int, seed: int) -> pd.DataFrame:
    """Sample a Spark frame to about ``rows`` rows stratified by ``label``; collect it.

    Each class keeps ``min(1, (rows / classes) / count)`` of its rows (so a rare
    class is kept whole), and every kept row carries ``sample_weight = 1 / that
    fraction``: weighted sums over the sample estimate those over the full frame.

    Examples
    --------
    >>> sample = stratified_sample(frame, "label", 1_000_000, seed=42)  # doctest: +SKIP
    >>> sample["sample_weight"].sum()  # doctest: +SKIP
    """
    counts = {r[0]: r[1] for r in frame.groupBy(label).count().collect()}
    if not counts:
        raise ValueError("the training frame is empty: nothing to sample")
    share = rows / len(counts)
    fractions = {value: min(1.0, share / n) for value, n in counts.items()}
    sample = frame.sampleBy(label, fractions, seed).toPandas()
    sample[SAMPLE_WEIGHT] = 1.0 / sample[label].map(fractions).to_numpy(np.float64)
    return sample
