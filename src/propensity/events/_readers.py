"""Read source files (CSV, Parquet, JSON Lines) as bounded Arrow batches, untouched.

Values are not interpreted here: CSV columns are read as text and JSON values
keep their JSON type (or become text when a column mixes types within a
chunk), so that validation sees exactly what the source held and can name the
bad value.

Files are streamed: Parquet by record batches, CSV through Arrow's streaming
reader, JSON Lines in blocks of whole lines, so memory stays bounded by the
batch size whatever the file size.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

__all__ = [
    "BATCH_ROWS",
    "IngestError",
    "SUFFIXES",
    "SourceBatch",
    "expand_paths",
    "iter_source",
    "read_source",
    "source_columns",
]

SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq", ".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
# Rows handed to validation at once: large enough to amortise DuckDB's per-query
# cost, small enough that a batch (as text) stays in the low hundreds of MB.
BATCH_ROWS = 1_000_000
_CSV_BLOCK = 16 << 20
_JSON_BLOCK = 32 << 20


class IngestError(ValueError):
    """A source cannot be ingested at all (unreadable file, unknown format, missing columns)."""


@dataclass
class SourceBatch:
    """Rows ``first_row .. first_row + len(table)`` (0-based) of a source file.

    ``done`` and ``total`` measure progress through the file: rows for
    Parquet, bytes for the text formats (whose row count is unknown upfront).
    """

    table: pa.Table
    first_row: int
    done: int
    total: int


def _kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.removesuffix(".gz").lstrip(".")
    raise IngestError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files to read: given files as is, folders expanded to their supported files (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.name.lower().endswith(SUFFIXES) and not p.name.startswith(".")
            )
            if not found:
                raise IngestError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            _kind(path)
            files.append(path)
        else:
            raise IngestError(f"{path}: no such file or folder")
    return files


def _gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _open_text(path: Path) -> io.TextIOBase:
    if _gzipped(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


def source_columns(path: Path) -> list[str] | None:
    """Column names of a CSV or Parquet file without reading its rows (None for JSON Lines)."""
    kind = _kind(path)
    with _reading(path, kind):
        if kind == "csv":
            return _csv_header(path)
        if kind in ("parquet", "pq"):
            return list(pq.read_schema(path).names)
    return None


@contextlib.contextmanager
def _reading(path: Path, kind: str) -> Iterator[None]:
    """Turn any failure to read ``path`` into one IngestError naming the file and reason."""
    try:
        yield
    except IngestError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IngestError(f"{path}: cannot be read as {kind}: {reason}") from None


def _csv_header(path: Path) -> list[str]:
    with _open_text(path) as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise IngestError(f"{path}: empty file, expected a header row")
    if len(set(header)) != len(header):
        raise IngestError(f"{path}: the header repeats a column name: {header}")
    return header


def _iter_csv(path: Path, columns: list[str] | None) -> Iterator[tuple[pa.Table, int, int]]:
    header = _csv_header(path)
    total = path.stat().st_size
    raw = pa.OSFile(str(path))
    stream: Any = pa.CompressedInputStream(raw, "gzip") if _gzipped(path) else raw
    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            include_columns=columns,
        ),
    )
    try:
        empty = True
        for batch in reader:
            empty = False
            yield pa.Table.from_batches([batch]), raw.tell(), total
        if empty:
            yield reader.schema.empty_table(), total, total
    finally:
        reader.close()
        raw.close()


def _iter_parquet(
    path: Path, columns: list[str] | None, batch_rows: int
) -> Iterator[tuple[pa.Table, int, int]]:
    file = pq.ParquetFile(path)
    total = file.metadata.num_rows
    done = 0
    for batch in file.iter_batches(batch_size=batch_rows, columns=columns):
        done += batch.num_rows
        yield pa.Table.from_batches([batch]), done, total
    if not total:
        yield file.schema_arrow.empty_table().select(columns or file.schema_arrow.names), 0, 0


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, sort_keys=True)


def _parse_jsonl_slowly(block: bytes, path: Path, first_line: int) -> pa.Table:
    """Line-by-line parser for blocks whose columns mix JSON types: every value as text."""
    columns: dict[str, list[str | None]] = {}
    rows = 0
    for line_no, line in enumerate(block.split(b"\n"), start=first_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise IngestError(f"{path}: line {line_no} is not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise IngestError(f"{path}: line {line_no} is not a JSON object")
        for key, value in record.items():
            columns.setdefault(key, [None] * rows).append(_text(value))
        rows += 1
        for values in columns.values():
            if len(values) < rows:
                values.append(None)
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})


def _parse_jsonl(
    block: bytes, path: Path, first_line: int, text_columns: Iterable[str]
) -> pa.Table:
    # Forcing text on the fields that must stay text stops Arrow from turning
    # ISO strings into naive timestamps (which would lose their offsets). Only
    # keys the block holds are forced, else Arrow would invent empty columns.
    present = [
        name
        for name in text_columns
        if re.search(b'"' + re.escape(name.encode()) + rb'"\s*:', block)
    ]
    schema = pa.schema([(name, pa.string()) for name in present])
    try:
        return pajson.read_json(
            pa.BufferReader(block),
            read_options=pajson.ReadOptions(block_size=max(len(block), 1 << 20)),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="infer"
            ),
        )
    except pa.ArrowInvalid:
        return _parse_jsonl_slowly(block, path, first_line)


def _iter_jsonl(
    path: Path, text_columns: Iterable[str], columns: list[str] | None
) -> Iterator[tuple[pa.Table, int, int]]:
    text_columns = list(text_columns)
    total = path.stat().st_size
    seen: list[str] = []
    line = 1
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        handle: IO[bytes] | gzip.GzipFile = raw
        if _gzipped(path):
            handle = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        rest = b""
        while True:
            chunk = handle.read(_JSON_BLOCK)
            data = rest + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            block, rest = data[:cut], data[cut:]
            if block.strip():
                table = _parse_jsonl(block, path, line, text_columns)
                # A key seen in an earlier block but absent here is a null column,
                # as it would be had the whole file been read at once.
                seen += [n for n in table.column_names if n not in seen]
                for name in seen:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
                if columns is not None:
                    table = table.select([c for c in columns if c in table.column_names])
                yield table, raw.tell(), total
            line += block.count(b"\n")
            if not chunk:
                break
    if not seen:
        yield pa.table({}), total, total


def iter_source(
    path: Path,
    text_columns: Iterable[str] = (),
    *,
    columns: list[str] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[SourceBatch]:
    """Stream one source file, by its extension, as batches of about ``batch_rows`` rows.

    Parameters
    ----------
    path : Path
        A ``.csv``, ``.parquet``/``.pq`` or ``.jsonl``/``.ndjson`` file
        (CSV and JSON Lines may be gzipped).
    text_columns : iterable of str
        JSON fields to read as text whatever they look like.
    columns : list of str, optional
        Read only these columns (all must exist in CSV and Parquet files).
    batch_rows : int
        Most rows in a batch; smaller source blocks are merged up to it.

    Raises
    ------
    IngestError
        With one message naming the file and the reason.

    Examples
    --------
    >>> sum(b.table.num_rows for b in iter_source(Path("events.csv")))  # doctest: +SKIP
    1000
    """
    kind = _kind(path)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    with _reading(path, kind):
        if kind == "csv":
            parts = _iter_csv(path, columns)
        elif kind in ("parquet", "pq"):
            parts = _iter_parquet(path, columns, batch_rows)
        else:
            parts = _iter_jsonl(path, text_columns, columns)
        pending: list[pa.Table] = []
        rows = first = 0
        done = total = 0
        for whole, done, total in parts:
            # Slices (zero-copy) keep every batch within ``batch_rows``.
            for start in range(0, max(whole.num_rows, 1), batch_rows):
                table = whole.slice(start, batch_rows)
                # JSON blocks may type a column differently: those are not merged.
                if pending and (
                    rows + table.num_rows > batch_rows or table.schema != pending[0].schema
                ):
                    yield SourceBatch(_concat(pending), first, done, total)
                    first += rows
                    pending, rows = [], 0
                pending.append(table)
                rows += table.num_rows
        if pending:
            yield SourceBatch(_concat(pending), first, total, total)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def read_source(path: Path, text_columns: Iterable[str] = ()) -> pa.Table:
    """Read one whole source file by its extension (small files: consent lists).

    Examples
    --------
    >>> read_source(Path("consent.csv")).num_rows  # doctest: +SKIP
    """
    tables = [batch.table for batch in iter_source(path, text_columns)]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Blocks typed a column differently: every value as text instead.
        return pa.concat_tables(
            [t.cast(pa.schema([(n, pa.string()) for n in t.column_names])) for t in tables],
            promote_options="default",
        )
