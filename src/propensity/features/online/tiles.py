"""Streaming-feature state in the SQLite online store: tiles, sessions, applied ids, staged events.

Four tables beside Feast's own in the online store's SQLite file:

* ``stream_<project>_tiles``: one row per customer and minute (see
  :mod:`propensity.features.tiles`), counts added and latest times maxed on upsert;
* ``stream_<project>_sessions``: per customer and session, latest event time and views;
* ``stream_<project>_applied``: every ``event_id`` applied (with its customer and
  minute), so a redelivered event changes nothing;
* ``stream_<project>_staged``: applied events waiting for the lake, as Arrow IPC
  batches; :meth:`SqliteTileStore.unstage` removes them once the lake holds them.

:meth:`SqliteTileStore.apply` writes all four in one transaction (WAL,
``synchronous=FULL``): when it returns, the tile update, the record of the
applied ids and the staged events are durable together, or none of them is.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from propensity.features.tiles import (
    READ_SPAN_MINUTES,
    TILE_COLUMNS,
    Sessions,
    Tiles,
    merge,
    session_rows,
    tile_rows,
    today_start_minutes,
)

__all__ = ["ApplyReport", "SqliteTileStore", "tile_tables", "use_wal"]

_CHUNK = 900  # ids per IN (...) query, under SQLite's default bound-parameter limit
#: How long a connection waits for another's lock.
_TIMEOUT_SECONDS = 60.0
#: WAL pages between automatic checkpoints (80 MB of 4 KB pages; SQLite's default: 1,000).
_WAL_CHECKPOINT_PAGES = 20_000


def tile_tables(project: str) -> dict[str, str]:
    """Names of the streaming tables of a Feast project."""
    # Not ``<project>_...``: Feast's tables are named so, and erasure deletes from
    # every one of them by ``entity_key``.
    kinds = ("tiles", "sessions", "applied", "staged", "dirty")
    return {kind: f"stream_{project}_{kind}" for kind in kinds}


@dataclass
class ApplyReport:
    """What :meth:`SqliteTileStore.apply` did: events new to the store, and repeats."""

    applied: int
    duplicates: int


def use_wal(con: sqlite3.Connection, timeout: float = _TIMEOUT_SECONDS) -> None:
    """Put the connection's database in WAL mode, waiting for other writers.

    Switching a database that is still in rollback-journal mode (a store just
    made, by Feast or another process) while a connection holds its write lock
    fails at once with "database is locked": SQLite does not call the busy
    handler there. Seen as a reader's first call failing beside a writer.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


@contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """One durable transaction on an autocommit connection (rolled back on any error)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


class SqliteTileStore:
    """The streaming state of one project in the online store's SQLite file.

    Parameters
    ----------
    path : path
        The SQLite online store (``online_store.sqlite_path``).
    project : str
        Feast project name (table prefix).
    timezone : str
        Project time zone, for "today".

    Examples
    --------
    >>> store = SqliteTileStore("data/online_store.db", "propensity")  # doctest: +SKIP
    >>> store.apply(events).applied  # doctest: +SKIP
    500
    >>> store.read(["C1"], clock_us).shape  # doctest: +SKIP
    (1, 15)
    """

    def __init__(self, path: str | Path, project: str, timezone: str = "UTC") -> None:
        self.path = Path(path)
        self.project = project
        self.timezone = timezone
        self.tables = tile_tables(project)
        self._local = threading.local()
        self._created = False

    # -- connection ------------------------------------------------------------

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=_TIMEOUT_SECONDS, isolation_level=None)
            use_wal(con)
            # FULL: a commit survives a crash of the machine, not only of the process;
            # callers acknowledge events once apply returns.
            con.execute("PRAGMA synchronous=FULL")
            # Random event ids touch a new page of the applied-ids B-tree each; checkpointing
            # the WAL every 1,000 pages (SQLite's default) copied those pages back again
            # and again: a larger interval made apply 35 % faster after 400k events.
            con.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES}")
            self._local.con = con
            if not self._created:
                self._create(con)
                self._created = True
        return con

    def _create(self, con: sqlite3.Connection) -> None:
        t = self.tables
        counts = ", ".join(f"{c} INTEGER NOT NULL" for c in TILE_COLUMNS)
        con.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS "{t["tiles"]}" (
                customer_id TEXT NOT NULL, minute INTEGER NOT NULL, {counts},
                PRIMARY KEY (customer_id, minute)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS "{t["sessions"]}" (
                customer_id TEXT NOT NULL, session_id TEXT NOT NULL,
                last_us INTEGER NOT NULL, views INTEGER NOT NULL,
                PRIMARY KEY (customer_id, session_id)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS "{t["applied"]}" (
                event_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL,
                minute INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS "{t["staged"]}" (
                batch INTEGER PRIMARY KEY AUTOINCREMENT, rows INTEGER NOT NULL,
                events BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS "{t["dirty"]}" (
                customer_id TEXT PRIMARY KEY, batch INTEGER NOT NULL) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS "{t["dirty"]}_batch" ON "{t["dirty"]}" (batch);
            """
        )

    def close(self) -> None:
        """Close this thread's connection."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- writing ---------------------------------------------------------------

    def _known(self, con: sqlite3.Connection, ids: list[str]) -> set[str]:
        known: set[str] = set()
        table = self.tables["applied"]
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(part))
            rows = con.execute(f'SELECT event_id FROM "{table}" WHERE event_id IN ({marks})', part)
            known.update(r[0] for r in rows)
        return known

    def apply(self, events: pa.Table, *, changes: bool = True) -> ApplyReport:
        """Apply canonical events not applied before, in one durable transaction.

        Within ``events`` the first row of each ``event_id`` wins; an id
        applied earlier (by any caller) is a duplicate and changes nothing.
        The new events update their tiles and sessions, are recorded as
        applied and are staged for the lake.

        Parameters
        ----------
        events : pa.Table
            Validated canonical events (``ARROW_SCHEMA`` columns).
        changes : bool
            Mark their customers in the change feed (:meth:`dirty`).

        Returns
        -------
        ApplyReport
        """
        con = self._con()
        ids = events.column("event_id").to_pylist()
        with _transaction(con):
            new = first_new(events, ids, self._known(con, ids))
            if new.num_rows:
                self._write(con, new, changes)
        return ApplyReport(applied=new.num_rows, duplicates=len(ids) - new.num_rows)

    def _write(self, con: sqlite3.Connection, new: pa.Table, changes: bool) -> None:
        t = self.tables
        tiles = tile_rows(new)
        sums = ", ".join(f"{c} = {c} + excluded.{c}" for c in TILE_COLUMNS[:5])
        maxes = ", ".join(f"{c} = max({c}, excluded.{c})" for c in TILE_COLUMNS[5:])
        marks = ",".join("?" * (2 + len(TILE_COLUMNS)))
        con.executemany(
            f'INSERT INTO "{t["tiles"]}" VALUES ({marks}) '
            f"ON CONFLICT (customer_id, minute) DO UPDATE SET {sums}, {maxes}",
            _rows(tiles),
        )
        sessions = session_rows(new)
        con.executemany(
            f'INSERT INTO "{t["sessions"]}" VALUES (?,?,?,?) '
            "ON CONFLICT (customer_id, session_id) DO UPDATE SET "
            "last_us = max(last_us, excluded.last_us), views = views + excluded.views",
            _rows(sessions),
        )
        minutes = tile_rows_minutes(new)
        con.executemany(
            f'INSERT INTO "{t["applied"]}" VALUES (?,?,?)',
            zip(
                new.column("event_id").to_pylist(),
                new.column("customer_id").to_pylist(),
                minutes.tolist(),
                strict=True,
            ),
        )
        batch = con.execute(
            f'INSERT INTO "{t["staged"]}" (rows, events) VALUES (?, ?)',
            (new.num_rows, _ipc(new)),
        ).lastrowid
        if not changes:
            return
        customers = pc.unique(new.column("customer_id")).to_pylist()
        con.executemany(
            f'INSERT INTO "{t["dirty"]}" VALUES (?, ?) '
            "ON CONFLICT (customer_id) DO UPDATE SET batch = excluded.batch",
            ((c, batch) for c in customers),
        )

    # -- the change feed ---------------------------------------------------------

    def dirty(self, limit: int) -> list[tuple[str, int]]:
        """Customers changed since :meth:`clean` last saw them, oldest first: ``(id, batch)``.

        Written in the same transaction as the change, so a change is never
        missed; the trigger runner reads them, evaluates, then cleans.
        """
        rows = self._con().execute(
            f'SELECT customer_id, batch FROM "{self.tables["dirty"]}" ORDER BY batch LIMIT ?',
            (limit,),
        )
        return [(str(c), int(b)) for c, b in rows]

    def clean(self, marks: Sequence[tuple[str, int]]) -> None:
        """Drop the customers of :meth:`dirty`'s marks unless they changed again since."""
        con = self._con()
        # One transaction: in autocommit each DELETE would be a commit of its own (an fsync).
        with _transaction(con):
            con.executemany(
                f'DELETE FROM "{self.tables["dirty"]}" WHERE customer_id = ? AND batch = ?', marks
            )

    # -- the lake's side -------------------------------------------------------

    def staged(self, limit_rows: int | None = None) -> tuple[int, pa.Table | None]:
        """The oldest staged batches (up to about ``limit_rows``): last batch number and rows."""
        con = self._con()
        rows = con.execute(
            f'SELECT batch, rows, events FROM "{self.tables["staged"]}" ORDER BY batch'
        )
        last, total = 0, 0
        parts: list[pa.Table] = []
        for batch, n, blob in rows:
            if limit_rows is not None and parts and total + n > limit_rows:
                break
            last, total = batch, total + n
            parts.append(_from_ipc(blob))
        return last, (pa.concat_tables(parts) if parts else None)

    def staged_rows(self) -> int:
        """Events staged and not yet in the lake."""
        row = self._con().execute(f'SELECT coalesce(sum(rows), 0) FROM "{self.tables["staged"]}"')
        return int(row.fetchone()[0])

    def unstage(self, last_batch: int) -> None:
        """Drop staged batches up to ``last_batch`` (the lake holds them now)."""
        self._con().execute(
            f'DELETE FROM "{self.tables["staged"]}" WHERE batch <= ?', (last_batch,)
        )

    def expire(self, before_minute: int) -> int:
        """Delete tiles, sessions and applied ids before ``before_minute``; return tiles deleted."""
        t = self.tables
        con = self._con()
        with _transaction(con):
            n = con.execute(f'DELETE FROM "{t["tiles"]}" WHERE minute < ?', (before_minute,))
            deleted = n.rowcount
            con.execute(
                f'DELETE FROM "{t["sessions"]}" WHERE last_us < ?', (before_minute * 60_000_000,)
            )
            con.execute(f'DELETE FROM "{t["applied"]}" WHERE minute < ?', (before_minute,))
        return int(deleted)

    def forget(self, customer_ids: Sequence[str]) -> int:
        """Remove customers' tiles, sessions, applied ids and staged events; return rows removed."""
        wanted = sorted({str(c) for c in customer_ids})
        if not wanted or not self.path.exists():
            return 0
        t = self.tables
        con = self._con()
        removed = 0
        # Freed pages are zeroed: the file alone must not hold the ids afterwards.
        con.execute("PRAGMA secure_delete=ON")
        with _transaction(con):
            for start in range(0, len(wanted), _CHUNK):
                part = wanted[start : start + _CHUNK]
                marks = ",".join("?" * len(part))
                for kind in ("tiles", "sessions", "applied", "dirty"):
                    cur = con.execute(
                        f'DELETE FROM "{t[kind]}" WHERE customer_id IN ({marks})', part
                    )
                    removed += cur.rowcount
            value_set = pa.array(wanted, pa.string())
            rows = con.execute(f'SELECT batch, events FROM "{t["staged"]}"').fetchall()
            for batch, blob in rows:
                table = _from_ipc(blob)
                hit = pc.is_in(table.column("customer_id"), value_set=value_set)
                if not pc.any(hit).as_py():
                    continue
                kept = table.filter(pc.invert(hit))
                removed += table.num_rows - kept.num_rows
                if kept.num_rows:
                    con.execute(
                        f'UPDATE "{t["staged"]}" SET rows = ?, events = ? WHERE batch = ?',
                        (kept.num_rows, _ipc(kept), batch),
                    )
                else:
                    con.execute(f'DELETE FROM "{t["staged"]}" WHERE batch = ?', (batch,))
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = self.path.read_bytes()
        if any(c.encode("utf8") in data for c in wanted):
            # Copies left in pages that B-tree rebalancing freed before secure_delete.
            con.execute("VACUUM")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def holds(self, customer_ids: Sequence[str]) -> int:
        """Rows of any streaming table (staged events included) naming these customers."""
        if not self.path.exists():
            return 0
        wanted = sorted({str(c) for c in customer_ids})
        t = self.tables
        con = self._con()
        found = 0
        for start in range(0, len(wanted), _CHUNK):
            part = wanted[start : start + _CHUNK]
            marks = ",".join("?" * len(part))
            for kind in ("tiles", "sessions", "applied", "dirty"):
                row = con.execute(
                    f'SELECT count(*) FROM "{t[kind]}" WHERE customer_id IN ({marks})', part
                ).fetchone()
                found += int(row[0])
        value_set = pa.array(wanted, pa.string())
        for (blob,) in con.execute(f'SELECT events FROM "{t["staged"]}"'):
            table = _from_ipc(blob)
            found += int(
                pc.sum(pc.is_in(table.column("customer_id"), value_set=value_set)).as_py() or 0
            )
        return found

    # -- reading ---------------------------------------------------------------

    def read(self, customer_ids: Sequence[str], clock_us: int) -> np.ndarray:
        """Streaming feature values of customers at one request clock.

        Parameters
        ----------
        customer_ids : sequence of str
        clock_us : int
            The request clock, µs since 1970 UTC.

        Returns
        -------
        np.ndarray
            ``(len(customer_ids), len(STREAMING_NAMES))`` float64.
        """
        con = self._con()
        ids = [str(c) for c in customer_ids]
        position: dict[str, list[int]] = {}
        for i, c in enumerate(ids):
            position.setdefault(c, []).append(i)
        k = clock_us // 60_000_000
        lo = k - READ_SPAN_MINUTES
        t = self.tables
        tile_parts: list[tuple] = []
        session_parts: list[tuple] = []
        distinct = list(position)
        columns = ", ".join(TILE_COLUMNS)
        for start in range(0, len(distinct), _CHUNK):
            part = distinct[start : start + _CHUNK]
            marks = ",".join("?" * len(part))
            tile_parts += con.execute(
                f'SELECT customer_id, minute, {columns} FROM "{t["tiles"]}" '
                f"WHERE customer_id IN ({marks}) AND minute > ? AND minute <= ?",
                [*part, lo, k],
            ).fetchall()
        # A live session's last event has its tile in the window: only customers with
        # tiles can have one (most customers, most of the time, have neither).
        active = list(dict.fromkeys(row[0] for row in tile_parts))
        for start in range(0, len(active), _CHUNK):
            part = active[start : start + _CHUNK]
            marks = ",".join("?" * len(part))
            session_parts += con.execute(
                f'SELECT customer_id, last_us, views FROM "{t["sessions"]}" '
                f"WHERE customer_id IN ({marks}) AND last_us >= ?",
                [*part, (k - 30) * 60_000_000],
            ).fetchall()
        tiles = _tiles(tile_parts, position)
        sessions = _sessions(session_parts, position)
        clocks = np.full(len(ids), clock_us, np.int64)
        return merge(tiles, sessions, clocks, today_start_minutes(clocks, self.timezone))


