"""Build the feature tables: one Parquet file per feature view.

Layout under ``settings.features_dir``::

    session.parquet  basket.parquet  adoption.parquet  engagement.parquet
    lifecycle.parquet  exposure.parquet  activity_shift.parquet

each with ``customer_id`` (string), ``event_timestamp`` (timestamp[us, UTC], the
snapshot time ``T``) and the view's features (float64). A row at ``T`` uses only
events with ``event_timestamp < T``; a customer has rows from the first snapshot
after their first event.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .definitions import ENTITY, VIEWS, features_of
from .sql import feature_sql

if TYPE_CHECKING:
    from propensity.config import Settings

__all__ = [
    "REGISTRY_FILE",
    "BuildReport",
    "snapshot_times",
    "snapshot_times_for",
    "compute_features",
    "build_features",
    "feature_table_path",
]

TIMESTAMP = "event_timestamp"


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build_features` wrote."""

    snapshots: tuple[pd.Timestamp, ...]
    rows: int
    tables: dict[str, Path]


#: The Feast registry file, kept in the features folder beside the tables.
REGISTRY_FILE = "feast_registry.db"


def feature_table_path(features_dir: Path, view: str) -> Path:
    """Path of the Parquet table of one feature view."""
    if view not in VIEWS:
        raise KeyError(f"unknown feature view {view!r}; known: {sorted(VIEWS)}")
    return Path(features_dir) / f"{view}.parquet"


