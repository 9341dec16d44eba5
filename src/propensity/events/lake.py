"""The event lake: partitioned Parquet files committed through a manifest.

Layout under ``root``::

    _manifest.json                         committed files, row counts, time ranges
    _lock                                  advisory lock held by the one writer
    event_month=YYYY-MM/part-<uuid>.parquet
    _staging/<uuid>/                       a writer's staged rows, never read by readers

Writers stage incoming rows as Parquet, split by month, so memory stays
bounded by one batch; the staged rows are deduped by ``event_id`` (within the
run, and against the lake's files of the same month only) with DuckDB under a
memory limit. Writers put new part files in place first and then atomically replace the
manifest (write a temporary file, fsync, ``os.replace``). Readers only look at
files listed in the manifest, so a writer killed half-way leaves the lake as it
was; its orphan files are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.events.schema import ARROW_SCHEMA

__all__ = ["EventLake", "EmptyLakeError", "StagedAppend", "MANIFEST_NAME", "duckdb_connection"]

MANIFEST_NAME = "_manifest.json"
_LOCK_NAME = "_lock"
_STAGING = "_staging"
# Every canonical column is nullable on disk: the required ones are enforced by
# validation, and Parquet writers do not all keep Arrow's nullability flag.
_DISK_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in ARROW_SCHEMA])
_BATCH_ROWS = 1_000_000
_SEQ = "__lake_seq__"
# Dictionary-encode the repetitive text columns only: building a dictionary for
# near-unique ids (event, session, order) costs time and saves nothing.
_DICTIONARY = [
    f.name
    for f in ARROW_SCHEMA
    if pa.types.is_string(f.type) and f.name not in ("event_id", "session_id", "order_id")
]
_MEMORY_LIMIT = "1GB"
_COLUMNS = ", ".join(f'"{f.name}"' for f in ARROW_SCHEMA)
# A row's content, to tell a re-sent event from another event under the same id.
_CONTENT = "hash(" + ", ".join(f'"{f.name}"' for f in ARROW_SCHEMA if f.name != "event_id") + ")"


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder) while inside.

    The kernel releases it when the holder dies, so a killed writer never leaves
    a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EmptyLakeError(LookupError):
    """The lake holds no committed files yet."""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _scan(paths: Iterable[Path], *, filename: bool = False) -> str:
    listing = ", ".join(_quote(str(p)) for p in paths)
    extra = ", filename=true" if filename else ""
    return f"read_parquet([{listing}], union_by_name=true{extra})"


@contextlib.contextmanager
def duckdb_connection() -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection for queries over the lake: UTC, bounded memory, private spill folder."""
    spill = tempfile.mkdtemp(prefix="lake-duckdb-")
    con = duckdb.connect()
    try:
        # Months and timestamps in the lake are UTC whatever the machine's zone.
        con.execute("SET TimeZone = 'UTC'")
        # Bounded memory: DuckDB spills to a private temp folder instead of
        # growing (and never into the working directory).
        con.execute(f"SET memory_limit = '{_MEMORY_LIMIT}'")
        con.execute(f"SET temp_directory = {_quote(spill)}")
        con.execute("SET threads = 2")
        con.execute("SET preserve_insertion_order = false")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _month_keys(stamps: pa.ChunkedArray) -> pa.ChunkedArray:
    """``YYYYMM`` as an integer per timestamp (UTC): much cheaper than formatting text."""
    return pc.add(pc.multiply(pc.year(stamps), 100), pc.month(stamps))


def _month_name(key: int) -> str:
    return f"{key // 100:04d}-{key % 100:02d}"


def _iso(value: Any) -> str:
    return pd.Timestamp(value).tz_convert("UTC").isoformat()


