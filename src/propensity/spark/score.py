"""Bulk scoring on Spark: the three champions applied in the executors, partition by partition.

The models are broadcast once to every executor and each Arrow batch of the
feature frame goes through :func:`propensity.pipeline.score.score_table`, the
in-process bulk path (the models' own predict and the one arbitration kernel),
via ``mapInPandas``; scores are written by the executors as Parquet, never
collected to the driver. ``mlflow.pyfunc.spark_udf`` is not used: it scores one
model per UDF and returns one column, while next-best-action needs the three
models' outputs and the arbitration of the same row (``benchmarks/bench_spark.py``
measures it at 1.08x this path's time for two models, with equal scores).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from propensity.features.definitions import ENTITY, request_features
from propensity.features.snapshots import TIMESTAMP
from propensity.features.streaming_offline import with_streaming_features
from propensity.features.tiles import STREAMING_NAMES
from propensity.pipeline.dataset import stored_columns_by_view
from propensity.spark.features import PARTITION, latest_spark_snapshot, spark_table_path

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = ["SCORE_SCHEMA", "score_frame_spark", "score_all_spark", "latest_snapshot_spark"]

#: Spark schema of the scores (the columns of ``score_table``).
SCORE_SCHEMA = (
    "customer_id string, churn double, purchase_propensity double, "
    "action string, expected_value double"
)
_LAST_SEEN = "days_since_last_seen"


def score_frame_spark(frame: Any, churn: Any, purchase: Any, nba: Any = None) -> Any:
    """Score every row of a Spark feature frame with fitted models, in the executors.

    Parameters
    ----------
    frame : pyspark.sql.DataFrame
        ``customer_id`` and every model's features; ``days_since_last_seen`` is
        computed per batch from ``last_event_epoch`` and ``event_timestamp`` when
        a model wants it and the frame lacks it (as offline training does).
    churn, purchase : CalibratedBooster
    nba : NBAModel, optional

    Returns
    -------
    pyspark.sql.DataFrame
        :data:`SCORE_SCHEMA`, one row per input row (lazy).

    Examples
    --------
    >>> scores = score_frame_spark(frame, churn, purchase, nba)  # doctest: +SKIP
    >>> scores.write.parquet("data/scores")  # doctest: +SKIP
    """
    from propensity.pipeline.score import score_table

    shared = frame.sparkSession.sparkContext.broadcast((churn, purchase, nba))

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        models = shared.value
        for batch in batches:
            if _LAST_SEEN not in batch.columns and TIMESTAMP in batch.columns:
                batch = _with_last_seen(batch)
            yield score_table(batch, *models)

    return frame.mapInPandas(score, SCORE_SCHEMA)


def _with_last_seen(batch: pd.DataFrame) -> pd.DataFrame:
    seconds = pd.to_datetime(batch[TIMESTAMP], utc=True).astype("int64") / 1e9
    values = request_features(
        {
            "request_time": seconds.tolist(),
            "last_event_epoch": batch["last_event_epoch"].to_numpy(np.float64).tolist(),
        }
    )
    out = batch.copy()
    out[_LAST_SEEN] = np.array(values[_LAST_SEEN], dtype=np.float64)
    return out


def latest_snapshot_spark(settings: Settings, spark: Any, feature_names: list[str]) -> Any:
    """Every customer's features at the latest snapshot of the Spark tables (lazy).

    The counterpart of :func:`propensity.pipeline.dataset.latest_snapshot`: only
    the latest partition of each view is read, the views joined on ``customer_id``.
    Streaming features among ``feature_names`` are computed on the driver at the
    snapshot clock from the lake (one column of customer ids is collected) and
    joined back.
    """
    by_view = stored_columns_by_view(feature_names)
    features_dir = settings.path(settings.features_dir)
    latest = max(latest_spark_snapshot(settings, view) for view in by_view)
    frame = None
    for view, names in by_view.items():
        folder = spark_table_path(features_dir, view) / f"{PARTITION}={latest:%Y-%m-%d}"
        part = spark.read.parquet(str(folder)).select(ENTITY, TIMESTAMP, *names)
        frame = part if frame is None else frame.join(part.drop(TIMESTAMP), ENTITY, "full_outer")
    assert frame is not None
    if not set(feature_names) & set(STREAMING_NAMES):
        return frame
    ids = frame.select(ENTITY).toPandas().assign(**{TIMESTAMP: latest})
    streamed = with_streaming_features(settings, ids, feature_names).drop(columns=TIMESTAMP)
    return frame.join(spark.createDataFrame(streamed), ENTITY, "left")


def score_all_spark(
    settings: Settings, out: str | Path, *, spark: Any = None, models: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Score every customer of the latest Spark snapshot with the champions; write Parquet.

    Parameters
    ----------
    settings : Settings
    out : path
        Folder the executors write the score parts to (replaced).
    spark : SparkSession, optional
    models : dict, optional
        ``churn``, ``purchase_propensity`` and optionally ``next_best_action``
        estimators; defaults to the registry's champions.

    Returns
    -------
    dict
        ``rows``, ``path`` and ``nba`` (whether next-best-action was scored).

    Examples
    --------
    >>> score_all_spark(load_settings(), "data/scores")["rows"]  # doctest: +SKIP
    """
    from propensity.pipeline.score import _champions, _nba_columns
    from propensity.spark.session import spark_session

    spark = spark or spark_session(settings.spark)
    if models is None:
        models = {name: model for name, (_, model) in _champions(settings).items()}
    churn, purchase = models["churn"], models["purchase_propensity"]
    nba = models.get("next_best_action")
    names = [*churn.feature_names_, *purchase.feature_names_]
    names += _nba_columns(nba) if nba is not None else []
    frame = latest_snapshot_spark(settings, spark, names)
    scores = score_frame_spark(frame, churn, purchase, nba)
    scores.write.mode("overwrite").parquet(str(out))
    rows = spark.read.parquet(str(out)).count()
    return {"rows": rows, "path": str(out), "nba": nba is not None}