def _rows(table: pa.Table) -> zip:
    """Parameter rows of a table; int64 columns through numpy (Arrow's ``to_pylist`` is slower)."""
    columns = [
        column.to_numpy().tolist() if pa.types.is_int64(column.type) else column.to_pylist()
        for column in table.columns
    ]
    return zip(*columns, strict=True)


def first_new(events: pa.Table, ids: list[str], known: set[str]) -> pa.Table:
    """The rows of ``events`` whose ``event_id`` is not ``known``, the first of each id only."""
    seen: set[str] = set()
    keep = np.zeros(len(ids), bool)
    for i, event_id in enumerate(ids):
        if event_id not in known and event_id not in seen:
            keep[i] = True
            seen.add(event_id)
    return events if keep.all() else events.filter(pa.array(keep))


def tile_rows_minutes(events: pa.Table) -> np.ndarray:
    """Minute index of each event (the tile it belongs to)."""
    us = pc.cast(events.column("event_timestamp"), pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return np.floor_divide(us.to_numpy(), 60_000_000)


def _expand(rows: list[tuple], position: dict[str, list[int]]) -> tuple[np.ndarray, list[tuple]]:
    """Request rows of each stored row (a customer asked twice gets its rows twice)."""
    index: list[int] = []
    out: list[tuple] = []
    for r in rows:
        for i in position[r[0]]:
            index.append(i)
            out.append(r)
    return np.asarray(index, np.int64), out


def _tiles(rows: list[tuple], position: dict[str, list[int]]) -> Tiles:
    if not rows:
        return Tiles.empty()
    index, rows = _expand(rows, position)
    matrix = np.asarray([r[1:] for r in rows], np.int64)
    values = {c: matrix[:, j + 1] for j, c in enumerate(TILE_COLUMNS)}
    return Tiles(index, matrix[:, 0], values)


def _sessions(rows: list[tuple], position: dict[str, list[int]]) -> Sessions:
    if not rows:
        return Sessions.empty()
    index, rows = _expand(rows, position)
    matrix = np.asarray([r[1:] for r in rows], np.int64)
    return Sessions(index, matrix[:, 0], matrix[:, 1])
