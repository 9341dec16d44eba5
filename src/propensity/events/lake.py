"""The event lake: partitioned Parquet files committed through a manifest.

Layout under ``root``::

    _manifest.json                         committed files, row counts, time ranges
    _lock                                  advisory lock held by the one writer
    event_month=YYYY-MM/part-<uuid>.parquet

Writers put new part files in place first and then atomically replace the
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
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.events.schema import ARROW_SCHEMA

__all__ = ["EventLake", "EmptyLakeError", "MANIFEST_NAME"]

MANIFEST_NAME = "_manifest.json"
_LOCK_NAME = "_lock"
_STAGING = "_staging"
# Test hook: seconds to sleep after each part file is moved into place, so a
# test can kill a writer between the data files and the manifest commit.
_PAUSE_ENV = "PROPENSITY_LAKE_TEST_PAUSE"
# Every canonical column is nullable on disk: the required ones are enforced by
# validation, and Parquet writers do not all keep Arrow's nullability flag.
_DISK_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in ARROW_SCHEMA])
_BATCH_ROWS = 1_000_000
_COLUMNS = ", ".join(f'"{f.name}"' for f in ARROW_SCHEMA)


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


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    # Months and timestamps in the lake are UTC whatever the machine's zone.
    con.execute("SET TimeZone = 'UTC'")
    # Bounded memory: DuckDB spills to its temp folder instead of growing.
    con.execute("SET memory_limit = '2GB'")
    con.execute("SET preserve_insertion_order = false")
    return con


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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        # flock is released by the kernel when the holder dies, so a killed
        # writer never leaves a stale lock behind.
        with open(self.root / _LOCK_NAME, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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

    def _write_parts(self, con: duckdb.DuckDBPyConnection, relation: str) -> list[dict[str, Any]]:
        """Write ``relation`` as new part files (one per month) and return manifest entries."""
        staging = self.root / _STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        month = "__event_month__"
        reader = con.sql(
            f"SELECT {_COLUMNS}, strftime(event_timestamp, '%Y-%m') AS {month} FROM {relation}"
        ).to_arrow_reader(_BATCH_ROWS)
        # Arrow's Parquet writer, streamed batch by batch: several times faster
        # than DuckDB's partitioned COPY here, with memory bounded by a batch.
        writers: dict[str, tuple[Path, pq.ParquetWriter]] = {}
        stats: dict[str, list[Any]] = {}
        try:
            for batch in reader:
                keys = batch.column(month)
                for key in pc.unique(keys).to_pylist():
                    part = (
                        batch.filter(pc.equal(keys, key)).drop_columns([month]).cast(_DISK_SCHEMA)
                    )
                    if key not in writers:
                        path = staging / f"event_month={key}" / f"part-{uuid.uuid4()}.parquet"
                        path.parent.mkdir()
                        writers[key] = (
                            path,
                            pq.ParquetWriter(path, _DISK_SCHEMA, compression="zstd"),
                        )
                        stats[key] = [0, None, None]
                    writers[key][1].write_batch(part)
                    lo, hi = pc.min_max(part.column("event_timestamp")).values()
                    entry = stats[key]
                    entry[0] += part.num_rows
                    entry[1] = lo.as_py() if entry[1] is None else min(entry[1], lo.as_py())
                    entry[2] = hi.as_py() if entry[2] is None else max(entry[2], hi.as_py())
        finally:
            for _, writer in writers.values():
                writer.close()
        pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
        entries = []
        for key in sorted(writers):
            path = writers[key][0]
            rows, lo, hi = stats[key]
            final = self.root / path.parent.name / path.name
            final.parent.mkdir(exist_ok=True)
            os.replace(path, final)
            entries.append(
                {
                    "path": final.relative_to(self.root).as_posix(),
                    "rows": int(rows),
                    "min_timestamp": pd.Timestamp(lo).tz_convert("UTC").isoformat(),
                    "max_timestamp": pd.Timestamp(hi).tz_convert("UTC").isoformat(),
                }
            )
            if pause:
                time.sleep(pause)
        shutil.rmtree(staging, ignore_errors=True)
        return entries

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
        missing = [f.name for f in ARROW_SCHEMA if f.name not in table.column_names]
        if missing:
            raise ValueError(
                f"cannot append: columns {missing} of the canonical schema are missing"
            )
        order = "__lake_order__"
        canonical = set(ARROW_SCHEMA.names)
        extra = [name for name in table.column_names if name not in canonical]
        batch = table.append_column(order, pa.array(range(table.num_rows), pa.int64()))
        with self._locked():
            manifest = self._manifest()
            self._clean_orphans(entry["path"] for entry in manifest["files"])
            con = _connect()
            con.register("batch", batch)
            firsts = "SELECT * FROM batch"
            distinct = con.execute("SELECT count(DISTINCT event_id) FROM batch").fetchall()
            # The window is only paid for when the batch repeats an id.
            if distinct[0][0] != batch.num_rows:
                firsts += f" QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY {order}) = 1"
            query = f"SELECT * FROM ({firsts}) b"
            if manifest["files"]:
                query += (
                    f" ANTI JOIN (SELECT event_id FROM {self.duckdb_scan()}) l USING (event_id)"
                )
            # A DuckDB temp table (which can spill) rather than a second Arrow copy.
            con.execute(f"CREATE TEMP TABLE new_rows AS {query}")
            names = ["event_id", *extra] if returning is None else list(returning)
            wanted = ", ".join(_quote_ident(c) for c in names)
            added = con.sql(f"SELECT {wanted} FROM new_rows").to_arrow_table()
            if added.num_rows:
                entries = self._write_parts(con, "new_rows")
                self._commit(manifest["files"] + entries)
            con.close()
        return added

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
            con = _connect()
            con.register("wanted", wanted)
            hits = con.execute(
                f"SELECT filename, count(*) FROM {_scan(self.files(), filename=True)} "
                "SEMI JOIN wanted USING (customer_id) GROUP BY filename"
            ).fetchall()
            if not hits:
                con.close()
                return 0
            affected = {Path(name).relative_to(self.root).as_posix() for name, _ in hits}
            removed = sum(int(n) for _, n in hits)
            scan = _scan(self.root / p for p in sorted(affected))
            con.execute(
                f"CREATE TEMP TABLE kept AS SELECT {_COLUMNS} FROM {scan} "
                "ANTI JOIN wanted USING (customer_id)"
            )
            entries = self._write_parts(con, "kept")
            con.close()
            remaining = [e for e in manifest["files"] if e["path"] not in affected]
            self._commit(remaining + entries)
            for path in affected:
                (self.root / path).unlink(missing_ok=True)
        return removed
