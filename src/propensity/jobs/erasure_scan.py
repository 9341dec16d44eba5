"""Erasure audit: find every file of a project that still holds a customer id.

:func:`find_traces` walks the project root and every configured data path
outside it (lake, quarantine, features, landing, jobs folder, online store,
MLflow database and artifacts) and reports each file that holds one of the ids:

* every file: its raw bytes (and, gzipped, its decompressed bytes), and its path;
* Parquet files: the values of every string column, read with pyarrow
  (compressed pages hide the bytes from a raw scan);
* SQLite files (online store, MLflow, Feast registry): after a WAL checkpoint,
  every text and blob value of every table, and the raw bytes of the main file,
  where deleted rows linger in free pages until overwritten.

An id matches where it is not part of a longer word (``C1`` does not match
inside ``C10``); in SQLite files Feast's serialized entity key, which carries
its own length, matches anywhere. Folders ``.git`` and virtual environments are
skipped.
"""

from __future__ import annotations

import gzip
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.config import Settings
from propensity.features.definitions import ENTITY
from propensity.features.online import entity_keys

__all__ = ["IdPattern", "Trace", "find_traces", "scan_roots"]

_WORD = "A-Za-z0-9_"
_BLOCK = 8 << 20
_SQLITE_MAGIC = b"SQLite format 3\x00"
_PARQUET_MAGIC = b"PAR1"


class IdPattern:
    """How the ids are recognised in bytes, Arrow strings and SQLite values.

    Examples
    --------
    >>> bool(IdPattern(["C1"]).search_bytes(b'{"customer_id": "C1"}'))
    True
    >>> bool(IdPattern(["C1"]).search_bytes(b"C10"))
    False
    """

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = sorted(set(ids))
        if not self.ids:
            raise ValueError("no customer id given")
        py, re2 = [], []
        for i in self.ids:
            left = bool(re.match(f"[{_WORD}]", i[0]))
            right = bool(re.match(f"[{_WORD}]", i[-1]))
            esc = re.escape(i)
            before, after = f"(?<![{_WORD}])" if left else "", f"(?![{_WORD}])" if right else ""
            py.append(before + esc + after)
            # RE2 (pyarrow) has no look-around: match the boundary character instead.
            re2.append(
                f"{f'(?:^|[^{_WORD}])' if left else ''}{esc}{f'(?:$|[^{_WORD}])' if right else ''}"
            )
        self._bytes = re.compile("|".join(py).encode("utf8"))
        self._text = re.compile("|".join(py))
        self.arrow_regex = "|".join(re2)
        self.keys = entity_keys(self.ids, ENTITY)
        self.longest = max(len(i.encode("utf8")) for i in self.ids) + max(map(len, self.keys))

    def search_bytes(self, data: bytes, start: int = 0) -> bool:
        """Whether ``data[start:]`` holds an id (look-behind still sees ``data[:start]``)."""
        return self._bytes.search(data, start) is not None

    def search_text(self, text: str) -> bool:
        """Whether ``text`` holds an id."""
        return self._text.search(text) is not None

    def arrow_mask(self, column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
        """True where a string value holds an id (null counts as false)."""
        hit = pc.match_substring_regex(column.cast(pa.string()), self.arrow_regex)
        return pc.fill_null(hit, False)


@dataclass(frozen=True)
class Trace:
    """One place where an id was found."""

    path: Path
    where: str

    def __str__(self) -> str:
        return f"{self.path}: {self.where}"


def scan_roots(settings: Settings) -> list[Path]:
    """The project root and every configured data path that lies outside it."""
    root = settings.root.resolve()
    paths = [
        settings.path(p)
        for p in (
            settings.lake_dir,
            settings.quarantine_dir,
            settings.features_dir,
            settings.landing_dir,
            settings.jobs_dir,
            settings.online_store.sqlite_path,
        )
    ]
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///") :])
        paths.append(database)
        paths += _artifact_folders(database)
    out = [root]
    for path in paths:
        path = path.resolve()
        if not path.is_relative_to(root) and not any(path.is_relative_to(p) for p in out):
            out.append(path)
    return out


def _artifact_folders(database: Path) -> list[Path]:
    """Local artifact folders of every MLflow experiment (read from its database)."""
    if not database.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT artifact_location FROM experiments").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []
    return [Path(unquote(r[0][len("file://") :])) for r in rows if str(r[0]).startswith("file://")]


def _files(roots: Iterable[Path]) -> Iterator[Path]:
    seen: set[Path] = set()
    for root in roots:
        if root.is_file():
            candidates: Iterable[Path] = [root]
        elif root.is_dir():
            candidates = _walk(root)
        else:
            continue
        for path in candidates:
            if path not in seen:
                seen.add(path)
                yield path


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        # Code and environments, not data: a venv alone is tens of thousands of files.
        dirs[:] = sorted(
            d for d in dirs if d != ".git" and not (Path(folder, d) / "pyvenv.cfg").exists()
        )
        for name in sorted(names):
            yield Path(folder, name)


def _raw_hit(path: Path, ids: IdPattern, keys: bool) -> bool:
    """Stream the bytes with an overlap so an id across two blocks is seen."""
    overlap = ids.longest + 1
    with open(path, "rb") as raw, gzip.open(raw) if _is_gzip(path) else raw as handle:
        tail = b""
        for block in _blocks(handle):
            data = tail + block
            # Position 0 of a later buffer lies inside the previous one: skip it so
            # a cut-off preceding character does not fake a boundary.
            if ids.search_bytes(data, 1 if tail else 0):
                return True
            if keys and any(k in data for k in ids.keys):
                return True
            tail = data[-overlap:]
    return False


def _blocks(handle: object) -> Iterator[bytes]:
    read = handle.read  # type: ignore[attr-defined]
    while block := read(_BLOCK):
        yield block


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _magic(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16)


def _parquet_hits(path: Path, ids: IdPattern) -> list[str]:
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException):
        return []
    names = [
        f.name
        for f in file.schema_arrow
        if pa.types.is_string(f.type)
        or pa.types.is_large_string(f.type)
        or (pa.types.is_dictionary(f.type) and pa.types.is_string(f.type.value_type))
    ]
    found: set[str] = set()
    if not names:
        return []
    try:
        for batch in file.iter_batches(columns=names, batch_size=200_000):
            for name in names:
                if name not in found and pc.any(ids.arrow_mask(batch.column(name))).as_py():
                    found.add(name)
    except (OSError, pa.ArrowException):
        return sorted(found)
    return [f"Parquet column {n!r}" for n in sorted(found)]