class EventLake:
    """Partitioned Parquet store of canonical events with an atomic manifest.

    Parameters
    ----------
    root : Path
        Folder of the lake; created on the first append.

    Examples
    --------
    >>> lake = EventLake(tmp_path / "lake")  # doctest: +SKIP
    >>> lake.append(events)  # doctest: +SKIP
    1000
    >>> lake.read(["customer_id", "event_timestamp"]).shape  # doctest: +SKIP
    (1000, 2)
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"EventLake({str(self.root)!r})"

    # -- reading -------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST_NAME
        if not path.exists():
            return {"version": 1, "files": []}
        manifest: dict[str, Any] = json.loads(path.read_text())
        return manifest

    def files(self) -> list[Path]:
        """Committed Parquet files, in commit order."""
        return [self.root / entry["path"] for entry in self._manifest()["files"]]

    def count(self) -> int:
        """Number of committed events (from the manifest, no data read)."""
        return sum(int(entry["rows"]) for entry in self._manifest()["files"])

    def max_timestamp(self) -> pd.Timestamp | None:
        """Latest committed ``event_timestamp`` (UTC), or None for an empty lake."""
        stamps = [entry["max_timestamp"] for entry in self._manifest()["files"]]
        return max(pd.Timestamp(s) for s in stamps) if stamps else None

    def duckdb_scan(self) -> str:
        """A DuckDB table expression over the committed files, for use in ``FROM``.

        Raises
        ------
        EmptyLakeError
            If nothing has been committed yet.

        Examples
        --------
        >>> duckdb.sql(f"SELECT count(*) FROM {lake.duckdb_scan()}")  # doctest: +SKIP
        """
        files = self.files()
        if not files:
            raise EmptyLakeError(f"the event lake at {self.root} is empty: ingest events first")
        return _scan(files)

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """Committed events as an Arrow table in the canonical schema."""
        schema = (
            _DISK_SCHEMA if columns is None else pa.schema([_DISK_SCHEMA.field(c) for c in columns])
        )
        tables = [pq.read_table(f, columns=schema.names).cast(schema) for f in self.files()]
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables)

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Committed events as a DataFrame (an empty frame for an empty lake).

        Examples
        --------
        >>> lake.read(["customer_id", "event_type"]).head()  # doctest: +SKIP
        """
        return self.read_table(columns).to_pandas()

    # -- writing -------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.root / _LOCK_NAME)

    def _commit(self, files: list[dict[str, Any]]) -> None:
        manifest = {
            "version": 1,
            "updated_at": datetime.now(UTC).isoformat(),
            "files": files,
        }
        tmp = self.root / f"{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / MANIFEST_NAME)
        # The rename itself is durable only once the directory is synced.
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _clean_orphans(self, committed: Iterable[str]) -> None:
        keep = set(committed)
        shutil.rmtree(self.root / _STAGING, ignore_errors=True)
        for path in self.root.glob("event_month=*/*.parquet"):
            if path.relative_to(self.root).as_posix() not in keep:
                path.unlink(missing_ok=True)
        for path in self.root.glob(f"{MANIFEST_NAME}.*.tmp"):
            path.unlink(missing_ok=True)

    def _publish(self, parts: list[tuple[Path, int, Any, Any]]) -> list[dict[str, Any]]:
        """Move staged part files into their month folders; return their manifest entries.

        The manifest is not touched: until the caller commits, the moved files
        are orphans that readers ignore and the next writer removes.
        """
        entries = []
        for path, rows, lo, hi in sorted(parts, key=lambda p: p[0].parent.name):
            final = self.root / path.parent.name / path.name
            final.parent.mkdir(exist_ok=True)
            os.replace(path, final)
            entries.append(
                {
                    "path": final.relative_to(self.root).as_posix(),
                    "rows": int(rows),
                    "min_timestamp": _iso(lo),
                    "max_timestamp": _iso(hi),
                }
            )
        return entries

    def _write_parts(self, con: duckdb.DuckDBPyConnection, relation: str) -> list[dict[str, Any]]:
        """Write ``relation`` as new part files (one per month) and return manifest entries."""
        staging = self.root / _STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        reader = con.sql(f"SELECT {_COLUMNS} FROM {relation}").to_arrow_reader(_BATCH_ROWS)
        writers: dict[int, _PartWriter] = {}
        try:
            for batch in reader:
                table = pa.Table.from_batches([batch]).cast(_DISK_SCHEMA)
                keys = _month_keys(table.column("event_timestamp"))
                for key in pc.unique(keys).to_pylist():
                    if key not in writers:
                        writers[key] = _PartWriter(staging, key)
                    writers[key].write(table.filter(pc.equal(keys, key)))
        finally:
            for writer in writers.values():
                writer.close()
        entries = self._publish([w.summary() for w in writers.values()])
        shutil.rmtree(staging, ignore_errors=True)
        return entries

    @contextlib.contextmanager
    def staged_append(self) -> Iterator[StagedAppend]:
        """Hold the lake's writer lock while rows are staged, then append them at once.

        Rows go to temporary Parquet files in the lake's staging area as they
        come (memory stays bounded by one batch); :meth:`StagedAppend.commit`
        dedupes them and commits one manifest. Leaving the block without a
        commit stores nothing.

        Examples
        --------
        >>> with lake.staged_append() as stage:  # doctest: +SKIP
        ...     for batch in batches:
        ...         stage.write(batch)
        ...     added = stage.commit()
        """
        with self._locked():
            manifest = self._manifest()
            self._clean_orphans(entry["path"] for entry in manifest["files"])
            folder = self.root / _STAGING / uuid.uuid4().hex
            folder.mkdir(parents=True)
            stage = StagedAppend(self, folder, manifest)
            try:
                yield stage
            finally:
                stage._close()
                shutil.rmtree(folder, ignore_errors=True)

    def append_new(self, table: pa.Table, returning: Sequence[str] | None = None) -> pa.Table:
        """Store the rows of ``table`` whose ``event_id`` is new; say which were stored.

        Within ``table`` the first row of each ``event_id`` wins. Columns beyond
        the canonical schema are not written; they are returned, with
        ``event_id``, for the rows added, so callers can attribute them.

        Parameters
        ----------
        table : pa.Table
            Canonical events (validated), optionally with extra columns.
        returning : sequence of str, optional
            Columns to return for the added rows (default: ``event_id`` and the
            extra columns).

        Returns
        -------
        pa.Table
            One row per event added to the lake.

        Examples
        --------
        >>> added = lake.append_new(events)  # doctest: +SKIP
        >>> added.num_rows <= events.num_rows  # doctest: +SKIP
        True
        """
        _check_columns(table)
        with self.staged_append() as stage:
            stage.write(table)
            return stage.commit(returning)

    def append(self, table: pa.Table) -> int:
        """Store events whose ``event_id`` is not stored yet; return the rows added.

        Atomic: either all new rows become visible (one manifest commit) or
        none do.

        Examples
        --------
        >>> lake.append(events)  # doctest: +SKIP
        1000
        >>> lake.append(events)  # re-appending adds nothing  # doctest: +SKIP
        0
        """
        return self.append_new(table).num_rows

    def erase_customers(self, ids: Iterable[str]) -> int:
        """Remove every event of the given customers; return the rows removed.

        Only files holding those customers are rewritten; the new files and
        the removal of the old ones are committed in one manifest replace.

        Examples
        --------
        >>> lake.erase_customers(["C0000042"])  # doctest: +SKIP
        17
        """
        wanted = pa.table({"customer_id": pa.array(sorted(set(ids)), pa.string())})
        if not wanted.num_rows:
            return 0
        with self._locked():
            manifest = self._manifest()
            self._clean_orphans(entry["path"] for entry in manifest["files"])
            if not manifest["files"]:
                return 0
            with duckdb_connection() as con:
                con.register("wanted", wanted)
                hits = con.execute(
                    f"SELECT filename, count(*) FROM {_scan(self.files(), filename=True)} "
                    "SEMI JOIN wanted USING (customer_id) GROUP BY filename"
                ).fetchall()
                if not hits:
                    return 0
                affected = {Path(name).relative_to(self.root).as_posix() for name, _ in hits}
                removed = sum(int(n) for _, n in hits)
                scan = _scan(self.root / p for p in sorted(affected))
                con.execute(
                    f"CREATE TEMP TABLE kept AS SELECT {_COLUMNS} FROM {scan} "
                    "ANTI JOIN wanted USING (customer_id)"
                )
                entries = self._write_parts(con, "kept")
            remaining = [e for e in manifest["files"] if e["path"] not in affected]
            self._commit(remaining + entries)
            for path in affected:
                (self.root / path).unlink(missing_ok=True)
        return removed


