"""Read source files (CSV, Parquet, JSON Lines, Excel) as bounded Arrow batches, untouched.

Values are not interpreted here: CSV columns are read as text and JSON values
keep their JSON type (or become text when a column mixes types within a
chunk), so that validation sees exactly what the source held and can name the
bad value.

Files are streamed: Parquet by record batches, CSV through Arrow's streaming
reader, JSON Lines in blocks of whole lines, the first sheet of an Excel
workbook (``.xlsx``, through openpyxl, the only module importing it) row by row
with every cell as text (dates and times in ISO 8601), so memory stays bounded
by the batch size whatever the file size.

A row the reader cannot turn into values (a CSV row with the wrong number of
fields, a JSON Lines line that is not a JSON object or not UTF-8) is not an
error for the whole file: it is handed on as a :class:`RowProblem` with its
row number, and the other rows are read. A text value holding bytes that are
not UTF-8 is decoded with replacement characters and flagged (column
:data:`FLAGS`), so validation quarantines its row. Row numbers are 1-based
data rows: the CSV header and blank lines are not rows. When some rows were
not parsed, column :data:`SOURCE_ROW` gives each row's 0-based data row.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

__all__ = [
    "BATCH_ROWS",
    "FLAGS",
    "IngestError",
    "RESERVED_COLUMNS",
    "RowProblem",
    "SOURCE_ROW",
    "SUFFIXES",
    "SourceBatch",
    "expand_paths",
    "iter_source",
    "mentions_key",
    "read_records",
    "read_source",
    "source_columns",
]

SUFFIXES = (
    ".csv", ".csv.gz", ".parquet", ".pq", ".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".xlsx",
)  # fmt: skip
# Rows handed to validation at once: large enough to amortise DuckDB's per-query
# cost, small enough that a batch (as text) stays in the low hundreds of MB.
BATCH_ROWS = 1_000_000
_CSV_BLOCK = 16 << 20
_JSON_BLOCK = 32 << 20
#: Reader-made columns: each row's 0-based data row (only when earlier rows were
#: not parsed) and ``column:rule;...`` for values the reader had to repair.
SOURCE_ROW = "__source_row__"
FLAGS = "__flags__"
RESERVED_COLUMNS = (SOURCE_ROW, FLAGS)


class IngestError(ValueError):
    """A source cannot be ingested at all (unreadable file, unknown format, missing columns)."""


@dataclass(frozen=True)
class RowProblem:
    """A source row that could not be parsed into values.

    ``row`` is its 0-based data row, ``rule`` one of ``not_utf8``,
    ``ragged_row`` or ``bad_json``, ``text`` the row as read (bytes that are
    not UTF-8 replaced by U+FFFD) and ``detail`` what was wrong.
    """

    row: int
    rule: str
    text: str
    detail: str


@dataclass
class SourceBatch:
    """Rows of a source file, from data row ``first_row`` (0-based) on.

    The rows are consecutive unless the table has a :data:`SOURCE_ROW`
    column. ``problems`` are rows of the file that could not be parsed (not in
    ``table``). ``done`` and ``total`` measure progress through the file: rows
    for Parquet, bytes for the text formats (whose row count is unknown upfront).
    """

    table: pa.Table
    first_row: int
    done: int
    total: int
    problems: list[RowProblem] = field(default_factory=list)


@dataclass
class _Part:
    table: pa.Table
    done: int
    total: int
    problems: list[RowProblem] = field(default_factory=list)


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
    # Only the header is read this way. Replacement characters instead of an
    # error: a bad byte further down is the business of the row it sits in.
    if _gzipped(path):
        return io.TextIOWrapper(
            gzip.open(path, "rb"), encoding="utf-8-sig", errors="replace", newline=""
        )
    return open(path, encoding="utf-8-sig", errors="replace", newline="")  # noqa: SIM115


def source_columns(path: Path) -> list[str] | None:
    """Column names of a CSV, Parquet or Excel file without its rows (None for JSON Lines)."""
    kind = _kind(path)
    with _reading(path, kind):
        if kind == "csv":
            return _csv_header(path)
        if kind in ("parquet", "pq"):
            return list(pq.read_schema(path).names)
        if kind == "xlsx":
            with _first_sheet(path) as rows:
                return _sheet_header(path, rows)
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


def _check_names(path: Path, names: Iterable[str]) -> None:
    reserved = sorted(set(names) & set(RESERVED_COLUMNS))
    if reserved:
        raise IngestError(f"{path}: column name(s) {reserved} are reserved")


def _csv_header(path: Path) -> list[str]:
    with _open_text(path) as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise IngestError(f"{path}: empty file, expected a header row")
    if any("\ufffd" in name for name in header):
        raise IngestError(f"{path}: the header row is not UTF-8 text: {header}")
    if len(set(header)) != len(header):
        raise IngestError(f"{path}: the header repeats a column name: {header}")
    _check_names(path, header)
    return header


class _Utf8Stream:
    """A byte stream passed on unchanged while it is UTF-8; bad bytes become U+FFFD.

    Arrow's CSV reader hands a ragged row to its handler only as UTF-8 text, so
    bytes that are not UTF-8 are replaced before Arrow sees them. The check is
    one strict decode per block (fast for valid text); only a block holding bad
    bytes is rewritten, and ``replaced`` says that some were.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._tail = b""
        self.replaced = False
        self.closed = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._tail + self._stream.read(size if size >= 0 else 1 << 62)
        self._tail = b""
        try:
            data.decode("utf-8")
            return data
        except UnicodeDecodeError as exc:
            if exc.end == len(data) and exc.reason == "unexpected end of data" and size > 0:
                # A character cut by the block boundary: completed by the next read.
                data, self._tail = data[: exc.start], data[exc.start :]
                try:
                    data.decode("utf-8")
                    return data if data else self.read(size)
                except UnicodeDecodeError:
                    pass
        self.replaced = True
        return data.decode("utf-8", "replace").encode("utf-8")

    def close(self) -> None:
        self.closed = True