def _midnight(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.normalize()


def snapshot_times(
    start: Any,
    end: Any,
    *,
    weekday: int = 0,
    step_days: int = 7,
    daily_days: int = 7,
) -> list[pd.Timestamp]:
    """Snapshot times: every ``step_days`` on ``weekday`` plus daily for the last days.

    Parameters
    ----------
    start, end : datetime-like
        First and last possible snapshot (normalized to midnight UTC; both
        inclusive). Use the day after the last event as ``end`` so the latest
        snapshot sees every event.
    weekday : int
        Day of week of the periodic snapshots (0 = Monday).
    step_days : int
        Days between periodic snapshots.
    daily_days : int
        The last ``daily_days`` days up to ``end`` are all snapshots.

    Examples
    --------
    >>> times = snapshot_times("2024-01-01", "2024-01-31", daily_days=2)
    >>> [t.day for t in times]
    [1, 8, 15, 22, 29, 30, 31]
    """
    first, last = _midnight(start), _midnight(end)
    if last < first:
        raise ValueError(f"snapshot end {last} is before start {first}")
    if step_days <= 0 or not 0 <= weekday <= 6 or daily_days < 0:
        raise ValueError("step_days must be > 0, weekday in 0..6 and daily_days >= 0")
    anchor = first + pd.Timedelta(days=(weekday - first.weekday()) % 7)
    periodic = pd.date_range(anchor, last, freq=f"{step_days}D") if anchor <= last else []
    daily = pd.date_range(max(first, last - pd.Timedelta(days=daily_days - 1)), last, freq="D")
    times = set(periodic) | (set(daily) if daily_days else set())
    return sorted(pd.Timestamp(t) for t in times)


def _connect(memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    # Spill beyond memory_limit to the system temp folder, never the working directory.
    spill = Path(tempfile.gettempdir()) / f"propensity-duckdb-{os.getpid()}"
    con = duckdb.connect(
        config={"memory_limit": memory_limit, "threads": threads, "temp_directory": str(spill)}
    )
    con.execute("SET TimeZone = 'UTC'")
    # Row order of the result is fixed by an explicit sort, so DuckDB may stream freely.
    con.execute("SET preserve_insertion_order = false")
    return con


def compute_features(
    events: str | pa.Table | pd.DataFrame,
    times: Iterable[Any],
    *,
    memory_limit: str = "2.5GB",
    threads: int = 2,
) -> pd.DataFrame:
    """Compute every registry feature at every snapshot time.

    Parameters
    ----------
    events : str, pyarrow.Table or pandas.DataFrame
        Canonical events, or a DuckDB table expression over them (such as
        ``EventLake.duckdb_scan()``).
    times : iterable of datetime-like
        Snapshot times; each must be a midnight UTC.
    memory_limit, threads :
        DuckDB limits (the query spills to disk beyond the memory limit).

    Returns
    -------
    pandas.DataFrame
        ``customer_id``, ``event_timestamp`` (UTC) and one float64 column per
        feature, sorted by time then customer.

    Examples
    --------
    >>> frame = compute_features(events, ["2024-03-01"])  # doctest: +SKIP
    """
    # self_destruct frees each Arrow column once converted and split_blocks skips the
    # consolidation copy: the result is not held twice.
    table = _compute_arrow(events, times, memory_limit, threads)
    return table.to_pandas(self_destruct=True, split_blocks=True)


def _check_times(times: Iterable[Any]) -> list[pd.Timestamp]:
    out = []
    for value in times:
        ts = pd.Timestamp(value)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        if ts != ts.normalize():
            raise ValueError(f"snapshot time {ts} is not a midnight UTC")
        out.append(ts)
    if not out:
        raise ValueError("no snapshot times given")
    return sorted(set(out))


def _compute_arrow(
    events: str | pa.Table | pd.DataFrame, times: Iterable[Any], memory_limit: str, threads: int
) -> pa.Table:
    stamps = _check_times(times)
    days = pa.table({"snapshot_day": pa.array([t.value // 86_400_000_000_000 for t in stamps])})
    con = _connect(memory_limit, threads)
    try:
        con.register("snapshots", days)
        if isinstance(events, str):
            source = events
        else:
            con.register("events_input", events)
            source = "events_input"
        sql = feature_sql(source, "snapshots") + f"ORDER BY {TIMESTAMP}, {ENTITY}"
        # Stream the sorted result (DuckDB keeps it spillable under memory_limit) instead of
        # materializing it in DuckDB and then copying it to Arrow.
        return con.sql(sql).to_arrow_reader(1 << 17).read_all()
    finally:
        con.close()


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def build_features(
    settings: Settings,
    snapshot_times: Sequence[Any] | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    memory_limit: str = "2.5GB",
    threads: int = 2,
) -> BuildReport:
    """(Re)compute feature snapshots from the event lake and replace the tables.

    Rows of the requested snapshot times are recomputed; rows of other times
    already in the tables are kept. Each view's file is replaced atomically.
    With ``engine: spark`` the build runs on Spark instead
    (:func:`propensity.spark.features.build_features_spark`: partitioned tables).

    Parameters
    ----------
    settings : Settings
        Reads ``lake_dir`` and writes under ``features_dir``.
    snapshot_times : sequence of datetime-like, optional
        Defaults to weekly Mondays over the lake's history plus the last 7
        days, up to the midnight after the latest event.
    progress : callable, optional
        Called with a short message at each step.

    Examples
    --------
    >>> report = build_features(load_settings())  # doctest: +SKIP
    >>> report.tables["session"].name  # doctest: +SKIP
    'session.parquet'
    """
    from propensity.events.lake import EventLake

    if settings.engine == "spark":
        from propensity.spark.features import build_features_spark

        return build_features_spark(settings, snapshot_times, progress)
    say = progress or (lambda message: None)
    lake = EventLake(settings.path(settings.lake_dir))
    scan = lake.duckdb_scan()
    if snapshot_times is None:
        con = _connect(memory_limit, threads)
        try:
            row = con.execute(f"SELECT MIN(event_timestamp), MAX(event_timestamp) FROM {scan}")
            lo, hi = row.fetchone() or (None, None)
        finally:
            con.close()
        snapshot_times = snapshot_times_for(lo, hi)
    times = _check_times(snapshot_times)
    say(f"computing {len(times)} snapshots")
    table = _compute_arrow(scan, times, memory_limit, threads)
    say(f"computed {table.num_rows} rows; writing tables")
    out_dir = settings.path(settings.features_dir)
    written = {}
    requested = pa.array([t.to_pydatetime() for t in times], pa.timestamp("us", tz="UTC"))
    for view in VIEWS:
        columns = [ENTITY, TIMESTAMP] + [f.name for f in features_of(view)]
        fresh = table.select(columns)
        path = feature_table_path(out_dir, view)
        if path.exists():
            old = pq.read_table(path)
            if old.schema.names == columns:
                keep = pc.invert(pc.is_in(old[TIMESTAMP], value_set=requested))
                fresh = pa.concat_tables([old.filter(keep).cast(fresh.schema), fresh])
                fresh = fresh.sort_by([(TIMESTAMP, "ascending"), (ENTITY, "ascending")])
            else:
                say(f"{view}: feature columns changed, rebuilding from the requested snapshots")
        _write_atomic(fresh, path)
        written[view] = path
    say(f"wrote {len(written)} tables to {out_dir}")
    return BuildReport(tuple(times), table.num_rows, written)


def snapshot_times_for(first_event: Any, last_event: Any, **kwargs: Any) -> list[pd.Timestamp]:
    """Default snapshots for events spanning ``first_event`` .. ``last_event``.

    From the first midnight after the first event to the midnight after the last
    event (so the latest snapshot sees all events); see :func:`snapshot_times`.
    """
    if first_event is None or last_event is None:
        raise ValueError("the event lake is empty: no snapshot times to compute")
    start = _midnight(first_event) + pd.Timedelta(days=1)
    end = _midnight(last_event) + pd.Timedelta(days=1)
    return snapshot_times(start, end, **kwargs)
