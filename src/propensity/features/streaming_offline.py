"""Streaming features offline: point in time at each (customer, cutoff), from the event lake.

The same tiles as online (:mod:`propensity.features.tiles`), built in DuckDB
from the lake's events of the 25 hours up to each cutoff (``event_timestamp <=
cutoff``, never later), then merged by the same :func:`~propensity.features.tiles.merge`
as the online read: a training frame and a live ``/score`` see the same value
for the same events at the same clock. :func:`with_streaming_features` is the
one way an offline frame gets them: Feast's and Spark's training frames, and the
latest snapshot (each row at its own ``event_timestamp``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from propensity.events.lake import EventLake
from propensity.features.definitions import ENTITY
from propensity.features.snapshots import TIMESTAMP
from propensity.features.tiles import (
    NONE_US,
    READ_SPAN_MINUTES,
    STREAMING_NAMES,
    TILE_COLUMNS,
    TILE_US,
    Sessions,
    Tiles,
    merge,
    today_start_minutes,
)

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = ["streaming_features", "with_streaming_features"]

_MEMORY_LIMIT = "1GB"


def streaming_features(
    lake: EventLake, entity_df: pd.DataFrame, timezone: str = "UTC"
) -> pd.DataFrame:
    """The streaming features of each entity row at its ``event_timestamp``.

    Parameters
    ----------
    lake : EventLake
    entity_df : pd.DataFrame
        ``customer_id`` and ``event_timestamp`` (the cutoff; aware, or naive UTC).
    timezone : str
        Project time zone ("today").

    Returns
    -------
    pd.DataFrame
        ``entity_df``'s rows in order, with one float64 column per streaming feature.

    Examples
    --------
    >>> streaming_features(lake, pd.DataFrame({"customer_id": ["C1"],
    ...     "event_timestamp": [pd.Timestamp("2026-06-01", tz="UTC")]}))  # doctest: +SKIP
    """
    stamps = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    clock_us = stamps.dt.as_unit("us").astype("int64").to_numpy()
    rows = pa.table(
        {
            "row": pa.array(np.arange(len(entity_df), dtype=np.int64)),
            "customer_id": pa.array(entity_df["customer_id"].astype(str).tolist(), pa.string()),
            "clock_us": pa.array(clock_us),
        }
    )
    tiles, sessions = Tiles.empty(), Sessions.empty()
    if len(entity_df) and lake.files():
        tiles, sessions = _tiles(lake, rows)
    values = merge(tiles, sessions, clock_us, today_start_minutes(clock_us, timezone))
    out = entity_df.reset_index(drop=True).copy()
    for j, name in enumerate(STREAMING_NAMES):
        out[name] = values[:, j]
    return out


def with_streaming_features(
    settings: Settings, frame: pd.DataFrame, names: Sequence[str]
) -> pd.DataFrame:
    """``frame`` with the streaming features among ``names`` added, each row at its cutoff.

    Parameters
    ----------
    settings : Settings
        The project's event lake and time zone.
    frame : pd.DataFrame
        ``customer_id``, ``event_timestamp`` (the clock of each row) and any others.
    names : sequence of str
        Feature names (a service's, a model's); those not streaming are ignored.

    Returns
    -------
    pd.DataFrame
        ``frame`` itself when ``names`` holds no streaming feature, else its rows in
        order (index reset) with one float64 column per streaming name, appended.

    Examples
    --------
    >>> with_streaming_features(settings, frame, ["sessions_7d", "events_1h"])  # doctest: +SKIP
    """
    streamed = [n for n in dict.fromkeys(names) if n in STREAMING_NAMES]
    if not streamed:
        return frame
    lake = EventLake(settings.path(settings.lake_dir))
    values = streaming_features(lake, frame[[ENTITY, TIMESTAMP]], settings.timezone)
    return pd.concat([frame.reset_index(drop=True), values[streamed]], axis=1)


def _tiles(lake: EventLake, rows: pa.Table) -> tuple[Tiles, Sessions]:
    sums = ", ".join(
        f"sum({flag})::BIGINT AS {name}"
        for name, flag in (
            ("events", "1"),
            ("sessions", "(event_type = 'session_start')::INT"),
            ("product_views", "(event_type = 'product_view')::INT"),
            ("cart_adds", "(event_type = 'add_to_cart')::INT"),
            ("purchases", "(event_type = 'purchase')::INT"),
        )
    )
    latest = (
        "max(us) AS last_event_us, "
        f"coalesce(max(CASE WHEN event_type = 'add_to_cart' THEN us END), {NONE_US}) "
        "AS last_cart_us, "
        f"coalesce(max(CASE WHEN event_type = 'purchase' THEN us END), {NONE_US}) "
        "AS last_purchase_us"
    )
    clocks = rows.column("clock_us")
    hi = pc.max(clocks).as_py()
    # Constant bounds (a minute wider than the rows' windows) let the scan skip row groups.
    lo = (pc.min(clocks).as_py() // TILE_US - READ_SPAN_MINUTES - 1) * TILE_US
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{_MEMORY_LIMIT}'")
        con.register("rows", rows)
        # The 25 hours of events before each cutoff, none after it.
        con.execute(
            f"""
            CREATE TEMP TABLE picked AS
            SELECT r.row, e.event_type, e.session_id, epoch_us(e.event_timestamp) AS us
            FROM rows r JOIN {lake.duckdb_scan()} e USING (customer_id)
            WHERE e.event_timestamp <= make_timestamptz({hi})
              AND e.event_timestamp > make_timestamptz({lo})
              AND epoch_us(e.event_timestamp) <= r.clock_us
              AND epoch_us(e.event_timestamp) // {TILE_US}
                  > r.clock_us // {TILE_US} - {READ_SPAN_MINUTES}
            """
        )
        tile = con.sql(
            f"SELECT row, us // {TILE_US} AS minute, {sums}, {latest} "
            "FROM picked GROUP BY row, minute"
        ).to_arrow_table()
        session = con.sql(
            "SELECT row, max(us) AS last_us, "
            "sum((event_type = 'product_view')::INT)::BIGINT AS views "
            "FROM picked WHERE session_id IS NOT NULL GROUP BY row, session_id"
        ).to_arrow_table()
    finally:
        con.close()

    def col(table: pa.Table, name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_numpy(), np.int64)

    return (
        Tiles(col(tile, "row"), col(tile, "minute"), {c: col(tile, c) for c in TILE_COLUMNS}),
        Sessions(col(session, "row"), col(session, "last_us"), col(session, "views")),
    )
