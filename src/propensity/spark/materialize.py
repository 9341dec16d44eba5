"""Materialization on Spark: the executors write the online store, partition by partition.

Each customer's latest snapshot row (at or before ``end``) of every view is
selected in Spark from the partitioned tables, the rows are hash-partitioned by
``customer_id``, and every executor hands its partition's Arrow batches to the
online-store plugin's bulk writer
(:func:`propensity.features.online.write_many`, the same encoding and layout as
a local materialization, one ``HSET`` per customer on Redis). Nothing but the
per-partition counts comes back to the driver, which avoids the out-of-memory
failures of engines that pull the whole range through it. The driver records
the interval (the store's marks and the Feast registry) once, after every
partition succeeded, so a failed job leaves the previous interval in place and
a rerun writes the same rows again (the writes are idempotent).

Executors open the project's Feast store themselves, so the feature repo, the
registry and the online store must be reachable from them: a shared file system
for the registry and Redis for the store on a cluster (the SQLite store is a
local file, for ``local[*]`` sessions).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from propensity.features.definitions import ENTITY, VIEWS, features_of
from propensity.features.snapshots import TIMESTAMP
from propensity.spark.features import PARTITION, latest_spark_snapshot, spark_table_path

if TYPE_CHECKING:
    from propensity.config import Settings
    from propensity.features.online import WriteReport
    from propensity.features.store import FeatureStoreAdapter

__all__ = ["latest_rows_spark", "materialize_spark"]

_COUNTS = "feature_view string, rows long, entities long, superseded long, values long"
#: Each executor process opens a project's Feast store once (by its settings).
_STORES: dict[str, Any] = {}


def latest_rows_spark(
    settings: Settings, spark: Any, views: Sequence[str], end: datetime, start: datetime | None
) -> Any:
    """Each customer's latest snapshot row in ``(start, end]``, every view joined (lazy).

    The Spark counterpart of the local materialization's DuckDB query: every view's
    table holds the same (customer, snapshot) rows, so the join is on both keys.
    """
    features_dir = settings.path(settings.features_dir)
    window = f"{TIMESTAMP} <= timestamp'{end.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}'"
    if start is not None:
        window += f" AND {TIMESTAMP} > timestamp'{start.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}'"
    tables = []
    for view in views:
        names = [f.name for f in features_of(view)]
        table = spark.read.parquet(str(spark_table_path(features_dir, view))).drop(PARTITION)
        tables.append(table.where(window).select(ENTITY, TIMESTAMP, *names))
    lead = tables[0]
    latest = lead.groupBy(ENTITY).agg({TIMESTAMP: "max"})
    latest = latest.withColumnRenamed(f"max({TIMESTAMP})", TIMESTAMP)
    frame = latest.join(lead, [ENTITY, TIMESTAMP])
    for table in tables[1:]:
        frame = frame.join(table, [ENTITY, TIMESTAMP])
    return frame


def _store(settings: Settings) -> Any:
    # By the whole configuration: Spark reuses its Python workers across jobs, and a
    # project's next job may write another online store.
    key = settings.model_dump_json()
    if key not in _STORES:
        from propensity.features.store import FeatureStoreAdapter

        _STORES[key] = FeatureStoreAdapter(settings).store
    return _STORES[key]


def materialize_spark(
    adapter: FeatureStoreAdapter,
    end: Any = None,
    views: Iterable[str] | None = None,
    *,
    incremental: bool = True,
    spark: Any = None,
) -> list[WriteReport]:
    """Load each customer's latest snapshot row into the online store, from the executors.

    The Spark engine's :meth:`FeatureStoreAdapter.materialize` (which calls it):
    same arguments, same rows written, same :class:`WriteReport` per view.

    Examples
    --------
    >>> materialize_spark(FeatureStoreAdapter(settings))  # doctest: +SKIP
    [WriteReport(feature_view='activity', rows_read=1000000, ...)]
    """
    from propensity.features.online import (
        WriteReport,
        materialized_until,
        record_materialization,
    )
    from propensity.spark.session import spark_session

    settings = adapter.settings
    chosen = sorted(set(views) if views is not None else set(VIEWS))
    began = time.perf_counter()
    if end is None:
        stop = (latest_spark_snapshot(settings, chosen[0]) + timedelta(seconds=1)).to_pydatetime()
    else:
        stamp = pd.Timestamp(end)
        stop = (stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp).to_pydatetime()
    store = adapter.store
    start = materialized_until(store, chosen) if incremental else None
    spark = spark or spark_session(settings.spark)
    rows = latest_rows_spark(settings, spark, chosen, stop, start)
    parts = rows.repartition(settings.spark.shuffle_partitions, ENTITY)

    def write(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from propensity.features.online import write_many

        executor_store = _store(settings)
        for batch in batches:
            table = pa.Table.from_pandas(batch, preserve_index=False)
            reports = write_many(executor_store, {v: table for v in chosen}, end=stop, record=False)
            yield pd.DataFrame(
                {
                    "feature_view": [r.feature_view for r in reports],
                    "rows": [r.rows_read for r in reports],
                    "entities": [r.entities_written for r in reports],
                    "superseded": [r.superseded for r in reports],
                    "values": [r.values_written for r in reports],
                }
            )

    counts = parts.mapInPandas(write, _COUNTS).groupBy("feature_view").sum().collect()
    totals = {r["feature_view"]: r for r in counts}
    record_materialization(store, chosen, start, stop)
    seconds = time.perf_counter() - began
    kind = settings.online_store.kind

    def total(view: str, column: str) -> int:
        # a view no partition wrote (nothing new, incremental) has no row of sums
        return int(totals[view][f"sum({column})"]) if view in totals else 0

    return [
        WriteReport(
            feature_view=view,
            rows_read=total(view, "rows"),
            entities_written=total(view, "entities"),
            superseded=total(view, "superseded"),
            values_written=total(view, "values"),
            start=start or stop,
            end=stop,
            seconds=seconds,
            store=kind,
        )
        for view in chosen
    ]
