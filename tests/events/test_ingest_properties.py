"""Property: every source row ends up exactly once, in the lake or in the quarantine.

Small CSV, JSON Lines and Parquet sources mix valid and invalid values (every
timestamp shape the rules name, NaN, whitespace ids, unknown types, wrong
Parquet types), and CSV/JSON Lines sources get byte-level corruptions
(invalid UTF-8, extra delimiters, lines cut short). Each row carries a marker
(``product_id`` ``R<row>``, its first field), and corruptions never touch it,
so a stored row can be traced back to its source row.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propensity.events.ingest import ingest
from propensity.events.lake import EventLake
from propensity.events.validation import RULES

NOW = datetime(2024, 6, 1, tzinfo=UTC)
STAMPS = [
    "2024-01-05",
    "20240105",
    "05/01/2024 10:00",
    "1704448800",
    "1704448800000",
    "2024-01-05T10:00:00Z",
    "2024-01-05 10:00:00.25+05:30",
    "2024-01-05T10:00-0800",
    " 2024-01-05 ",
    "2099-01-01",
    "1900-01-01",
    "0000-01-01",
    "0001-01-01",
    "-infinity",
    "infinity",
    "epoch",
    "2026-3-2",
    "2024-01-05 10:00 PST",
    "2024-01-05T10:00:00+25:00",
    "someday",
    "",
    "  ",
]
CUSTOMERS = ["C1", "C2", "", "   ", " C3", "C4 ", "C\t5"]
TYPES = ["page_view", "purchase", "search", "teleport", "", " "]
PRICES = ["1.5", "0", "-1", "NaN", "inf", "-inf", "abc", "", " 2 ", "1e3"]
BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]
COLUMNS = ["product_id", "customer_id", "event_type", "event_timestamp", "price", "event_id"]

rows = st.lists(
    st.fixed_dictionaries(
        {
            "customer_id": st.sampled_from(CUSTOMERS),
            "event_type": st.sampled_from(TYPES),
            "event_timestamp": st.sampled_from(STAMPS),
            "price": st.sampled_from(PRICES),
            "given_id": st.booleans(),
        }
    ),
    min_size=1,
    max_size=8,
)
corruption = st.tuples(
    st.sampled_from(["byte", "delimiter", "truncate"]),
    st.integers(min_value=0, max_value=10_000),  # which line
    st.floats(min_value=0, max_value=1),  # where in the line, after the marker
    st.sampled_from(BAD_BYTES),
)


def _values(i: int, row: dict[str, Any]) -> dict[str, str]:
    return {
        "product_id": f"R{i}",
        "customer_id": row["customer_id"],
        "event_type": row["event_type"],
        "event_timestamp": row["event_timestamp"],
        "price": row["price"],
        "event_id": f"E{i}" if row["given_id"] else "",
    }


def _corrupt(lines: list[bytes], changes: list[tuple[str, int, float, bytes]]) -> list[bytes]:
    lines = list(lines)
    for kind, which, where, byte in changes:
        index = which % len(lines)
        line = lines[index]
        # Past the marker (and the separator after it): the marker stays intact.
        start = line.index(b"R") + len(re.match(rb"R\d+", line[line.index(b"R") :])[0]) + 1
        cut = start + int(where * (len(line) - start))
        if kind == "byte":
            line = line[:cut] + byte + line[cut:]
        elif kind == "delimiter":
            line = line[:cut] + b"," + line[cut:]
        else:
            line = line[: max(cut, start)]
        lines[index] = line
    return lines


def _csv(path: Path, data: list[dict[str, Any]], changes: list[Any]) -> None:
    lines = [",".join(_values(i, r).values()).encode() for i, r in enumerate(data, start=1)]
    body = b"\n".join(_corrupt(lines, changes))
    path.write_bytes(",".join(COLUMNS).encode() + b"\n" + body + b"\n")


def _jsonl(path: Path, data: list[dict[str, Any]], changes: list[Any]) -> None:
    lines = []
    for i, row in enumerate(data, start=1):
        values: dict[str, Any] = _values(i, row)
        if not values["event_id"]:
            del values["event_id"]
        price = values.pop("price")
        # Finite numbers as JSON numbers, anything else as text.
        try:
            number: float | None = float(price)
        except ValueError:
            number = None
        values["price"] = number if number is not None and math.isfinite(number) else price
        lines.append(json.dumps(values).encode())
    path.write_bytes(b"\n".join(_corrupt(lines, changes)) + b"\n")


def _parquet(path: Path, data: list[dict[str, Any]], typed: dict[str, str]) -> None:
    values = [_values(i, r) for i, r in enumerate(data, start=1)]
    columns: dict[str, pa.Array] = {c: pa.array([v[c] for v in values]) for c in COLUMNS}
    if typed["price"] == "float":
        numbers = []
        for v in values:
            try:
                numbers.append(float(v["price"]))
            except ValueError:
                numbers.append(None)
        columns["price"] = pa.array(numbers, pa.float64())
    if typed["event_timestamp"] == "timestamp":
        stamps = [datetime(2024, 1, 5), datetime(1, 1, 1), datetime(2099, 1, 1), None]
        columns["event_timestamp"] = pa.array(
            [stamps[i % len(stamps)] for i in range(len(values))], pa.timestamp("us")
        )
    elif typed["event_timestamp"] == "int":
        columns["event_timestamp"] = pa.array(range(len(values)), pa.int64())
    if typed["customer_id"] == "float":
        columns["customer_id"] = pa.array([1.5] * len(values))
    pq.write_table(pa.table(columns), path)


#: Timestamp formats a run may be given: the ISO default, strptime codes, epoch units.
FORMATS = [None, "%Y%m%d", "%d/%m/%Y %H:%M", "epoch_s", "epoch_ms"]


def _check(source: Path, rows_in: int, fmt: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lake = EventLake(Path(tmp) / "lake")
        report = ingest(
            [source], lake, Path(tmp) / "q", now=NOW, batch_rows=3, timestamp_format=fmt
        )
        quarantine = pq.read_table(report.quarantine_path).to_pylist() if report.quarantined else []
        stored = lake.read(["product_id"])["product_id"].tolist()

    assert report.read == rows_in
    assert report.read == report.accepted + report.duplicates + report.quarantined
    assert (report.duplicates, report.consent_removed) == (0, 0)
    for record in quarantine:
        assert record["field"] and record["rule"] in RULES and record["reason"], record
        assert 1 <= record["row_number"] <= rows_in, record
    where = [int(p[1:]) for p in stored] + [r["row_number"] for r in quarantine]
    assert sorted(where) == list(range(1, rows_in + 1)), (stored, quarantine)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=rows,
    kind=st.sampled_from(["csv", "jsonl"]),
    changes=st.lists(corruption, max_size=3),
    fmt=st.sampled_from(FORMATS),
)
def test_every_text_row_lands_once_whatever_its_bytes(
    data: list[dict[str, Any]], kind: str, changes: list[Any], fmt: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"events.{kind}"
        (_csv if kind == "csv" else _jsonl)(source, data, changes)
        _check(source, len(data), fmt)


@settings(max_examples=30, deadline=None)
@given(
    data=rows,
    typed=st.fixed_dictionaries(
        {
            "price": st.sampled_from(["text", "float"]),
            "event_timestamp": st.sampled_from(["text", "timestamp", "int"]),
            "customer_id": st.sampled_from(["text", "float"]),
        }
    ),
    fmt=st.sampled_from(FORMATS),
)
def test_every_parquet_row_lands_once_whatever_its_types(
    data: list[dict[str, Any]], typed: dict[str, str], fmt: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "events.parquet"
        _parquet(source, data, typed)
        _check(source, len(data), fmt)