def _flag_replaced(table: pa.Table) -> pa.Table:
    """Flag ``column:not_utf8`` on rows whose text holds U+FFFD (the bytes replaced)."""
    flags: list[str | None] = [None] * table.num_rows
    found = False
    for name in table.column_names:
        column = table.column(name)
        if not pa.types.is_string(column.type):
            continue
        hits = pc.match_substring(column, "\ufffd")
        if not pc.any(hits).as_py():
            continue
        found = True
        for row in pc.indices_nonzero(pc.fill_null(hits, False)).to_pylist():
            flag = f"{name}:not_utf8"
            flags[row] = flag if flags[row] is None else f"{flags[row]};{flag}"
    if not found:
        return table
    return table.append_column(FLAGS, pa.array(flags, pa.string()))


def _data_rows(first: int, count: int, skipped: list[RowProblem]) -> pa.Array:
    """0-based data rows of parsed rows ``first .. first + count``, ``skipped`` not parsed."""
    # The k-th skipped row has (its row - k) parsed rows before it.
    before = np.array([p.row for p in skipped], np.int64) - np.arange(len(skipped))
    parsed = np.arange(first, first + count, dtype=np.int64)
    return pa.array(parsed + np.searchsorted(before, parsed, side="right"))


def _iter_csv(path: Path, columns: list[str] | None) -> Iterator[_Part]:
    header = _csv_header(path)
    total = path.stat().st_size
    skipped: list[RowProblem] = []

    def on_invalid(row: Any) -> str:
        # Arrow numbers rows from the header (row 1); blank lines are not rows.
        skipped.append(
            RowProblem(
                row.number - 2,
                "ragged_row",
                row.text,
                f"{row.actual_columns} fields where the header has {row.expected_columns}",
            )
        )
        return "skip"

    raw = pa.OSFile(str(path))
    stream = _Utf8Stream(pa.CompressedInputStream(raw, "gzip") if _gzipped(path) else raw)
    reader = pacsv.open_csv(
        stream,
        # Serial parsing: only then does Arrow tell the number of a bad row
        # (and it is no slower on two cores).
        read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=True,
            # Only an empty field is null: Arrow's default list ("NaN", "NA",
            # "null"...) would hide values that validation must see.
            null_values=[""],
            quoted_strings_can_be_null=False,
            include_columns=columns,
        ),
    )
    parsed = reported = 0
    try:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            if stream.replaced:
                table = _flag_replaced(table)
            new = skipped[reported:]
            reported = len(skipped)
            if new:
                table = table.append_column(SOURCE_ROW, _data_rows(parsed, table.num_rows, skipped))
            parsed += table.num_rows
            yield _Part(table, raw.tell(), total, new)
        if not parsed or reported < len(skipped):
            empty = reader.schema.empty_table()
            if reported < len(skipped):
                empty = empty.append_column(SOURCE_ROW, pa.array([], pa.int64()))
            yield _Part(empty, total, total, skipped[reported:])
    finally:
        reader.close()
        raw.close()


