"""The SQLite online-store plugin: Feast's SQLite store with bulk writes, reads and erasure.

Selected in the Feast configuration by its class path::

    online_store:
      type: propensity.features.online.sqlite.BulkSqliteOnlineStore
      path: data/online_store.db

It keeps Feast's layout (one table ``<project>_<view>``, a row per entity key
and feature; stored ``WITHOUT ROWID``, see :func:`clustered`), so everything
Feast does (``get_online_features``, ``push``, ``materialize``, ``feast
teardown``) works unchanged; on top it has

* ``online_write_batch`` with one ``executemany`` per batch in one transaction
  (Feast's issues a statement per value): Feast's own ``materialize``,
  ``write_to_online_store`` and ``push`` take it;
* :meth:`BulkSqliteOnlineStore.bulk_writer`, the Arrow path of
  :func:`~propensity.features.online.write_many`: one row per customer staged
  in a temp table, expanded into Feast's rows by one ``INSERT ... SELECT`` in C;
* :meth:`BulkSqliteOnlineStore.reader`, the vectorized read of
  :class:`~propensity.features.online.SqliteReader`;
* :meth:`BulkSqliteOnlineStore.materialized_views`, which views hold rows
  (the scoring service's readiness);
* packed rows (:mod:`._packed`): one row per entity in ``_packed_<project>``
  holding each view's values, which the scoring read steps through instead of
  a row per feature; every write of the plugin refreshes them in its
  transaction;
* :meth:`BulkSqliteOnlineStore.delete_entities`, erasure that leaves no copy
  of the deleted keys in the database file;
* the materialization marks, table ``_materialized_<project>`` (outside
  Feast's ``<project>_%`` tables), so an incremental write into a new file
  writes everything.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from feast import FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import compute_table_id, extract_text_and_num
from feast.infra.online_stores.sqlite import SqliteOnlineStore, SqliteOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.utils import to_naive_utc

from . import _packed
from ._bulk import BulkWrites, Chunk, ViewPlan, _utc
from ._codec import encode_matrix, encode_values, sqlite_epochs, texts
from ._packed import quote_name as _quote
from ._read import SqliteReader
from .tiles import use_wal

__all__ = ["BulkSqliteOnlineStore", "BulkSqliteOnlineStoreConfig", "clustered", "marks_table"]


def marks_table(project: str) -> str:
    """The table of a project's materialization marks (view, end of the last interval).

    Feast names its own tables ``<project>_<view>``: the prefix keeps this one
    out of every ``<project>_%`` pattern.
    """
    return f"_materialized_{project}"


def _upsert_sql(table: str) -> str:
    """The row-per-value upsert of Feast's SQLite store (without vector or value_num)."""
    columns = ["entity_key", "feature_name", "value", "value_text", "event_ts", "created_ts"]
    update = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
    return (
        f"INSERT INTO {_quote(table)} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {update};"
    )


def clustered(conn: sqlite3.Connection, table: str) -> bool:
    """Store ``table``'s rows in its primary-key B-tree (``WITHOUT ROWID``); True if rebuilt.

    Feast creates a rowid table with a primary key on (entity_key, feature_name):
    a read finds each row in that index, then again in the table by its rowid.
    Without a rowid the index *is* the table, so a read is one B-tree walk (the
    scoring read measured about 10 % faster that way).
    Same columns, same key, same statements: Feast's reader and writers, ours and
    the erasure work on either layout, so a store written before is read as it is
    and rebuilt once here, in one transaction, when it is next applied or written.
    """
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    if row is None or "WITHOUT ROWID" in str(row[0]).upper():
        return False
    columns = [(c[1], c[2]) for c in conn.execute(f"PRAGMA table_info({_quote(table)})")]
    names = ", ".join(_quote(name) for name, _ in columns)
    rebuilt = _quote(f"{table}__clustered")
    in_transaction = conn.in_transaction
    if not in_transaction:
        conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"DROP TABLE IF EXISTS {rebuilt}")
        conn.execute(
            f"CREATE TABLE {rebuilt} ("
            + ", ".join(f"{_quote(name)} {kind}" for name, kind in columns)
            + ", PRIMARY KEY(entity_key, feature_name)) WITHOUT ROWID"
        )
        conn.execute(
            f"INSERT INTO {rebuilt} ({names}) SELECT {names} FROM {_quote(table)} "
            "ORDER BY entity_key, feature_name"
        )
        conn.execute(f"DROP TABLE {_quote(table)}")
        conn.execute(f"ALTER TABLE {rebuilt} RENAME TO {_quote(table)}")
        # The index Feast's apply creates (it would re-create it anyway).
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {_quote(table + '_ek')} ON {_quote(table)} (entity_key)"
        )
    except BaseException:
        if not in_transaction:
            conn.execute("ROLLBACK")
        raise
    if not in_transaction:
        conn.execute("COMMIT")
    return True


class BulkSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """Configuration of :class:`BulkSqliteOnlineStore` (that of Feast's SQLite store)."""

    # The class path Feast resolves the store from (type: in feature_store.yaml).
    type: Literal["propensity.features.online.sqlite.BulkSqliteOnlineStore"] = (
        "propensity.features.online.sqlite.BulkSqliteOnlineStore"  # type: ignore[assignment]
    )


class BulkSqliteOnlineStore(BulkWrites, SqliteOnlineStore):
    """Feast's SQLite online store with bulk writes, vectorized reads and erasure."""

    kind = "sqlite"

    def bulk_writer(self, config: RepoConfig, wal: bool) -> _SqliteWriter:
        return _SqliteWriter(config, wal)

    def update(
        self,
        config: RepoConfig,
        tables_to_delete: Sequence[FeatureView],
        tables_to_keep: Sequence[FeatureView],
        entities_to_delete: Sequence[Any],
        entities_to_keep: Sequence[Any],
        partial: bool,
    ) -> None:
        """Feast's apply, then every kept view's table clustered and packed.

        See :func:`clustered` and :mod:`._packed` (a copy turned off by a
        foreign write is rebuilt here).
        """
        super().update(
            config, tables_to_delete, tables_to_keep, entities_to_delete, entities_to_keep, partial
        )
        online = config.online_store
        if online.vector_enabled or getattr(online, "enable_openai_compatible_store", False):
            return  # Feast's vector tables: left as Feast made them
        versioning = config.registry.enable_online_feature_view_versioning
        conn = sqlite3.connect(self._get_db_path(config), isolation_level=None, timeout=60)
        try:
            for view in tables_to_keep:
                table = compute_table_id(config.project, view, versioning)
                clustered(conn, table)
                _packed.ensure(conn, config.project, table)
            for view in tables_to_delete:
                table = compute_table_id(config.project, view, versioning)
                _packed.drop(conn, config.project, table)
        finally:
            conn.close()

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]],
        progress: Callable[[int], Any] | None,
    ) -> None:
        """Feast's interface, in one ``executemany`` and one transaction per batch.

        The written entities' packed rows are refreshed in the same transaction.
        """
        online = config.online_store
        if online.vector_enabled or getattr(online, "enable_openai_compatible_store", False):
            # Those add columns (vector_value, value_num) only Feast's writer fills.
            super().online_write_batch(config, table, data, progress)
            return
        version = config.entity_key_serialization_version
        rows = []
        keys = []
        for entity, values, stamp, created in data:
            key = serialize_entity_key(entity, entity_key_serialization_version=version)
            keys.append(key)
            # Naive UTC datetimes: Feast's sqlite3 adapter stores their epoch seconds.
            ts = to_naive_utc(stamp)
            cts = to_naive_utc(created) if created is not None else None
            rows += [
                (
                    key,
                    name,
                    value.SerializeToString(),
                    extract_text_and_num(value, False)[0],
                    ts,
                    cts,
                )
                for name, value in values.items()
            ]
        rows.sort(key=lambda row: (row[0], row[1]))  # primary-key order for the B-tree
        versioning = config.registry.enable_online_feature_view_versioning
        name = compute_table_id(config.project, table, versioning)
        with self._get_conn(config) as conn:
            conn.execute("BEGIN IMMEDIATE")
            _packed.create(conn, config.project, name)
            kept = _packed.complete(conn, [name])
            conn.executemany(_upsert_sql(name), rows)
            _packed.refresh(conn, config.project, name, _packed.stage_keys(conn, keys))
            _packed.keep_complete(conn, kept)
        if progress:
            progress(len(data))

    def reader(
        self,
        config: RepoConfig,
        feature_refs: Sequence[str],
        *,
        ttls: Mapping[str, float] | None = None,
        columns: Sequence[str] = (),
        executor: Executor | None = None,
    ) -> SqliteReader:
        """The vectorized read of ``feature_refs`` (``"view:feature"``) from this store."""
        return SqliteReader(
            self._get_db_path(config),
            feature_refs,
            project=config.project,
            ttls=ttls,
            columns=columns,
            executor=executor,
        )

    @staticmethod
    def materialized_views(path: str | Path, project: str, views: Sequence[str]) -> set[str]:
        """Those of ``views`` whose table holds materialized rows.

        A view counts when it has a materialization mark, or, for a store
        written without marks (before they existed, or by Feast's stock
        ``materialize``), when its ``<project>_<view>`` table is not empty.
        A missing file holds none.
        """
        path = Path(path)
        if not path.exists():
            return set()
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
            found: set[str] = set()
            marks = marks_table(project)
            if marks in tables:
                found.update(row[0] for row in con.execute(f"SELECT view FROM {_quote(marks)}"))
            for view in views:
                table = f"{project}_{view}"
                if (
                    view not in found
                    and table in tables
                    and con.execute(f"SELECT 1 FROM {_quote(table)} LIMIT 1").fetchone()
                ):
                    found.add(view)
            return found & set(views)
        finally:
            con.close()

    @staticmethod
    def delete_entities(path: str | Path, project: str, keys: Sequence[bytes]) -> tuple[int, bool]:
        """Delete the entity rows so that the database file alone no longer holds them.

        ``secure_delete`` zeroes the freed bytes, a WAL checkpoint truncates the
        log (it holds the pages as they were), and ``VACUUM`` rebuilds the file
        if it still holds a key (copies left by earlier B-tree rebalancing).

        Returns
        -------
        tuple of (int, bool)
            Rows deleted, and whether the file had to be vacuumed.
        """
        path = Path(path)
        if not path.exists() or not keys:
            return 0, False
        con = sqlite3.connect(path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA secure_delete=ON")
            tables = [
                row[0]
                for row in con.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ?",
                    (f"{project}_%",),
                )
            ]
            marks = ", ".join("?" * len(keys))
            removed = 0
            con.execute("BEGIN IMMEDIATE")  # a reader never sees a half-erased customer
            try:
                kept = _packed.complete(con, tables)
                for table in tables:
                    cursor = con.execute(
                        f"DELETE FROM {_quote(table)} WHERE entity_key IN ({marks})", list(keys)
                    )
                    removed += cursor.rowcount
                _packed.delete(con, project, keys)
                _packed.keep_complete(con, kept)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            vacuumed = False
            data = path.read_bytes()
            if any(k in data for k in keys):
                con.execute("VACUUM")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                vacuumed = True
            return removed, vacuumed
        finally:
            con.close()