def _sqlite_hits(path: Path, ids: IdPattern) -> list[str]:
    out = []
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error:
        return []
    try:
        # Move committed pages from the WAL into the main file first: the main
        # file alone (a copy, a backup) must not hold the id either.
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            q = '"' + table.replace('"', '""') + '"'
            columns = [r[1] for r in con.execute(f"PRAGMA table_info({q})")]
            for column in columns:
                c = '"' + column.replace('"', '""') + '"'
                for needle in [*ids.ids, *ids.keys]:
                    arg = needle.encode("utf8") if isinstance(needle, str) else needle
                    rows = con.execute(
                        f"SELECT CAST({c} AS BLOB) FROM {q} WHERE instr(CAST({c} AS BLOB), ?) > 0",
                        (arg,),
                    )
                    if any(isinstance(needle, bytes) or ids.search_bytes(v) for (v,) in rows):
                        out.append(f"SQLite {table}.{column}")
                        break
                else:
                    continue
    except sqlite3.Error as exc:
        out.append(f"SQLite file not readable ({exc}); raw bytes only")
    finally:
        con.close()
    return out


def find_traces(settings: Settings, customer_ids: Iterable[str]) -> list[Trace]:
    """Every file of the project that still holds one of ``customer_ids``.

    Parameters
    ----------
    settings : Settings
    customer_ids : iterable of str
        Ids exactly as erased.

    Returns
    -------
    list of Trace
        Empty when nothing was found.

    Examples
    --------
    >>> find_traces(load_settings(), ["C0000042"])  # doctest: +SKIP
    []
    """
    ids = IdPattern(customer_ids)
    traces = []
    for path in _files(scan_roots(settings)):
        if ids.search_text(str(path)):
            traces.append(Trace(path, "file name"))
        try:
            magic = _magic(path)
            wheres = []
            if magic.startswith(_SQLITE_MAGIC):
                wheres += _sqlite_hits(path, ids)
            elif magic.startswith(_PARQUET_MAGIC):
                wheres += _parquet_hits(path, ids)
            if _raw_hit(path, ids, keys=magic.startswith(_SQLITE_MAGIC)):
                wheres.append("raw bytes")
        except (OSError, EOFError) as exc:
            wheres = [f"not readable ({exc})"]
        traces += [Trace(path, w) for w in wheres]
    return traces