def _iter_parquet(path: Path, columns: list[str] | None, batch_rows: int) -> Iterator[_Part]:
    file = pq.ParquetFile(path)
    _check_names(path, file.schema_arrow.names)
    total = file.metadata.num_rows
    done = 0
    for batch in file.iter_batches(batch_size=batch_rows, columns=columns):
        done += batch.num_rows
        yield _Part(pa.Table.from_batches([batch]), done, total)
    if not total:
        yield _Part(
            file.schema_arrow.empty_table().select(columns or file.schema_arrow.names), 0, 0
        )


@contextlib.contextmanager
def _first_sheet(path: Path) -> Iterator[Iterator[tuple[Any, ...]]]:
    """The rows of a workbook's first sheet, as cell values."""
    from openpyxl import load_workbook

    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # not a zip, not a workbook, a sheet openpyxl cannot parse
        raise IngestError(f"{path}: cannot be read as xlsx: {exc}") from None
    try:
        yield book.worksheets[0].iter_rows(values_only=True)
    finally:
        book.close()


def _sheet_header(path: Path, rows: Iterator[tuple[Any, ...]]) -> list[str]:
    """The first non-empty row, as column names (empty cells after the last name dropped)."""
    for row in rows:
        names = ["" if v is None else str(v).strip() for v in row]
        while names and not names[-1]:
            names.pop()
        if not names:
            continue
        if "" in names:
            raise IngestError(f"{path}: the header row has an empty name: {names}")
        if len(set(names)) != len(names):
            raise IngestError(f"{path}: the header repeats a column name: {names}")
        _check_names(path, names)
        return names
    raise IngestError(f"{path}: empty sheet, expected a header row")


def _cell_text(value: Any) -> str | None:
    """A cell as the text a CSV export would hold (dates and times in ISO 8601)."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, str) and not value:
        return None  # an empty cell, as an empty CSV field
    return _text(value)


def _iter_xlsx(path: Path, columns: list[str] | None, batch_rows: int) -> Iterator[_Part]:
    with _first_sheet(path) as rows:
        header = _sheet_header(path, rows)
        wanted = header if columns is None else columns
        missing = [c for c in wanted if c not in header]
        if missing:
            raise IngestError(f"{path}: no column(s) {missing}; the header has {header}")
        index = [header.index(c) for c in wanted]
        values: list[list[str | None]] = [[] for _ in wanted]
        kept: list[int] = []
        problems: list[RowProblem] = []
        data_row = 0
        for row in rows:
            if all(v is None for v in row):
                continue  # blank rows are not rows, as blank lines of a CSV
            if any(v is not None for v in row[len(header) :]):
                shown = ",".join("" if v is None else str(v) for v in row)
                detail = f"values beyond the header's {len(header)} columns"
                problems.append(RowProblem(data_row, "ragged_row", shown, detail))
            else:
                for out, i in zip(values, index, strict=True):
                    out.append(_cell_text(row[i]) if i < len(row) else None)
                kept.append(data_row)
            data_row += 1
            if len(kept) + len(problems) >= batch_rows:
                yield _sheet_part(wanted, values, kept, problems, data_row)
                values, kept, problems = [[] for _ in wanted], [], []
        if kept or problems or not data_row:
            yield _sheet_part(wanted, values, kept, problems, data_row)


def _sheet_part(
    names: list[str],
    values: list[list[str | None]],
    kept: list[int],
    problems: list[RowProblem],
    done: int,
) -> _Part:
    table = pa.table({n: pa.array(v, pa.string()) for n, v in zip(names, values, strict=True)})
    if problems:
        table = table.append_column(SOURCE_ROW, pa.array(kept, pa.int64()))
    # Progress in rows: a sheet's length is known only once it is read.
    return _Part(table, done, done, problems)


def _encodable(value: str) -> bool:
    """Whether the text has a UTF-8 form (a lone surrogate has none)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, sort_keys=True)