class _SqliteWriter:
    def __init__(self, config: RepoConfig, wal: bool) -> None:
        for option in ("vector_enabled", "enable_openai_compatible_store"):
            if getattr(config.online_store, option, False):
                # Those add columns (vector_value, value_num) this writer does not fill.
                raise ValueError(
                    f"online_store.{option} is set: use FeatureStore.materialize instead"
                )
        self.path = BulkSqliteOnlineStore._get_db_path(config)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are ours, opened with BEGIN IMMEDIATE.
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        if wal:
            use_wal(self.conn)
            self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA cache_size=-262144")
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self.sql: dict[str, str] = {}
        self.tables: dict[str, str] = {}
        self.expand: dict[str, str] = {}
        self.staged: dict[str, int] = {}
        # ->> needs SQLite 3.38; older libraries take the row-by-row path.
        self.bulk_sql = sqlite3.sqlite_version_info >= (3, 38, 0)

    def prepare(self, plan: ViewPlan) -> None:
        table = compute_table_id(plan.project, plan.view, plan.versioning)
        q = _quote(table)
        # The DDL Feast's SqliteOnlineStore.update runs, for stores never applied.
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {q} (entity_key BLOB, feature_name TEXT, value BLOB, "
            "value_text TEXT, vector_value BLOB, event_ts timestamp, created_ts timestamp, "
            "PRIMARY KEY(entity_key, feature_name)) WITHOUT ROWID"
        )
        clustered(self.conn, table)  # a table written before, in Feast's rowid layout
        self.conn.execute(f"CREATE INDEX IF NOT EXISTS {_quote(table + '_ek')} ON {q} (entity_key)")
        _packed.ensure(self.conn, plan.project, table)
        self.tables[plan.view.name] = table
        self.sql[plan.view.name] = _upsert_sql(table)
        if self.bulk_sql:
            self.expand[plan.view.name] = self._staging(plan)

    def rows(self, plan: ViewPlan, chunk: Chunk) -> Iterator[tuple[Any, ...]]:
        """Rows in Feast's layout, entity-major, built with C-level iterators."""
        names = [name for name, _ in plan.features]
        n_features = len(names)
        # Sorted entity keys walk the primary-key B-tree in order: fewer page misses.
        order = sorted(range(len(chunk.keys)), key=chunk.keys.__getitem__)

        def ordered(column: list[Any]) -> list[Any]:
            return [column[i] for i in order]

        def flat(columns: list[list[Any]]) -> Iterator[Any]:
            return itertools.chain.from_iterable(zip(*map(ordered, columns), strict=True))

        def each(column: list[Any]) -> Iterator[Any]:
            return itertools.chain.from_iterable(
                map(itertools.repeat, ordered(column), itertools.repeat(n_features))
            )

        pairs = list(zip(chunk.arrays, (vt for _, vt in plan.features), strict=True))
        groups: list[Iterator[Any]] = [
            flat(chunk.values(plan)),
            flat([texts(a, t) for a, t in pairs]),
        ]
        event = each(sqlite_epochs(chunk.event_ts))
        if chunk.created_ts is not None:
            created: Iterator[Any] = each(sqlite_epochs(chunk.created_ts))
        else:
            created = itertools.repeat(None)
        return zip(
            each(chunk.keys), itertools.cycle(names), *groups, event, created
        )  # fmt: skip

    def _staging(self, plan: ViewPlan) -> str:
        """Temp tables that let SQLite expand one row per entity into Feast's rows."""
        k = self.staged.setdefault(plan.view.name, len(self.staged))
        stage, names = f"temp._ow_stage_{k}", f"temp._ow_names_{k}"
        self.conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS _ow_stage_{k} "
            "(ek BLOB, vals BLOB, texts TEXT, ts INTEGER, cts INTEGER)"
        )
        self.conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS _ow_names_{k} (j INTEGER, name TEXT, off INTEGER)"
        )
        self.conn.execute(f"DELETE FROM {names}")
        ordered = sorted(enumerate(name for name, _ in plan.features), key=lambda p: p[1])
        self.conn.executemany(
            f"INSERT INTO {names} VALUES (?, ?, ?)",
            [(j, name, j * _SLOT + 1) for j, name in ordered],
        )
        table = _quote(compute_table_id(plan.project, plan.view, plan.versioning))
        # The nested loop visits staged entities in key order and names in name
        # order, i.e. primary-key order; the byte at each slot's start is the
        # value's length, read back with instr() over the 256 possible bytes.
        return (
            f"INSERT INTO {table} (entity_key, feature_name, value, value_text, event_ts, "
            "created_ts) "
            "SELECT s.ek, n.name, "
            "substr(s.vals, n.off + 1, instr(?1, substr(s.vals, n.off, 1)) - 1), "
            "s.texts ->> ('$[' || n.j || ']'), s.ts, s.cts "
            f"FROM {stage} AS s CROSS JOIN {names} AS n WHERE true "
            "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
            "value_text = excluded.value_text, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts"
        )

    def encode(self, parts: list[tuple[ViewPlan, Chunk]]) -> list[tuple[ViewPlan, Any, bool]]:
        """Runs in the prefetch thread: everything but SQLite itself."""
        encoded = []
        for plan, chunk in parts:
            staged = None
            if self.bulk_sql:
                staged = _stage_rows(plan, chunk)
            if staged is not None:
                encoded.append((plan, staged, True))
            else:
                encoded.append((plan, list(self.rows(plan, chunk)), False))
        return encoded

    def write(self, encoded: list[tuple[ViewPlan, Any, bool]]) -> None:
        # One transaction for the whole chunk: all of a customer's rows, of every
        # view in this call, become visible together.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            tables = [self.tables[plan.view.name] for plan, _, _ in encoded]
            kept = _packed.complete(self.conn, tables)
            for (plan, rows, staged), table in zip(encoded, tables, strict=True):
                if not staged:
                    self.conn.executemany(self.sql[plan.view.name], rows)
                    keys = _packed.stage_keys(self.conn, [row[0] for row in rows])
                else:
                    k = self.staged[plan.view.name]
                    self.conn.execute(f"DELETE FROM temp._ow_stage_{k}")
                    self.conn.executemany(
                        f"INSERT INTO temp._ow_stage_{k} VALUES (?, ?, ?, ?, ?)", rows
                    )
                    # One C-level statement: sqlite3 releases the GIL while it runs, so
                    # the prefetch thread encodes the next chunk meanwhile.
                    self.conn.execute(self.expand[plan.view.name], (_BYTES,))
                    keys = f"SELECT ek FROM temp._ow_stage_{k}"
                _packed.refresh(self.conn, plan.project, table, keys)
            _packed.keep_complete(self.conn, kept)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _marks(self, project: str) -> str:
        table = _quote(marks_table(project))
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (view TEXT PRIMARY KEY, end_ts TEXT)"
        )
        return table

    def written_end(self, plan: ViewPlan) -> datetime | None:
        table = self._marks(plan.project)
        row = self.conn.execute(
            f"SELECT end_ts FROM {table} WHERE view = ?", (plan.view.name,)
        ).fetchone()
        return _utc(datetime.fromisoformat(row[0])) if row else None

    def mark(self, plan: ViewPlan, end: datetime) -> None:
        table = self._marks(plan.project)
        self.conn.execute(
            f"INSERT INTO {table} VALUES (?, ?) "
            "ON CONFLICT(view) DO UPDATE SET end_ts = excluded.end_ts",
            (plan.view.name, end.isoformat()),
        )

    def close(self) -> None:
        self.conn.close()


