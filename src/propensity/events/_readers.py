"""Read source files (CSV, Parquet, JSON Lines) into Arrow tables, untouched.

Values are not interpreted here: CSV columns are read as text and JSON values
keep their JSON type (or become text when a column mixes types), so that
validation sees exactly what the source held and can name the bad value.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

__all__ = ["IngestError", "SUFFIXES", "expand_paths", "read_source"]

SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq", ".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")


class IngestError(ValueError):
    """A source cannot be ingested at all (unreadable file, unknown format, missing columns)."""


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


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


def _read_csv(path: Path) -> pa.Table:
    with _open_text(path) as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise IngestError(f"{path}: empty file, expected a header row")
    if len(set(header)) != len(header):
        raise IngestError(f"{path}: the header repeats a column name: {header}")
    return pacsv.read_csv(
        pa.input_stream(str(path), compression="detect"),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, sort_keys=True)


def _read_jsonl_slowly(path: Path) -> pa.Table:
    """Line-by-line reader for files whose columns mix JSON types: every value as text."""
    columns: dict[str, list[str | None]] = {}
    rows = 0
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise IngestError(f"{path}: line {line_no} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise IngestError(f"{path}: line {line_no} is not a JSON object")
            for key, value in record.items():
                columns.setdefault(key, [None] * rows).append(_text(value))
            rows += 1
            for values in columns.values():
                if len(values) < rows:
                    values.append(None)
    return pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})


def _jsonl_keys(path: Path, lines: int = 1000) -> set[str]:
    keys: set[str] = set()
    with _open_text(path) as handle:
        for _, line in zip(range(lines), handle, strict=False):
            with_keys = line.strip()
            if with_keys.startswith("{"):
                try:
                    keys.update(json.loads(with_keys))
                except json.JSONDecodeError:
                    break
    return keys


def _read_jsonl(path: Path, text_columns: Iterable[str]) -> pa.Table:
    # Forcing text on the fields that must stay text stops Arrow from turning
    # ISO strings into naive timestamps (which would lose their offsets). Only
    # fields the file has are forced, else Arrow would invent empty columns.
    present = _jsonl_keys(path)
    schema = pa.schema([(name, pa.string()) for name in text_columns if name in present])
    try:
        return pajson.read_json(
            pa.input_stream(str(path), compression="detect"),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="infer"
            ),
        )
    except pa.ArrowInvalid:
        return _read_jsonl_slowly(path)


def read_source(path: Path, text_columns: Iterable[str] = ()) -> pa.Table:
    """Read one source file by its extension.

    Parameters
    ----------
    path : Path
        A ``.csv``, ``.parquet``/``.pq`` or ``.jsonl``/``.ndjson`` file
        (CSV and JSON Lines may be gzipped).
    text_columns : iterable of str
        JSON fields to read as text whatever they look like.

    Raises
    ------
    IngestError
        With one message naming the file and the reason.

    Examples
    --------
    >>> read_source(Path("events.csv")).num_rows  # doctest: +SKIP
    """
    kind = _kind(path)
    try:
        if kind == "csv":
            return _read_csv(path)
        if kind in ("parquet", "pq"):
            return pq.read_table(path)
        return _read_jsonl(path, text_columns)
    except IngestError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IngestError(f"{path}: cannot be read as {kind}: {reason}") from None