def _parse_jsonl_slowly(
    block: bytes, path: Path, first_row: int
) -> tuple[pa.Table, list[RowProblem]]:
    """Line-by-line parser for blocks Arrow cannot read as a whole: every value as text.

    Lines that are not UTF-8, not JSON or not a JSON object become problems;
    a nested value (object, array) is flagged ``key:wrong_type``.
    """
    columns: dict[str, list[str | None]] = {}
    rows: list[int] = []
    flags: list[str | None] = []
    problems: list[RowProblem] = []
    number = first_row
    for line in block.split(b"\n"):
        if not line.strip():
            continue
        number += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            shown = line.decode("utf-8", "replace").rstrip("\r")
            problems.append(RowProblem(number - 1, "not_utf8", shown, "the line is not UTF-8"))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(RowProblem(number - 1, "bad_json", text.rstrip("\r"), exc.msg))
            continue
        if not isinstance(record, dict):
            problems.append(
                RowProblem(number - 1, "bad_json", text.rstrip("\r"), "not a JSON object")
            )
            continue
        nested = [f"{k}:wrong_type" for k, v in record.items() if isinstance(v, dict | list)]
        # A JSON escape of a lone surrogate ("\ud800") decodes to no UTF-8 text at all.
        broken = [k for k, v in record.items() if isinstance(v, str) and not _encodable(v)]
        flags.append(";".join(nested + [f"{k}:not_utf8" for k in broken]) or None)
        for key, value in record.items():
            if key in broken:
                value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            columns.setdefault(key, [None] * len(rows)).append(_text(value))
        rows.append(number - 1)
        for values in columns.values():
            if len(values) < len(rows):
                values.append(None)
    _check_names(path, columns)
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
    if not columns:
        # Only bare ``{}`` lines: a table without columns but with their rows.
        table = pa.table({"_": pa.nulls(len(rows))}).drop_columns(["_"])
    if any(f is not None for f in flags):
        table = table.append_column(FLAGS, pa.array(flags, pa.string()))
    # Always present here, so a block of bare ``{}`` lines keeps its row count.
    return table.append_column(SOURCE_ROW, pa.array(rows, pa.int64())), problems


_NOT_AN_OBJECT = re.compile(rb"(?:^|\n)[ \t\r]*[^ \t\r\n{]")


def _parse_jsonl(
    block: bytes, path: Path, first_row: int, text_columns: Iterable[str]
) -> tuple[pa.Table, list[RowProblem]]:
    # Forcing text on the fields that must stay text stops Arrow from turning
    # ISO strings into naive timestamps (which would lose their offsets). Only
    # keys the block holds are forced, else Arrow would invent empty columns.
    present = [
        name
        for name in text_columns
        if re.search(b'"' + re.escape(name.encode()) + rb'"\s*:', block)
    ]
    schema = pa.schema([(name, pa.string()) for name in present])
    # Arrow's JSON reader does not check UTF-8 (in values or keys): a bad byte
    # sends the block down the line-by-line path, which isolates its line.
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        return _parse_jsonl_slowly(block, path, first_row)
    # A line that is not an object (``null``, ``3``, ``[]``) can crash Arrow's
    # reader (a segfault on ``null``): such blocks take the line-by-line path.
    if _NOT_AN_OBJECT.search(block):
        return _parse_jsonl_slowly(block, path, first_row)
    try:
        table = pajson.read_json(
            pa.BufferReader(block),
            read_options=pajson.ReadOptions(block_size=max(len(block), 1 << 20)),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="infer"
            ),
        )
    except pa.ArrowInvalid:
        return _parse_jsonl_slowly(block, path, first_row)
    # A nested value is wrong for every field, and some nested columns (an empty
    # object, ``struct<>``) crash Arrow's take when the row is quarantined: such
    # blocks take the line-by-line path too, which flags them and keeps them as text.
    if any(pa.types.is_nested(f.type) for f in table.schema):
        return _parse_jsonl_slowly(block, path, first_row)
    _check_names(path, table.column_names)
    return table, []


def read_records(
    records: Iterable[Any], text_columns: Iterable[str], source: str = "records"
) -> tuple[pa.Table, list[RowProblem]]:
    """Read JSON-like records (one row each, as a JSON Lines file would be read).

    Each record is serialized to one JSON line and read by the JSON Lines
    parser, so a record holds exactly what the same line of a file would:
    values keep their JSON type, a record that is not an object is a
    ``bad_json`` problem with its 0-based position as ``row``.
    """
    lines = [json.dumps(r, separators=(",", ":"), default=str) for r in records]
    if not lines:
        return pa.table({}), []
    block = "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n"
    table, problems = _parse_jsonl(block, Path(source), 0, list(text_columns))
    if SOURCE_ROW not in table.column_names:
        # Every row's position, so a batch of bare ``{}`` records keeps its rows.
        rows = pa.array(np.arange(table.num_rows, dtype=np.int64))
        table = table.append_column(SOURCE_ROW, rows)
    return table, problems


