"""Logged exposures of the event lake, their outcomes, features and simulated truth.

The event-log half of :mod:`propensity.models.nba`: every ``campaign_exposure``
event with its outcomes within the horizons (from DuckDB over the lake), the
point-in-time features of each exposure (Feast), and, for simulated data, the
true outcome probabilities under every action.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from propensity.models.arbitration import ActionCatalog

__all__ = ["exposure_log", "features_at", "exposure_truth"]


def exposure_log(lake: Any, catalog: ActionCatalog, horizons: Any) -> tuple[pd.DataFrame, int]:
    """Logged exposures with outcomes; drops (and counts) those whose windows are still open.

    Outcome windows start at the exposure's midnight, like the features' snapshot:
    purchase = a purchase in [T, T + purchase_days); retention = a session_start
    or purchase in [T, T + churn_days).
    """
    import duckdb

    hp, hc = horizons.purchase_days, horizons.churn_days
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    scan = lake.duckdb_scan()
    try:
        end = (con.execute(f"SELECT max(event_timestamp) FROM {scan}").fetchone() or [None])[0]
        frame = con.execute(
            f"""
            WITH exp AS (
                SELECT customer_id, event_id, event_timestamp AS exposure_timestamp,
                       date_trunc('day', event_timestamp) AS day, action, propensity
                FROM {scan} WHERE event_type = 'campaign_exposure'
            ), act AS (
                SELECT customer_id, event_timestamp, event_type = 'purchase' AS is_purchase
                FROM {scan} WHERE event_type IN ('purchase', 'session_start')
            )
            SELECT e.customer_id, e.event_id, e.exposure_timestamp, e.day, e.action, e.propensity,
                   coalesce(bool_or(a.is_purchase
                                     AND a.event_timestamp < e.day + INTERVAL {hp} DAY),
                            false)::INT AS purchase,
                   coalesce(bool_or(a.event_timestamp < e.day + INTERVAL {hc} DAY), false)::INT
                       AS retention
            FROM exp e LEFT JOIN act a
              ON a.customer_id = e.customer_id AND a.event_timestamp >= e.day
             AND a.event_timestamp < e.day + INTERVAL {max(hp, hc)} DAY
            GROUP BY ALL
            ORDER BY e.exposure_timestamp, e.customer_id
            """
        ).df()
    finally:
        con.close()
    if frame.empty:
        raise ValueError(f"the event lake at {lake.root} holds no campaign_exposure events")
    frame["exposure_timestamp"] = pd.to_datetime(frame["exposure_timestamp"], utc=True)
    frame["day"] = pd.to_datetime(frame["day"], utc=True)
    closed = frame["day"] + pd.Timedelta(days=max(hp, hc)) <= pd.Timestamp(end).tz_convert("UTC")
    unknown = ~frame["action"].isin([*catalog.names, catalog.control])
    if unknown.any():
        row = frame[unknown].iloc[0]
        raise ValueError(
            f"exposure {row['event_id']}: action {row['action']!r} is not in the catalog "
            f"({catalog.names} + {catalog.control!r})"
        )
    return frame[closed].reset_index(drop=True), int((~closed).sum())


def features_at(settings: Any, log: pd.DataFrame, service: str) -> tuple[pd.DataFrame, list[str]]:
    """Point-in-time features of each exposure (snapshot at its midnight), via Feast."""
    import pyarrow.parquet as pq

    from propensity.features.snapshots import build_features, feature_table_path
    from propensity.features.store import FeatureStoreAdapter

    days = sorted(set(log["day"]))
    path = feature_table_path(settings.path(settings.features_dir), "exposure")
    have: set[pd.Timestamp] = set()
    if path.exists():
        stamps = pq.read_table(path, columns=["event_timestamp"])["event_timestamp"].to_pandas()
        have = {pd.Timestamp(t).tz_convert("UTC") for t in pd.unique(stamps)}
    missing = [d for d in days if d not in have]
    if missing:
        # Feast joins the latest snapshot at or before a row: a missing one means stale features.
        build_features(settings, missing)
    adapter = FeatureStoreAdapter(settings)
    adapter.apply()
    names = list(adapter.service_features(service))
    entity = log.rename(columns={"exposure_timestamp": "event_timestamp"})
    frame = adapter.historical(entity, service)
    frame = frame.rename(columns={"event_timestamp": "exposure_timestamp"})
    frame[names] = frame[names].astype("float64")
    return frame, names


def exposure_truth(truth_dir: str | Path, log: pd.DataFrame) -> pd.DataFrame:
    """Row-aligned true probabilities ``p_<outcome>_<arm>`` of each logged exposure.

    Reads ``truth/exposures.parquet`` of a simulation; every exposure must have a row.
    """
    exposures = pd.read_parquet(Path(truth_dir) / "truth" / "exposures.parquet")
    truth = log[["event_id"]].merge(exposures, on="event_id", how="left")
    lost = truth["p_purchase_control"].isna()
    if lost.any():
        raise ValueError(
            f"{int(lost.sum())} exposures (first {truth.loc[lost, 'event_id'].iloc[0]}) "
            f"have no truth row in {truth_dir}"
        )
    return truth
