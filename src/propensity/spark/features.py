"""Feature snapshots on Spark: the lake's Parquet partitions in, partitioned Parquet out.

The query is :func:`propensity.features.sql.feature_sql` in its Spark dialect, the
same single definition DuckDB runs, so the tables are equal to DuckDB's (tested to
1e-9). Layout under ``settings.features_dir``::

    spark/<view>/snapshot=YYYY-MM-DD/part-*.parquet

one folder per feature view, one partition per snapshot time, each file with
``customer_id``, ``event_timestamp`` (the snapshot time, UTC) and the view's
features (DOUBLE). Rebuilding a snapshot replaces only its partition (Spark's
dynamic partition overwrite), as the DuckDB build keeps other snapshots' rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from propensity.events.schema import ARROW_SCHEMA
from propensity.features.definitions import ENTITY, VIEWS, features_of
from propensity.features.snapshots import (
    TIMESTAMP,
    BuildReport,
    _check_times,
    snapshot_times_for,
)
from propensity.features.sql import feature_steps

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = [
    "PARTITION",
    "build_features_spark",
    "compute_features_spark",
    "read_events",
    "latest_spark_snapshot",
    "spark_snapshots",
    "spark_table_path",
]

#: The partition column of every Spark feature table (the snapshot's UTC date).
PARTITION = "snapshot"


def spark_table_path(features_dir: Path, view: str) -> Path:
    """Folder of the partitioned Spark table of one feature view."""
    if view not in VIEWS:
        raise KeyError(f"unknown feature view {view!r}; known: {sorted(VIEWS)}")
    return Path(features_dir) / "spark" / view


def spark_snapshots(settings: Settings, view: str = "session") -> set[pd.Timestamp]:
    """Snapshot times held by a view's Spark table (its partitions)."""
    folder = spark_table_path(settings.path(settings.features_dir), view)
    names = [p.name for p in folder.glob(f"{PARTITION}=*")] if folder.exists() else []
    return {pd.Timestamp(n.split("=", 1)[1], tz="UTC") for n in names}


def latest_spark_snapshot(settings: Settings, view: str) -> pd.Timestamp:
    """The latest snapshot of a view's Spark table; a clear error when there is none."""
    held = spark_snapshots(settings, view)
    if not held:
        folder = spark_table_path(settings.path(settings.features_dir), view)
        raise LookupError(f"Spark feature table missing: {folder}; build features first")
    return max(held)


def read_events(spark: Any, files: Sequence[Path]) -> Any:
    """The lake's committed Parquet files as one Spark DataFrame of canonical columns.

    Each file is one input split of its own (Spark reads the month partitions in
    parallel); files written before a column existed read it as NULL.
    """
    if not files:
        from propensity.events.lake import EmptyLakeError

        raise EmptyLakeError("the event lake is empty: ingest events first")
    frame = spark.read.option("mergeSchema", "true").parquet(*[str(f) for f in files])
    have = set(frame.columns)
    columns = [
        name
        if name in have
        else f"CAST(NULL AS {_spark_type(ARROW_SCHEMA.field(name).type)}) AS {name}"
        for name in ARROW_SCHEMA.names
    ]
    return frame.selectExpr(*columns)


def _spark_type(arrow_type: Any) -> str:
    import pyarrow as pa

    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMP"
    if pa.types.is_floating(arrow_type):
        return "DOUBLE"
    return "STRING"