def _iter_jsonl(
    path: Path, text_columns: Iterable[str], columns: list[str] | None
) -> Iterator[_Part]:
    text_columns = list(text_columns)
    total = path.stat().st_size
    seen: list[str] = []
    rows = 0
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
                table, problems = _parse_jsonl(block, path, rows, text_columns)
                names = [n for n in table.column_names if n not in RESERVED_COLUMNS]
                rows += table.num_rows + len(problems)
                # A key seen in an earlier block but absent here is a null column,
                # as it would be had the whole file been read at once.
                seen += [n for n in names if n not in seen]
                for name in seen:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
                if columns is not None:
                    keep = [*columns, *RESERVED_COLUMNS]
                    table = table.select([c for c in keep if c in table.column_names])
                yield _Part(table, raw.tell(), total, problems)
            if not chunk:
                break
    if not rows:
        yield _Part(pa.table({}), total, total)


def mentions_key(path: Path, names: Iterable[str]) -> bool:
    """Whether a JSON Lines file holds one of ``names`` as a key (a cheap byte scan)."""
    pattern = re.compile(b"|".join(b'"' + re.escape(n.encode()) + rb'"\s*:' for n in names))
    tail = b""
    with _reading(path, _kind(path)):
        opener = gzip.open if _gzipped(path) else open
        with opener(path, "rb") as handle:
            while block := handle.read(_JSON_BLOCK):
                if pattern.search(tail + block):
                    return True
                tail = block[-256:]
    return False


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
        A ``.csv``, ``.parquet``/``.pq``, ``.jsonl``/``.ndjson`` or ``.xlsx``
        file (CSV and JSON Lines may be gzipped).
    text_columns : iterable of str
        JSON fields to read as text whatever they look like.
    columns : list of str, optional
        Read only these columns (all must exist in CSV and Parquet files).
    batch_rows : int
        Most rows in a batch; smaller source blocks are merged up to it.

    Raises
    ------
    IngestError
        With one message naming the file and the reason, when the file cannot
        be read at all (rows that cannot be parsed are in ``problems``).

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
        elif kind == "xlsx":
            parts = _iter_xlsx(path, columns, batch_rows)
        else:
            parts = _iter_jsonl(path, text_columns, columns)
        pending: list[pa.Table] = []
        problems: list[RowProblem] = []
        rows = first = 0
        done = total = 0
        for part in parts:
            done, total = part.done, part.total
            # Slices (zero-copy) keep every batch within ``batch_rows``.
            for start in range(0, max(part.table.num_rows, 1), batch_rows):
                # (An empty table is not sliced: Arrow gives a column-less slice
                # the length asked for.)
                table = part.table.slice(start, batch_rows) if part.table.num_rows else part.table
                # JSON blocks may type a column differently: those are not merged.
                if pending and (
                    rows + table.num_rows > batch_rows or table.schema != pending[0].schema
                ):
                    yield SourceBatch(_concat(pending), first, done, total, problems)
                    first += rows + len(problems)
                    pending, rows, problems = [], 0, []
                pending.append(table)
                rows += table.num_rows
                if start == 0:
                    problems = problems + part.problems
        if pending:
            yield SourceBatch(_concat(pending), first, total, total, problems)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def read_source(path: Path, text_columns: Iterable[str] = ()) -> pa.Table:
    """Read one whole source file by its extension (small files: consent lists).

    Raises
    ------
    IngestError
        When the file cannot be read, or one of its rows cannot be parsed: a
        list such as a consent file is used whole or not at all.

    Examples
    --------
    >>> read_source(Path("consent.csv")).num_rows  # doctest: +SKIP
    """
    tables = []
    for batch in iter_source(path, text_columns):
        if batch.problems:
            bad = batch.problems[0]
            raise IngestError(
                f"{path}: row {bad.row + 1} cannot be read ({bad.rule}: {bad.detail})"
            )
        table = batch.table
        if FLAGS in table.column_names and table.column(FLAGS).null_count < table.num_rows:
            at = pc.index(pc.is_valid(table.column(FLAGS)), True).as_py()
            row = batch.first_row + at
            if SOURCE_ROW in table.column_names:
                row = table.column(SOURCE_ROW)[at].as_py()
            flag = table.column(FLAGS)[at].as_py()
            raise IngestError(f"{path}: row {row + 1} cannot be read ({flag})")
        tables.append(table.drop_columns([c for c in RESERVED_COLUMNS if c in table.column_names]))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Blocks typed a column differently: every value as text instead.
        return pa.concat_tables(
            [t.cast(pa.schema([(n, pa.string()) for n in t.column_names])) for t in tables],
            promote_options="default",
        )
