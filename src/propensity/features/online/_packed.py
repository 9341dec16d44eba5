"""Packed rows: all of a customer's served values in one row, beside Feast's row per feature.

Feast's SQLite layout keeps a row per (entity, feature) in a table per view: a
1,000-customer read of the quickstart's seven views steps through 44,000 rows
(about 55 ms of SQLite). The plugin keeps beside them one table per project,
``_packed_<project>``, with a row per entity key and three columns per view
table ``T``: ``T:layout`` (the id of the entity's feature names in
``_packed_layouts``), ``T:vals`` (its value bytes concatenated in the same
order) and ``T:stamp`` (its timestamp when all its rows share one). A batch
read is then one query stepping through 1,000 rows (about 8 ms).

Feast's rows stay the truth; the packed rows are a copy that the plugin's
writers (``online_write_batch``, the bulk writer, erasure) refresh in the same
transaction as the rows they write. A view's copy is read only while it is
*complete* (its table's name in ``_packed_complete``): triggers on Feast's
table remove that mark on any write, so a write by anything else (Feast's own
SQLite store on the same file, a hand-made ``UPDATE``) turns the copy off, and
readers read Feast's rows, until the next apply or bulk write rebuilds it.
The plugin's writers put the mark back only where it was before their write.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._codec import DOUBLE_RECORD, DOUBLE_TAG, NAN_DOUBLE_HEX

__all__ = [
    "COMPLETE",
    "LAYOUTS",
    "PackedReader",
    "columns",
    "complete",
    "create",
    "delete",
    "drop",
    "ensure",
    "keep_complete",
    "packed_table",
    "quote_name",
    "refresh",
    "requested",
    "stage_keys",
]

#: The view tables whose packed columns hold every entity as Feast's rows do.
COMPLETE = "_packed_complete"
#: Feature-name lists (comma-joined, in primary-key order) by id.
LAYOUTS = "_packed_layouts"


def quote_name(name: str) -> str:
    """``name`` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def packed_table(project: str) -> str:
    """The project's packed rows (outside Feast's ``<project>_%`` table names)."""
    return f"_packed_{project}"


def columns(table: str) -> tuple[str, str, str]:
    """The layout, values and timestamp columns of Feast's view table ``table``."""
    return f"{table}:layout", f"{table}:vals", f"{table}:stamp"


def _exists(conn: sqlite3.Connection, table: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return row is not None


_EVENTS = ("INSERT", "UPDATE", "DELETE")


def _trigger(table: str, event: str) -> str:
    return f"_packed_{table}_{event.lower()}"


def _marked(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute(f"SELECT name FROM {COMPLETE}")}


def complete(conn: sqlite3.Connection, tables: Sequence[str]) -> list[str]:
    """Those of ``tables`` whose packed columns are complete (readers may use them)."""
    if not _exists(conn, COMPLETE):
        return []
    done = _marked(conn)
    return [t for t in tables if t in done]


def create(conn: sqlite3.Connection, project: str, table: str) -> None:
    """Create the packed table, ``table``'s columns and the triggers that unmark it."""
    packed = packed_table(project)
    conn.execute(f"CREATE TABLE IF NOT EXISTS {COMPLETE} (name TEXT PRIMARY KEY) WITHOUT ROWID")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {LAYOUTS} (id INTEGER PRIMARY KEY, names TEXT UNIQUE)"
    )
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {quote_name(packed)} (entity_key BLOB PRIMARY KEY) "
        "WITHOUT ROWID"
    )
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({quote_name(packed)})")}
    for column, kind in zip(columns(table), ("INTEGER", "BLOB", "INTEGER"), strict=True):
        if column not in present:
            conn.execute(f"ALTER TABLE {quote_name(packed)} ADD COLUMN {quote_name(column)} {kind}")
    # Triggers missing: the table was made again (by clustered(), or by someone
    # else, and written since, perhaps): its copy is rebuilt, not trusted.
    made = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,)
        )
    }
    if not {_trigger(table, e) for e in _EVENTS} <= made:
        conn.execute(f"DELETE FROM {COMPLETE} WHERE name = ?", (table,))
    for event in _EVENTS:
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS {quote_name(_trigger(table, event))} AFTER {event} "
            f"ON {quote_name(table)} "
            f"BEGIN DELETE FROM {COMPLETE} WHERE name = {_literal(table)}; END"
        )