def _snapshot_frame(spark: Any, times: Iterable[Any]) -> tuple[list[pd.Timestamp], Any]:
    stamps = _check_times(times)
    days = pd.DataFrame({"snapshot_day": [t.value // 86_400_000_000_000 for t in stamps]})
    return stamps, spark.createDataFrame(days).selectExpr(
        "CAST(snapshot_day AS BIGINT) AS snapshot_day"
    )


def compute_features_spark(spark: Any, events: Any, times: Iterable[Any]) -> Any:
    """Every registry feature at every snapshot time, as a (lazy) Spark DataFrame.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
    events : pyspark.sql.DataFrame
        Canonical events (:func:`read_events`).
    times : iterable of datetime-like
        Snapshot times; each must be a midnight UTC.

    Returns
    -------
    pyspark.sql.DataFrame
        ``customer_id``, ``event_timestamp`` and one DOUBLE column per feature, as
        :func:`propensity.features.snapshots.compute_features` returns them.

    Examples
    --------
    >>> events = read_events(spark, lake.files())  # doctest: +SKIP
    >>> frame = compute_features_spark(spark, events, times)  # doctest: +SKIP
    """
    _, snapshots = _snapshot_frame(spark, times)
    # Temp view names are per session; a unique suffix lets two builds share one session.
    suffix = f"{id(events):x}"
    events.createOrReplaceTempView(f"events_{suffix}")
    snapshots.createOrReplaceTempView(f"snapshots_{suffix}")
    steps, final = feature_steps(f"events_{suffix}", f"snapshots_{suffix}", dialect="spark")
    texts = [query for _, query in steps] + [final]
    for k, (name, query) in enumerate(steps):
        frame = spark.sql(query)
        # Spark inlines a WITH step at every reference, so the whole query planned as one
        # took a minute and recomputed the events' scan at each use: a step read by
        # several later ones is computed once and cut from the plan (checkpointed on the
        # executors, never collected to the driver).
        reads = sum(len(re.findall(rf"(?:FROM|JOIN) {name}\b", text)) for text in texts[k + 1 :])
        if reads > 1:
            frame = frame.localCheckpoint(eager=True)
        frame.createOrReplaceTempView(name)
    return spark.sql(final)


def build_features_spark(
    settings: Settings,
    snapshot_times: Sequence[Any] | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    spark: Any = None,
) -> BuildReport:
    """(Re)compute feature snapshots from the event lake on Spark; write partitioned Parquet.

    Parameters
    ----------
    settings : Settings
        Reads ``lake_dir`` and ``spark``; writes under ``features_dir/spark``.
    snapshot_times : sequence of datetime-like, optional
        Defaults to :func:`~propensity.features.snapshots.snapshot_times_for` the
        lake's time range (as the DuckDB build).
    spark : SparkSession, optional
        Defaults to :func:`propensity.spark.session.spark_session` of ``settings.spark``.

    Examples
    --------
    >>> report = build_features_spark(load_settings())  # doctest: +SKIP
    """
    from propensity.events.lake import EventLake
    from propensity.spark.session import spark_session, storage_level

    say = progress or (lambda message: None)
    spark = spark or spark_session(settings.spark)
    lake = EventLake(settings.path(settings.lake_dir))
    events = read_events(spark, lake.files())
    if snapshot_times is None:
        row = events.selectExpr(f"MIN({TIMESTAMP})", f"MAX({TIMESTAMP})").collect()[0]
        snapshot_times = snapshot_times_for(row[0], row[1])
    times = _check_times(snapshot_times)
    say(f"computing {len(times)} snapshots on Spark")
    # Computed once, read by every view's write: spilled to disk, not held on the driver.
    table = compute_features_spark(spark, events, times).selectExpr(
        "*", f"date_format({TIMESTAMP}, 'yyyy-MM-dd') AS {PARTITION}"
    )
    table = table.persist(storage_level("MEMORY_AND_DISK"))
    try:
        rows = table.count()
        out_dir = settings.path(settings.features_dir)
        written = {}
        for view in VIEWS:
            columns = [ENTITY, TIMESTAMP, *(f.name for f in features_of(view)), PARTITION]
            path = spark_table_path(out_dir, view)
            (
                table.select(*columns)
                .repartition(PARTITION)
                .sortWithinPartitions(ENTITY)
                .write.mode("overwrite")
                .partitionBy(PARTITION)
                .parquet(str(path))
            )
            written[view] = path
    finally:
        table.unpersist()
    say(f"wrote {len(written)} Spark tables ({rows} rows) to {out_dir / 'spark'}")
    return BuildReport(tuple(times), rows, written)