def _check_columns(table: pa.Table) -> None:
    missing = [f.name for f in ARROW_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"cannot append: columns {missing} of the canonical schema are missing")


class _PartWriter:
    """One Parquet file of one month, written batch by batch, with its row count and time range."""

    def __init__(self, folder: Path, key: int) -> None:
        self.path = folder / f"event_month={_month_name(key)}" / f"part-{uuid.uuid4()}.parquet"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(
            self.path, _DISK_SCHEMA, compression="zstd", use_dictionary=_DICTIONARY
        )
        self.rows = 0
        self.lo: Any = None
        self.hi: Any = None

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._writer.write_table(table)
        lo, hi = (v.as_py() for v in pc.min_max(table.column("event_timestamp")).values())
        self.rows += table.num_rows
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)

    def close(self) -> None:
        self._writer.close()

    def summary(self) -> tuple[Path, int, Any, Any]:
        return self.path, self.rows, self.lo, self.hi


class _StagedMonth:
    """The staged rows of one month, in two aligned files (same rows, same order).

    The part file is in the lake's final format; the side file holds
    ``event_id``, the staging order and the caller's extra columns. When no
    row of the month is a duplicate, the part file is published as it is,
    without a rewrite.
    """

    def __init__(self, folder: Path, key: int, side_schema: pa.Schema) -> None:
        self.key = key
        self.part = _PartWriter(folder, key)
        self.side_path = self.part.path.with_name(self.part.path.stem + ".side.parquet")
        # Read once and deleted: fast compression, no dictionaries.
        self._side = pq.ParquetWriter(
            self.side_path, side_schema, compression="snappy", use_dictionary=False
        )

    def write(self, canonical: pa.Table, side: pa.Table) -> None:
        self.part.write(canonical)
        self._side.write_table(side)

    def close(self) -> None:
        self.part.close()
        self._side.close()