def ensure(conn: sqlite3.Connection, project: str, table: str) -> None:
    """:func:`create`, then rebuild ``table``'s columns from Feast's rows unless complete.

    Runs in a transaction of its own unless one is open. Called where a
    full rebuild is expected (apply, a bulk write), and after a rebuild of
    Feast's table (:func:`~propensity.features.online.sqlite.clustered`
    drops the old table, and its triggers with it).
    """
    owned = not conn.in_transaction
    if owned:
        conn.execute("BEGIN IMMEDIATE")
    try:
        create(conn, project, table)
        if not complete(conn, [table]):
            refresh(conn, project, table, None)
            conn.execute(f"INSERT INTO {COMPLETE} VALUES (?)", (table,))
    except BaseException:
        if owned:
            conn.execute("ROLLBACK")
        raise
    if owned:
        conn.execute("COMMIT")


def stage_keys(conn: sqlite3.Connection, keys: Sequence[bytes]) -> str:
    """Put ``keys`` in a temp table for :func:`refresh`; returns the query selecting them."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS _packed_keys (ek BLOB PRIMARY KEY)")
    conn.execute("DELETE FROM temp._packed_keys")
    conn.executemany("INSERT OR IGNORE INTO temp._packed_keys VALUES (?)", ((k,) for k in keys))
    return "SELECT ek FROM temp._packed_keys"


def refresh(conn: sqlite3.Connection, project: str, table: str, keys: str | None) -> None:
    """Rebuild ``table``'s packed columns of the entities that query ``keys`` selects.

    ``None`` rebuilds every entity's. Runs in the caller's transaction. An
    entity left without rows in Feast's table has the view's columns NULL.
    Names and values are concatenated in the same visit of an entity's rows,
    so they line up; an empty value (Feast's null) is stored as a NaN double.
    """
    packed = quote_name(packed_table(project))
    layout, vals, stamp = map(quote_name, columns(table))
    where = "" if keys is None else f"WHERE entity_key IN ({keys}) "
    value = f"CASE WHEN length(value) = 0 THEN x'{NAN_DOUBLE_HEX}' ELSE value END"
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS _packed_new "
        "(entity_key BLOB PRIMARY KEY, names TEXT, vals BLOB, stamp INTEGER) WITHOUT ROWID"
    )
    conn.execute("DELETE FROM temp._packed_new")
    conn.execute(
        "INSERT INTO temp._packed_new SELECT entity_key, group_concat(feature_name), "
        f"CAST(group_concat({value}, '') AS BLOB), "
        "CASE WHEN count(event_ts) = count(*) AND min(event_ts) = max(event_ts) "
        f"THEN min(event_ts) END FROM {quote_name(table)} {where}GROUP BY entity_key"
    )
    conn.execute(f"INSERT OR IGNORE INTO {LAYOUTS} (names) SELECT names FROM temp._packed_new")
    gone = "" if keys is None else f"entity_key IN ({keys}) AND "
    conn.execute(
        f"UPDATE {packed} SET {layout} = NULL, {vals} = NULL, {stamp} = NULL WHERE {gone}"
        "entity_key NOT IN (SELECT entity_key FROM temp._packed_new)"
    )
    conn.execute(
        f"INSERT INTO {packed} (entity_key, {layout}, {vals}, {stamp}) "
        f"SELECT n.entity_key, l.id, n.vals, n.stamp FROM temp._packed_new AS n "
        f"JOIN {LAYOUTS} AS l ON l.names = n.names WHERE true "
        f"ON CONFLICT(entity_key) DO UPDATE SET {layout} = excluded.{layout}, "
        f"{vals} = excluded.{vals}, {stamp} = excluded.{stamp}"
    )


def keep_complete(conn: sqlite3.Connection, tables: Sequence[str]) -> None:
    """Mark again those of ``tables`` whose columns the caller's write kept complete.

    Call with the tables that were complete *before* the write (their
    triggers removed the mark) once their packed columns are refreshed.
    """
    if not tables:
        return  # nothing was complete (perhaps no packed table at all)
    conn.executemany(f"INSERT OR IGNORE INTO {COMPLETE} VALUES (?)", ((t,) for t in tables))


def delete(conn: sqlite3.Connection, project: str, keys: Sequence[bytes]) -> int:
    """Delete the packed rows of ``keys`` (erasure, in the caller's transaction)."""
    packed = packed_table(project)
    if not keys or not _exists(conn, packed):
        return 0
    marks = ", ".join("?" * len(keys))
    sql = f"DELETE FROM {quote_name(packed)} WHERE entity_key IN ({marks})"
    return int(conn.execute(sql, list(keys)).rowcount)


def drop(conn: sqlite3.Connection, project: str, table: str) -> None:
    """Clear ``table``'s packed columns and its mark (the view left the registry)."""
    if _exists(conn, COMPLETE):
        conn.execute(f"DELETE FROM {COMPLETE} WHERE name = ?", (table,))
    packed = packed_table(project)
    if not _exists(conn, packed):
        return
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({quote_name(packed)})")}
    cleared = [c for c in columns(table) if c in present]
    if cleared:
        sets = ", ".join(f"{quote_name(c)} = NULL" for c in cleared)
        conn.execute(f"UPDATE {quote_name(packed)} SET {sets}")


@functools.lru_cache(maxsize=16)
def requested(n_keys: int) -> str:
    """The ``requested(row, key)`` table of a batch of keys, built once per batch size."""
    rows = ",".join(f"({i},?)" for i in range(n_keys))
    return f"WITH requested(row, key) AS (VALUES {rows}) "


@dataclass
class _Catalog:
    """What one connection knows of the packed schema; renewed when the schema changes."""

    version: int = -1
    views: tuple[int, ...] = ()  # views with packed columns and all their triggers
    names: dict[int, list[str]] = field(default_factory=dict)  # layout id -> feature names


@dataclass(frozen=True)
class _Layout:
    """How a packed row of one combination of view layouts maps to the matrix."""

    width: int  # values in the row
    columns: np.ndarray  # matrix column of each value that is served
    slots: np.ndarray  # their positions in the row
    dated: np.ndarray  # the views (positions in the query) with a served value
    ttls: np.ndarray  # and their TTLs


class PackedReader:
    """The batch read of some views' packed rows into a matrix (for the SQLite reader).

    Parameters
    ----------
    project : str
        Feast project (the packed table's name).
    tables : sequence of str
        Feast's table of each view.
    view_columns : sequence of mapping
        Per view, the matrix column of each served feature.
    ttls : sequence of float
        Per view, its TTL in seconds (inf: never stale).
    """

    def __init__(
        self,
        project: str,
        tables: Sequence[str],
        view_columns: Sequence[Mapping[str, int]],
        ttls: Sequence[float],
    ) -> None:
        self.table = packed_table(project)
        self.tables = list(tables)
        self.view_columns = list(view_columns)
        self.ttls = np.asarray(ttls, dtype=np.float64)
        self._local = threading.local()
        self._layouts: dict[tuple[tuple[int, ...], str], _Layout] = {}

    def _catalog(self, conn: sqlite3.Connection) -> _Catalog:
        catalog: _Catalog = getattr(self._local, "catalog", None) or _Catalog()
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if version != catalog.version:
            # A table made again loses its triggers: its mark is no longer trusted.
            triggers = set(
                conn.execute("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'")
            )
            present: set[str] = set()
            if _exists(conn, self.table) and _exists(conn, COMPLETE) and _exists(conn, LAYOUTS):
                present = {
                    r[1] for r in conn.execute(f"PRAGMA table_info({quote_name(self.table)})")
                }
            views = tuple(
                k
                for k, t in enumerate(self.tables)
                if columns(t)[0] in present
                and all((t, _trigger(t, e)) in triggers for e in _EVENTS)
            )
            catalog = _Catalog(version, views, catalog.names)
            self._local.catalog = catalog
        return catalog

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one reader per service, kept for its life
    def _sql(self, views: tuple[int, ...], n_keys: int) -> str:
        """Per requested customer with a packed row: its layouts, values and timestamps."""
        layouts, values, stamps = [], [], []
        for view in views:
            layout, vals, stamp = map(quote_name, columns(self.tables[view]))
            layouts.append(f"ifnull({layout}, '')")
            values.append(f"ifnull({vals}, x'')")
            stamps.append(f"CASE WHEN {layout} IS NULL THEN 'inf' ELSE ifnull({stamp}, 'nan') END")
        comma = " || ',' || "
        return (
            f"{requested(n_keys)}SELECT requested.row, '' || {comma.join(layouts)}, "
            f"CAST({' || '.join(values)} AS BLOB), '' || {comma.join(stamps)} "
            f"FROM requested JOIN {quote_name(self.table)} ON entity_key = requested.key"
        )

    def _layout(
        self, conn: sqlite3.Connection, catalog: _Catalog, views: tuple[int, ...], key: str
    ) -> _Layout:
        """The layout of rows whose views have the layout ids ``key`` (cached)."""
        cached = self._layouts.get((views, key))
        if cached is not None:
            return cached
        ids = [int(i) if i else None for i in key.split(",")]
        if any(i is not None and i not in catalog.names for i in ids):
            catalog.names.update(
                (i, text.split(",")) for i, text in conn.execute(f"SELECT id, names FROM {LAYOUTS}")
            )
        cols: list[int] = []
        dated: list[int] = []
        for position, (view, ident) in enumerate(zip(views, ids, strict=True)):
            names = catalog.names.get(ident, []) if ident is not None else []
            served = [self.view_columns[view].get(name, -1) for name in names]
            cols += served
            if any(c >= 0 for c in served):
                dated.append(position)
        everything = np.asarray(cols, dtype=np.intp)
        slots = np.flatnonzero(everything >= 0)
        positions = np.asarray(dated, dtype=np.intp)
        ttls = self.ttls[np.asarray(views, dtype=np.intp)[positions]]
        layout = _Layout(len(cols), everything[slots], slots, positions, ttls)
        self._layouts[(views, key)] = layout
        return layout

    def read(
        self,
        conn: sqlite3.Connection,
        keys: Sequence[bytes],
        out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        now: float,
    ) -> tuple[frozenset[int], list[int]]:
        """Fill ``out`` (matrix, oldest, found, stale) from the packed rows of ``keys``.

        Returns the views it read and the rows (positions in ``keys``) to read
        again value by value: customers holding a value other than a double,
        or whose rows in a view differ in timestamp. Views whose packed copy
        is not complete are left to the caller.
        """
        conn.execute("BEGIN")  # the marks and the rows from one snapshot
        try:
            catalog = self._catalog(conn)
            done = _marked(conn) if catalog.views else set()
            views = tuple(v for v in catalog.views if self.tables[v] in done)
            fetched = conn.execute(self._sql(views, len(keys)), keys).fetchall() if views else []
        finally:
            conn.execute("COMMIT")
        matrix, oldest, found, stale = out
        redo: list[int] = []
        groups: dict[str, list[tuple[int, str, bytes, str]]] = {}
        for row in fetched:
            groups.setdefault(row[1], []).append(row)
        for key, group in groups.items():
            layout = self._layout(conn, catalog, views, key)
            rows = np.array([r[0] for r in group], dtype=np.intp)
            blob = b"".join([r[2] for r in group])
            if len(blob) != DOUBLE_RECORD.itemsize * layout.width * len(rows):
                redo += rows.tolist()  # values of other types: lengths differ
                continue
            records = np.frombuffer(blob, dtype=DOUBLE_RECORD).reshape(len(rows), layout.width)
            stamps = np.fromstring(",".join(r[3] for r in group), dtype=np.float64, sep=",")
            stamps = stamps.reshape(len(rows), len(views))[:, layout.dated]
            values = records["value"]
            bad = (records["tag"] != DOUBLE_TAG).any(axis=1) | np.isnan(stamps).any(axis=1)
            if bad.any():
                redo += rows[bad].tolist()
                good = ~bad
                rows, stamps, values = rows[good], stamps[good], values[good]
            if not len(rows) or not len(layout.dated):
                continue
            matrix[rows[:, None], layout.columns] = values[:, layout.slots]
            found[rows] = True
            oldest[rows] = np.minimum(oldest[rows], stamps.min(axis=1))
            stale[rows] |= ((now - stamps) > layout.ttls).any(axis=1)
        return frozenset(views), redo
