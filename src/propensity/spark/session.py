"""The Spark session: the only module of the package that imports pyspark.

Everything else of :mod:`propensity.spark` talks to Spark through the session's
``sql`` and ``createDataFrame`` and the DataFrame methods (``mapInPandas``,
``foreachPartition``, ``write``), so pyspark stays an optional extra
(``pip install 'propensity[spark]'``) entering the package in one place.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from propensity.config import Spark

__all__ = ["spark_session", "stop_session"]

#: Local defaults: small shuffles (Spark's 200 partitions are 200 tiny tasks on a
#: laptop), no UI port, UTC session time (the features are defined on UTC days),
#: Arrow transfers, and the raw local file system so Parquet outputs carry no
#: ``.crc`` side files that a later erasure rewrite would invalidate.
_DEFAULTS = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
    "spark.sql.adaptive.enabled": "true",
    # The feature SQL is written to DuckDB's semantics (a failed cast or a division by
    # zero is NULL); Spark 4's ANSI mode would raise instead.
    "spark.sql.ansi.enabled": "false",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.hadoop.fs.file.impl": "org.apache.hadoop.fs.RawLocalFileSystem",
    "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
    "spark.hadoop.parquet.enable.summary-metadata": "false",
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
}


def _pyspark() -> Any:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise RuntimeError(
            "engine: spark needs pyspark: pip install 'propensity[spark]' (and a Java 17 runtime)"
        ) from None
    return SparkSession


def spark_session(config: Spark | None = None, app_name: str = "propensity") -> Any:
    """Return the process's Spark session, created with ``config`` on first use.

    Parameters
    ----------
    config : propensity.config.Spark, optional
        ``master``, ``driver_memory``, ``shuffle_partitions`` and extra ``conf``
        (applied after the local defaults, so any of them can be overridden).
    app_name : str
        Name shown by the cluster manager.

    Returns
    -------
    pyspark.sql.SparkSession

    Examples
    --------
    >>> spark = spark_session(Spark(master="local[2]"))  # doctest: +SKIP
    >>> spark.sql("SELECT 1 AS x").collect()  # doctest: +SKIP
    [Row(x=1)]
    """
    from propensity.config import Spark

    config = config or Spark()
    # The executors' Python must be this interpreter (the one with propensity installed).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        _pyspark()
        .builder.master(config.master)
        .appName(app_name)
        .config("spark.driver.memory", config.driver_memory)
        .config("spark.sql.shuffle.partitions", str(config.shuffle_partitions))
    )
    local = config.master.startswith("local")
    # A local session listens on the loopback only.
    loopback = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    for key, value in {**_DEFAULTS, **(loopback if local else {}), **config.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def stop_session() -> None:
    """Stop the process's active Spark session, if any (and its JVM's work)."""
    session = _pyspark().getActiveSession()
    if session is not None:
        session.stop()


def storage_level(name: str) -> Any:
    """A ``pyspark.StorageLevel`` by name (``MEMORY_AND_DISK``, ``DISK_ONLY``...)."""
    from pyspark import StorageLevel

    return getattr(StorageLevel, name)