_SLOT = 16  # bytes per staged value: one length byte + up to 15 bytes of ValueProto
_BYTES = bytes(range(256))


def _stage_rows(plan: ViewPlan, chunk: Chunk) -> list[tuple[Any, ...]] | None:
    """One row per entity: key, all values in fixed slots, texts as JSON, timestamps.

    Returns None when a value does not fit a slot (long strings, rare types).
    """
    n = len(chunk.keys)
    slots = np.zeros((n, len(plan.features), _SLOT), dtype=np.uint8)
    text_columns = []
    for j, (array, (_, vtype)) in enumerate(zip(chunk.arrays, plan.features, strict=True)):
        encoded = encode_matrix(array, vtype)
        if encoded is None:
            values = encode_values(array, vtype)
            if max(map(len, values), default=0) >= _SLOT:
                return None
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
            mat = np.zeros((n, _SLOT - 1), dtype=np.uint8)
            for i, raw in enumerate(values):
                mat[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        else:
            mat, lengths = encoded
        slots[:, j, 0] = lengths
        slots[:, j, 1 : 1 + mat.shape[1]] = mat
        text_columns.append(texts(array, vtype))
    width = len(plan.features) * _SLOT
    flat = slots.tobytes()
    blobs = [flat[i * width : (i + 1) * width] for i in range(n)]
    # ensure_ascii keeps JSON plain ASCII; SQLite's ->> decodes the escapes.
    docs = list(map(json.dumps, zip(*text_columns, strict=True)))
    event = sqlite_epochs(chunk.event_ts)
    created = (
        sqlite_epochs(chunk.created_ts) if chunk.created_ts is not None else itertools.repeat(None)
    )
    rows = list(zip(chunk.keys, blobs, docs, event, created, strict=False))
    rows.sort(key=lambda row: row[0])  # primary-key order for the B-tree
    return rows