class StagedAppend:
    """Rows staged for one atomic append; made by :meth:`EventLake.staged_append`.

    Staged rows are split by month as they arrive. :meth:`commit` then keeps
    the first row of each ``event_id`` among the staged rows, drops rows whose
    ``event_id`` the lake already holds, publishes one part file per month and
    commits the manifest. The lake is compared month by month, reading only
    the ``event_id`` column of the files of that month whose time range
    overlaps the staged rows: an ``event_id`` is unique within its month, so
    an event re-sent with a timestamp in another month is stored again.

    A dropped row whose content differs from the version kept (the stored
    one, else the first staged one) is a conflict: after :meth:`commit`,
    :attr:`conflicts` holds those rows (canonical and extra columns). Content
    is only compared for dropped rows, so rows that are new cost nothing more.

    With ``repeats_within=column``, :attr:`repeats` then counts, by value of
    that extra column, the dropped rows identical to an earlier staged row
    with the same value (the same source file, say): same ``event_id``, same
    content.
    """

    def __init__(self, lake: EventLake, folder: Path, manifest: dict[str, Any]) -> None:
        self._lake = lake
        self._folder = folder
        self._manifest = manifest
        self._months: dict[int, _StagedMonth] = {}
        self._side_schema: pa.Schema | None = None
        self._committed = False
        self.rows_staged = 0
        self.conflicts: pa.Table | None = None
        self.repeats: dict[Any, int] = {}

    def write(self, table: pa.Table) -> None:
        """Stage canonical events (plus extra columns, the same in every call).

        Examples
        --------
        >>> stage.write(events)  # doctest: +SKIP
        """
        if self._committed:
            raise RuntimeError("this staged append is already committed")
        _check_columns(table)
        if not table.num_rows:
            return
        extra = [n for n in table.column_names if n not in _DISK_SCHEMA.names]
        side_schema = pa.schema(
            [
                _DISK_SCHEMA.field("event_id"),
                pa.field(_SEQ, pa.int64()),
                *(table.schema.field(n) for n in extra),
            ]
        )
        if self._side_schema is None:
            self._side_schema = side_schema
        elif side_schema != self._side_schema:
            raise ValueError(
                f"staged batches differ in extra columns: {extra} after "
                f"{self._side_schema.names[2:]}"
            )
        canonical = table.select(_DISK_SCHEMA.names).cast(_DISK_SCHEMA)
        # The staging order decides which row of a repeated event_id wins.
        seq = pa.array(np.arange(self.rows_staged, self.rows_staged + table.num_rows))
        side = pa.Table.from_arrays(
            [canonical.column("event_id"), seq, *(table.column(n) for n in extra)],
            schema=side_schema,
        )
        keys = _month_keys(canonical.column("event_timestamp"))
        if keys.null_count:
            raise ValueError("cannot append: event_timestamp is null in some row")
        counts = pc.value_counts(keys)
        if len(counts) > 1:
            # One sort and one take, then slices: cheaper than a filter per month.
            order = pc.sort_indices(keys)
            canonical, side = canonical.take(order), side.take(order)
            counts = pc.value_counts(keys.take(order))
        start = 0
        for item in counts.to_pylist():
            key, n = int(item["values"]), int(item["counts"])
            if key not in self._months:
                self._months[key] = _StagedMonth(self._folder / "in", key, side_schema)
            self._months[key].write(canonical.slice(start, n), side.slice(start, n))
            start += n
        self.rows_staged += table.num_rows

    def _close(self) -> None:
        for month in self._months.values():
            month.close()

    def commit(
        self,
        returning: Sequence[str] | None = None,
        progress: Callable[[str, float, float], None] | None = None,
        repeats_within: str | None = None,
    ) -> pa.Table:
        """Dedupe the staged rows, store the new ones, commit; return the rows added.

        Parameters
        ----------
        returning : sequence of str, optional
            Columns to return for the added rows (default: ``event_id`` and the
            extra columns).
        progress : callable, optional
            Called as ``progress("store", months_done, months)``.
        repeats_within : str, optional
            An extra column: fill :attr:`repeats` with the identical repeats
            of a row among the staged rows of the same value of it.

        Returns
        -------
        pa.Table
            One row per event added, with the ``returning`` columns.
        """
        if self._committed:
            raise RuntimeError("this staged append is already committed")
        self._committed = True
        self._close()
        side_schema = self._side_schema or pa.schema(
            [_DISK_SCHEMA.field("event_id"), pa.field(_SEQ, pa.int64())]
        )
        extra = side_schema.names[2:]
        names = ["event_id", *extra] if returning is None else list(returning)
        if self._side_schema is None:
            # Nothing staged: no extra column is known, so none can be checked.
            self.conflicts = _DISK_SCHEMA.empty_table()
            _report(progress, "store", 0, 0)
            return pa.table(
                {n: pa.array([], pa.string() if n == "event_id" else pa.null()) for n in names}
            )
        unknown = [n for n in names if n not in side_schema.names]
        if repeats_within is not None and repeats_within not in extra:
            unknown.append(repeats_within)
        if unknown:
            raise ValueError(f"cannot return columns {unknown}: only {['event_id', *extra]}")
        months = [self._months[k] for k in sorted(self._months)]
        added: list[pa.Table] = []
        conflicts: list[pa.Table] = []
        parts: list[tuple[Path, int, Any, Any]] = []
        with duckdb_connection() as con:
            repeated = self._find_repeated(con, months, repeats_within)
            for done, month in enumerate(months):
                _report(progress, "store", done, len(months))
                dropped, conflicting = self._dropped_rows(con, month, repeated)
                keep = np.ones(month.part.rows, dtype=bool)
                keep[dropped] = False
                side = pq.read_table(month.side_path, columns=names)
                added.append(side.filter(keep) if len(dropped) else side)
                if len(conflicting):
                    conflicts.append(_rows_of(month, conflicting, extra))
                if repeated and repeats_within is not None:
                    self._count_repeats(con, month, repeats_within, conflicting)
                if not len(dropped):
                    parts.append(month.part.summary())
                elif len(dropped) < month.part.rows:
                    parts.append(_rewrite(month.part, keep, self._folder / "out", month.key))
        _report(progress, "store", len(months), len(months))
        if parts:
            entries = self._lake._publish(parts)
            self._lake._commit(self._manifest["files"] + entries)
        conflict_schema = pa.schema([*_DISK_SCHEMA, *(side_schema.field(n) for n in extra)])
        self.conflicts = pa.concat_tables(conflicts) if conflicts else conflict_schema.empty_table()
        if not added:
            return pa.schema([side_schema.field(n) for n in names]).empty_table()
        return pa.concat_tables(added)

    def _find_repeated(
        self, con: duckdb.DuckDBPyConnection, months: list[_StagedMonth], within: str | None
    ) -> bool:
        """Find staged rows repeating an earlier staged ``event_id``; True if any.

        Grouping by a 64-bit hash keeps the full pass cheap in memory; only
        rows whose hash repeats (real repeats and rare collisions) are then
        compared by their text ``event_id``. Table ``first_content`` then
        holds the content of each repeated id's first row; table ``repeated``
        says of each repeat whether an earlier row has its value of ``within``.
        """
        if not months:
            return False
        scan = _scan(m.side_path for m in months)
        con.execute(
            f"CREATE TEMP TABLE repeated_hashes AS SELECT hash(event_id) AS h FROM {scan} "
            "GROUP BY h HAVING count(*) > 1"
        )
        if not con.execute("SELECT count(*) FROM repeated_hashes").fetchall()[0][0]:
            return False
        group = "" if within is None else f", {_quote_ident(within)}"
        same = "false"
        if within is not None:
            same = f"row_number() OVER (PARTITION BY event_id{group} ORDER BY {_SEQ}) > 1"
        con.execute(
            f"CREATE TEMP TABLE repeated AS SELECT {_SEQ}, {same} AS same_group FROM ("
            f"SELECT event_id, {_SEQ}{group} FROM {scan} "
            "WHERE hash(event_id) IN (SELECT h FROM repeated_hashes)) "
            f"QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY {_SEQ}) > 1"
        )
        if not con.execute("SELECT count(*) FROM repeated").fetchall()[0][0]:
            return False
        firsts = " UNION ALL ".join(
            f"SELECT event_id, {_SEQ}, content FROM {_with_content(m)}" for m in months
        )
        con.execute(
            f"CREATE TEMP TABLE first_content AS SELECT event_id, content FROM ({firsts}) "
            "WHERE hash(event_id) IN (SELECT h FROM repeated_hashes) "
            f"QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY {_SEQ}) = 1"
        )
        return True

    def _count_repeats(
        self,
        con: duckdb.DuckDBPyConnection,
        month: _StagedMonth,
        column: str,
        conflicting: np.ndarray,
    ) -> None:
        """Add the month's identical repeats within each value of ``column`` to :attr:`repeats`."""
        side = f"read_parquet({_quote(str(month.side_path))}, file_row_number=true)"
        group = _quote_ident(column)
        con.register(
            "conflicting", pa.table({"file_row_number": pa.array(conflicting, pa.int64())})
        )
        rows = con.execute(
            f"SELECT {group}, count(*) FROM {side} "
            f"WHERE {_SEQ} IN (SELECT {_SEQ} FROM repeated WHERE same_group) "
            "AND file_row_number NOT IN (SELECT file_row_number FROM conflicting) GROUP BY 1"
        ).fetchall()
        con.unregister("conflicting")
        for value, n in rows:
            self.repeats[value] = self.repeats.get(value, 0) + int(n)

    def _dropped_rows(
        self, con: duckdb.DuckDBPyConnection, month: _StagedMonth, repeated: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions, in the month's staged files, of the rows not to store and of the conflicts.

        A dropped row conflicts when its content differs from the stored row
        of its id, or (none stored) from the first staged row of its id.
        """
        conditions = []
        if repeated:
            conditions.append(f"{_SEQ} IN (SELECT {_SEQ} FROM repeated)")
        folder = f"event_month={_month_name(month.key)}/"
        lo, hi = pd.Timestamp(month.part.lo), pd.Timestamp(month.part.hi)
        stored = [
            self._lake.root / entry["path"]
            for entry in self._manifest["files"]
            if entry["path"].startswith(folder)
            and pd.Timestamp(entry["min_timestamp"]) <= hi
            and pd.Timestamp(entry["max_timestamp"]) >= lo
        ]
        if stored:
            conditions.append(f"event_id IN (SELECT event_id FROM {_scan(stored)})")
        if not conditions:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        side = f"read_parquet({_quote(str(month.side_path))}, file_row_number=true)"
        rows = con.execute(
            f"SELECT file_row_number FROM {side} WHERE {' OR '.join(conditions)}"
        ).fetchnumpy()["file_row_number"]
        dropped = np.sort(np.asarray(rows, dtype=np.int64))
        if not len(dropped):
            return dropped, dropped
        # Only dropped rows are compared: their content is read back here.
        con.register("dropped", pa.table({"file_row_number": pa.array(dropped)}))
        reference = "NULL"
        if repeated:
            reference = "(SELECT f.content FROM first_content f WHERE f.event_id = s.event_id)"
        if stored:
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE stored_content AS "
                f"SELECT event_id, {_CONTENT} AS content FROM {_scan(stored)} "
                f"WHERE event_id IN (SELECT event_id FROM {side} "
                "SEMI JOIN dropped USING (file_row_number))"
            )
            lake = "(SELECT min(t.content) FROM stored_content t WHERE t.event_id = s.event_id)"
            reference = f"coalesce({lake}, {reference})"
        conflicting = con.execute(
            f"SELECT s.file_row_number FROM {_with_content(month)} s "
            "SEMI JOIN dropped USING (file_row_number) "
            f"WHERE s.content <> {reference}"
        ).fetchnumpy()["file_row_number"]
        con.unregister("dropped")
        return dropped, np.sort(np.asarray(conflicting, dtype=np.int64))


def _with_content(month: _StagedMonth) -> str:
    """The month's side file beside each row's content hash (the part file, row by row)."""
    side = f"read_parquet({_quote(str(month.side_path))}, file_row_number=true)"
    part = f"read_parquet({_quote(str(month.part.path))})"
    return (
        f"(SELECT side.*, {_CONTENT} AS content FROM {side} AS side POSITIONAL JOIN {part} AS part)"
    )


def _rows_of(month: _StagedMonth, positions: np.ndarray, extra: list[str]) -> pa.Table:
    """Canonical and extra columns of some staged rows of a month."""
    rows = pa.array(positions)
    table = pq.read_table(month.part.path).take(rows)
    side = pq.read_table(month.side_path, columns=extra).take(rows)
    for name in extra:
        table = table.append_column(name, side.column(name))
    return table


def _rewrite(
    part: _PartWriter, keep: np.ndarray, folder: Path, key: int
) -> tuple[Path, int, Any, Any]:
    """Write the kept rows of a staged part file to a new part file under ``folder``."""
    out = _PartWriter(folder, key)
    try:
        start = 0
        for batch in pq.ParquetFile(part.path).iter_batches(batch_size=_BATCH_ROWS):
            mask = pa.array(keep[start : start + batch.num_rows])
            start += batch.num_rows
            out.write(pa.Table.from_batches([batch]).filter(mask))
    finally:
        out.close()
    return out.summary()


def _report(
    progress: Callable[[str, float, float], None] | None, text: str, done: float, total: float
) -> None:
    if progress is not None:
        progress(text, done, total)
