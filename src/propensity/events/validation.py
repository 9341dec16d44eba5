"""Validate source rows against the canonical event schema, vectorized in DuckDB.

Every row either becomes a canonical event or a quarantine record naming the
source file, the 1-based data row, the field, the rule and the offending value,
with the raw row as JSON. A row breaking several rules is quarantined once:
``field``/``rule``/``value`` describe the first broken rule in the order of
:data:`RULES`, and ``rules`` lists all of them (``field:rule;field:rule``).
Rows the reader could not parse (see :class:`RowProblem`) are quarantined with
the field ``(row)`` and the row's text as ``value``.

Text values are kept as given, with two exceptions that need no trimming of
every value (trimming tripled the cost of this step on large files): an empty
or whitespace-only value counts as absent, and a ``customer_id`` that starts
or ends with whitespace (or a control character) is rejected (rule
``whitespace``) rather than stored under a second spelling of the customer.
Integers in a text field (Parquet, JSON) are read as their decimal text; any
other non-text type there is ``wrong_type``.

Time: without a ``timestamp_format``, text timestamps must have the shape
``YYYY-MM-DD`` optionally followed by ``[T ]HH:MM[:SS[.fraction]]`` and ``Z``
or an offset ``±HH[:MM]`` (at most 14 hours); a format given (strptime codes,
``epoch_s``, ``epoch_ms``) replaces that rule (see
:mod:`propensity.events.timestamps`), and the quarantine record's ``reason``
names the format expected. Text and naive timestamps are read in
``timezone``; values carrying an offset or an aware Arrow type are converted
to UTC. Times before 1970-01-01 UTC are implausible for behavioral events.

Orders-only sources (customer, date or datetime, amount or unit price,
optional quantity) become ``purchase`` events: ``quantity`` defaults to 1 and
``price`` is the unit price, ``amount / quantity`` when the source gives the
line's amount, so ``price * quantity`` is the order amount.
Their ``order_id`` is derived from the row's content.

Rows without an ``event_id`` get one derived from their canonical content
(an MD5 hex digest), so identical rows share an id and re-ingesting a file is
a no-op. With ``keep_identical_rows`` the source row number enters the
derived ids (``order_id`` too), so identical rows of a file stay apart.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from propensity.events import timestamps
from propensity.events._readers import FLAGS, SOURCE_ROW, IngestError, RowProblem
from propensity.events._readers import _text as _value_text
from propensity.events.schema import ARROW_SCHEMA, EVENT_TYPES, NUMERIC_COLUMNS

__all__ = [
    "RULES",
    "QUARANTINE_SCHEMA",
    "FUTURE_TOLERANCE",
    "EARLIEST_TIMESTAMP",
    "MAPPING_TARGETS",
    "ORDER_TIME_COLUMNS",
    "ROW_FIELD",
    "ValidationResult",
    "check_mapping",
    "validate_events",
    "withdrawn_customers",
]

RULES: dict[str, str] = {
    "not_utf8": "a text value, or a JSON Lines line, holds bytes that are not UTF-8",
    "ragged_row": "a row has more or fewer fields than the header",
    "bad_json": "a JSON Lines line is not valid JSON or not a JSON object",
    "missing": "a required field is absent, empty or only whitespace",
    "whitespace": "customer_id starts or ends with whitespace (or a control character)",
    "wrong_type": (
        "a text or timestamp field holds a value of another type "
        "(a float, boolean, list or object; integers are read as text ids)"
    ),
    "unparseable_timestamp": (
        "the timestamp does not have the expected format: the one given "
        "(strptime codes, epoch_s or epoch_ms), else ISO 8601: YYYY-MM-DD, optionally "
        "followed by [T ]HH:MM[:SS[.fraction]] and Z or an offset ±HH[:MM] of at most 14 hours"
    ),
    "implausible_timestamp": "the timestamp is before 1970-01-01 UTC or beyond the range of dates",
    "future_timestamp": "the timestamp is later than now (plus a small tolerance)",
    "unknown_event_type": "event_type is not one of the documented event types",
    "not_numeric": "a numeric field holds text or a value of another type, or is not finite",
    "negative": "price, quantity or amount is below zero",
    "not_positive": "an order quantity is zero or below",
    "out_of_range": "propensity is outside (0, 1]",
    "not_boolean": "consent is not true/false/yes/no/1/0",
    "conflicting_duplicate": (
        "the event_id is already stored, or came earlier in the run, with other "
        "content; the first version is kept"
    ),
}

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("row_number", pa.int64()),
        ("field", pa.string()),
        ("rule", pa.string()),
        ("value", pa.string()),
        ("rules", pa.string()),
        ("raw", pa.string()),
        # Content hash of the source file: with row_number and rule it keys a
        # record, so re-ingesting a file does not quarantine its rows twice.
        ("source_sha256", pa.string()),
        # The first rule in words; for a timestamp, the format that was expected.
        ("reason", pa.string()),
    ]
)

FUTURE_TOLERANCE = timedelta(minutes=5)
EARLIEST_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
ORDER_TIME_COLUMNS: tuple[str, ...] = ("timestamp", "date", "order_date", "event_timestamp")
#: Names a column mapping may rename a source column to.
MAPPING_TARGETS: tuple[str, ...] = (
    *(f.name for f in ARROW_SCHEMA),
    "consent",
    "amount",
    *(c for c in ORDER_TIME_COLUMNS if c != "event_timestamp"),
)
#: ``field`` of a quarantine record for a row the reader could not parse.
ROW_FIELD = "(row)"

_STRING_COLUMNS = tuple(f.name for f in ARROW_SCHEMA if pa.types.is_string(f.type))
_TRUE = ("true", "t", "yes", "y", "1", "1.0")
_FALSE = ("false", "f", "no", "n", "0", "0.0")
_POS = "__pos__"
_SRC_ROW = "__source_row_number__"
_CHUNK_ROWS = 2_000_000
_OUT_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in ARROW_SCHEMA])
_WS = "' ' || chr(9) || chr(10) || chr(11) || chr(12) || chr(13)"
_LOCAL = threading.local()
_EARLIEST = f"TIMESTAMPTZ '{EARLIEST_TIMESTAMP.isoformat()}'"


@dataclass
class ValidationResult:
    """Outcome of validating one source table.

    Attributes
    ----------
    valid : pa.Table
        Canonical events (``ARROW_SCHEMA``) plus ``__row__``, the source row number.
    rejected : pa.Table
        Quarantine records (``QUARANTINE_SCHEMA``).
    consent_removed : int
        Rows dropped because their customer withdrew consent.
    read : int
        Rows in the source (those of the table and those the reader could not parse).
    """

    valid: pa.Table
    rejected: pa.Table
    consent_removed: int
    read: int


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _kind(kind: pa.DataType) -> str:
    """The class of an Arrow type that decides how a value is read."""
    if pa.types.is_dictionary(kind):
        return _kind(kind.value_type)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return "text"
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "float"
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_date(kind):
        return "date"
    if pa.types.is_null(kind):
        return "null"
    return "other"


def _prepared(table: pa.Table, used: Collection[str], positions: pa.Array) -> pa.Table:
    """The columns validation reads, in types DuckDB scans, and the row positions.

    Columns of other types (lists, structs, durations...) are wrong for every
    field: only whether they hold a value is kept.
    """
    arrays: list[Any] = [positions]
    names = [_POS]
    for name in table.column_names:
        if name not in used:
            continue
        column = table.column(name)
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if _kind(kind) == "other" or pa.types.is_null(kind):
            column = pc.if_else(pc.is_valid(column), True, pa.scalar(None, pa.bool_()))
        elif pa.types.is_date64(kind) or (pa.types.is_timestamp(kind) and kind.unit in ("s", "ms")):
            column = _as_microseconds(column)
        elif pa.types.is_float16(kind) or (pa.types.is_decimal(kind) and kind.precision > 38):
            column = column.cast(pa.float64())
        elif kind != column.type or pa.types.is_string_view(kind):
            column = column.cast(pa.string() if _kind(kind) == "text" else kind)
        arrays.append(column)
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


# Years ±200,000 in microseconds: within DuckDB's timestamps, far from any plausible time.
_LIMIT_US = 200_000 * 365 * 86_400 * 1_000_000


def _as_microseconds(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Second, millisecond or date64 values as microsecond timestamps, clamped.

    DuckDB fails the whole scan on a value beyond its range; clamped, such a
    value is still rejected (as implausible or in the future).
    """
    kind = column.type
    factor = 1_000_000 if pa.types.is_timestamp(kind) and kind.unit == "s" else 1_000
    ticks = column.cast(pa.int64())
    bound = _LIMIT_US // factor
    ticks = pc.min_element_wise(pc.max_element_wise(ticks, -bound), bound)
    zone = kind.tz if pa.types.is_timestamp(kind) else None
    return pc.multiply(ticks, factor).cast(pa.timestamp("us", tz=zone))


def _rename(table: pa.Table, mapping: Mapping[str, str] | None) -> tuple[pa.Table, dict[str, str]]:
    """Apply ``{source: canonical}``; return the table and ``{canonical: source}``."""
    mapping = dict(mapping or {})
    names = [mapping.get(name, name) for name in table.column_names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise IngestError(f"column mapping gives several columns the name(s) {repeated}")
    back = {mapping.get(name, name): name for name in table.column_names}
    return table.rename_columns(names), back


def check_mapping(mapping: Mapping[str, str]) -> None:
    """Reject a column mapping whose target is not a name validation reads.

    Raises
    ------
    IngestError
        Naming the unknown targets and listing the valid ones.

    Examples
    --------
    >>> check_mapping({"user": "customer_id"})
    >>> check_mapping({"user": "customer"})
    Traceback (most recent call last):
    ...
    propensity.events._readers.IngestError: column mapping target(s) ['customer'] ...
    """
    unknown = sorted({target for target in mapping.values() if target not in MAPPING_TARGETS})
    if unknown:
        raise IngestError(
            f"column mapping target(s) {unknown} are not fields; "
            f"valid targets: {', '.join(MAPPING_TARGETS)}"
        )


def _blank_is_null(col: str) -> str:
    # Only values starting with a space or control character (< '!') are
    # trimmed: a cheap comparison on DuckDB's inlined string prefix.
    q = _q(col)
    return f"CASE WHEN {q} < '!' AND trim({q}, {_WS}) = '' THEN NULL ELSE {q} END"


def _text(col: str, kind: str | None) -> str:
    if kind == "text":
        return _blank_is_null(col)
    if kind == "int":
        return f"CAST({_q(col)} AS VARCHAR)"
    return "CAST(NULL AS VARCHAR)"


def _present(col: str, kind: str | None) -> str:
    if kind is None or kind == "null":
        return "false"
    if kind == "text":
        return f"{_blank_is_null(col)} IS NOT NULL"
    return f"{_q(col)} IS NOT NULL"


def _number(col: str, kind: str | None) -> str:
    if kind in ("int", "float"):
        return f"CAST({_q(col)} AS DOUBLE)"
    if kind == "text":
        # DuckDB's cast allows surrounding spaces; it reads "NaN" and "inf"
        # too, which the not_numeric rule then rejects as not finite.
        return f"TRY_CAST({_blank_is_null(col)} AS DOUBLE)"
    # Booleans, timestamps, nested values: the wrong type for a number.
    return "CAST(NULL AS DOUBLE)"


def _consent(col: str, kind: str | None) -> str:
    if kind not in ("text", "bool", "int", "float"):
        return "CAST(NULL AS BOOLEAN)"
    value = f"lower(trim(CAST({_q(col)} AS VARCHAR), {_WS}))"
    trues = ", ".join(_lit(v) for v in _TRUE)
    falses = ", ".join(_lit(v) for v in _FALSE)
    return f"CASE WHEN {value} IN ({trues}) THEN true WHEN {value} IN ({falses}) THEN false END"


def _time(
    col: str, kind: str | None, now_sql: str, fmt: str | None
) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Parsed items (``event_timestamp``, ``_has_time``) and rules of the time column."""
    q = _q(col)
    value = "CAST(NULL AS TIMESTAMPTZ)"
    if kind == "text":
        value = timestamps.text_sql(q, f"trim({q}, {_WS})", fmt)
    elif kind in ("int", "float"):
        value = timestamps.number_sql(q, kind, fmt) or value
    elif kind == "timestamp":
        # Aware values keep their instant; naive ones are read in the session zone.
        # TRY_: a second or millisecond value beyond DuckDB's range becomes null.
        value = f"TRY_CAST({q} AS TIMESTAMPTZ)"
    elif kind == "date":
        value = f"TRY_CAST(TRY_CAST({q} AS TIMESTAMP) AS TIMESTAMPTZ)"
    parsed = [f"{value} AS event_timestamp", f"{_present(col, kind)} AS _has_time"]
    rules = [(col, "missing", "NOT _has_time")]
    read_as_text = kind == "text" or (
        kind in ("int", "float") and timestamps.number_sql(q, kind, fmt) is not None
    )
    if read_as_text:
        rules.append((col, "unparseable_timestamp", "_has_time AND event_timestamp IS NULL"))
        rules.append((col, "implausible_timestamp", f"event_timestamp < {_EARLIEST}"))
    elif kind in ("timestamp", "date"):
        rules.append(
            (
                col,
                "implausible_timestamp",
                f"_has_time AND (event_timestamp IS NULL OR event_timestamp < {_EARLIEST})",
            )
        )
    elif kind != "null":
        rules.append((col, "wrong_type", "_has_time"))
    rules.append((col, "future_timestamp", f"event_timestamp > {now_sql}"))
    return parsed, rules


def _time_reasons(col: str, kind: str | None, fmt: str | None) -> dict[tuple[str, str], str]:
    """Reasons naming the expected format, for the time column's quarantine records."""
    reasons = {(col, "unparseable_timestamp"): timestamps.expected(fmt)}
    if kind in ("int", "float"):
        if fmt is None:
            hint = "a number needs --timestamp-format epoch_s or epoch_ms"
        else:
            hint = f"{fmt} reads text or integer digits, not a float"
        reasons[(col, "wrong_type")] = f"{timestamps.expected(fmt)}; {hint}"
    return reasons


@dataclass
class _Plan:
    parsed: list[str]  # "expr AS name" items of the parsing step
    rules: list[tuple[str, str, str]]  # (field, rule, condition) in reporting order
    used: set[str]  # source columns (after renaming) the plan reads
    order_key: str | None  # SQL for a derived order_id, orders-only mode
    reasons: dict[tuple[str, str], str]  # (field, rule) -> reason, beyond RULES
    row_in_id: bool = False  # derived ids include the source row number


def _wrong_text(kind: str | None) -> bool:
    return kind not in (None, "text", "int", "null")


def _absent(col: str, kinds: Mapping[str, str]) -> str:
    return f"NOT {_q('_has_' + col)}" if _wrong_text(kinds.get(col)) else f"{_q(col)} IS NULL"


def _text_fields(
    names: Sequence[str], kinds: Mapping[str, str]
) -> tuple[list[str], dict[str, tuple[str, str, str]]]:
    """Parsed items of text fields and their wrong-type rules, by field."""
    parsed, wrong = [], {}
    for c in names:
        kind = kinds.get(c)
        parsed.append(f"{_text(c, kind)} AS {_q(c)}")
        if _wrong_text(kind):
            parsed.append(f"{_q(c)} IS NOT NULL AS {_q('_has_' + c)}")
            wrong[c] = (c, "wrong_type", _q("_has_" + c))
    if kinds.get("customer_id") == "text":
        edge = _q("customer_id")
        parsed.append(f"coalesce({edge} < '!' OR right({edge}, 1) < '!', false) AS _edge_ws")
    else:
        parsed.append("false AS _edge_ws")
    return parsed, wrong


def _customer_rules(
    kinds: Mapping[str, str], wrong: dict[str, tuple[str, str, str]]
) -> list[tuple[str, str, str]]:
    rules = [wrong.pop("customer_id")] if "customer_id" in wrong else []
    rules.append(("customer_id", "missing", _absent("customer_id", kinds)))
    rules.append(("customer_id", "whitespace", "customer_id IS NOT NULL AND _edge_ws"))
    return rules


def _numbers(
    names: Sequence[str], kinds: Mapping[str, str]
) -> tuple[list[str], list[tuple[str, str, str]]]:
    parsed, rules = [], []
    for c in names:
        if c not in kinds:
            parsed.append(f"CAST(NULL AS DOUBLE) AS {_q(c)}")
            continue
        has, value = _q("_has_" + c), _q(c)
        parsed.append(f"{_number(c, kinds[c])} AS {value}")
        parsed.append(f"{_present(c, kinds[c])} AS {has}")
        rules.append((c, "not_numeric", f"{has} AND ({value} IS NULL OR NOT isfinite({value}))"))
        if c == "propensity":
            rules.append(
                (c, "out_of_range", f"isfinite({value}) AND ({value} <= 0 OR {value} > 1)")
            )
        else:
            rules.append((c, "negative", f"{value} < 0"))
    return parsed, rules


def _events_plan(kinds: Mapping[str, str], now_sql: str, fmt: str | None) -> _Plan:
    missing = [c for c in ("customer_id", "event_type", "event_timestamp") if c not in kinds]
    if missing:
        raise IngestError(
            f"required column(s) {missing} not found; columns are {list(kinds)} "
            "(map source names with a column mapping)"
        )
    parsed, wrong = _text_fields(_STRING_COLUMNS, kinds)
    time_items, time_rules = _time("event_timestamp", kinds["event_timestamp"], now_sql, fmt)
    number_items, number_rules = _numbers(NUMERIC_COLUMNS, kinds)
    types = ", ".join(_lit(t) for t in EVENT_TYPES)
    rules = _customer_rules(kinds, wrong)
    if "event_type" in wrong:
        rules.append(wrong.pop("event_type"))
    rules.append(("event_type", "missing", _absent("event_type", kinds)))
    rules += time_rules
    rules.append(("event_type", "unknown_event_type", f"event_type NOT IN ({types})"))
    rules += [*wrong.values(), *number_rules]
    used = {*_STRING_COLUMNS, "event_timestamp", *NUMERIC_COLUMNS} & set(kinds)
    reasons = _time_reasons("event_timestamp", kinds["event_timestamp"], fmt)
    return _Plan([*parsed, *time_items, *number_items], rules, used, None, reasons)


def _orders_plan(kinds: Mapping[str, str], now_sql: str, fmt: str | None) -> _Plan:
    time_col = next((c for c in ORDER_TIME_COLUMNS if c in kinds), None)
    # The order line's amount, or its unit price (times the quantity, as in most retail logs).
    value = "amount" if "amount" in kinds or "price" not in kinds else "price"
    missing = [c for c in ("customer_id", value) if c not in kinds]
    if time_col is None:
        missing.append("|".join(ORDER_TIME_COLUMNS))
    if missing:
        raise IngestError(
            f"orders-only source lacks column(s) {missing}; columns are {list(kinds)} "
            "(map source names with a column mapping)"
        )
    assert time_col is not None
    canonical_text = [c for c in _STRING_COLUMNS if c != "event_type"]
    parsed, wrong = _text_fields(canonical_text, kinds)
    time_items, time_rules = _time(time_col, kinds[time_col], now_sql, fmt)
    parsed += ["'purchase' AS event_type", *time_items]
    quantity = kinds.get("quantity")
    parsed.append(f"{_number('quantity', quantity)} AS _quantity")
    parsed.append(f"{_present('quantity', quantity)} AS _has_quantity")
    parsed.append(f"{_number(value, kinds[value])} AS _value")
    parsed.append(f"{_present(value, kinds[value])} AS _has_value")
    if value == "amount":
        parsed += ["_value AS amount", "_value / coalesce(_quantity, 1) AS _unit_price"]
    else:
        parsed += ["_value * coalesce(_quantity, 1) AS amount", "_value AS _unit_price"]
    parsed.append("CAST(NULL AS DOUBLE) AS propensity")
    rules = _customer_rules(kinds, wrong)
    rules += time_rules
    rules += [
        (value, "missing", "NOT _has_value"),
        (value, "not_numeric", "_has_value AND (_value IS NULL OR NOT isfinite(_value))"),
        (value, "negative", "_value < 0"),
        (
            "quantity",
            "not_numeric",
            "_has_quantity AND (_quantity IS NULL OR NOT isfinite(_quantity))",
        ),
        ("quantity", "not_positive", "_quantity <= 0"),
        *wrong.values(),
    ]
    key = (
        "concat_ws(chr(31), customer_id, CAST(epoch_us(event_timestamp) AS VARCHAR), "
        "CAST(amount AS VARCHAR), CAST(coalesce(_quantity, 1) AS VARCHAR))"
    )
    used = {*canonical_text, time_col, value, "quantity"} & set(kinds)
    return _Plan(parsed, rules, used, key, _time_reasons(time_col, kinds[time_col], fmt))


def _canonical_select(plan: _Plan) -> str:
    items = []
    for field in ARROW_SCHEMA:
        name = field.name
        if plan.order_key is not None and name == "quantity":
            items.append("coalesce(_quantity, 1) AS quantity")
        elif plan.order_key is not None and name == "price":
            items.append("_unit_price AS price")
        elif plan.order_key is not None and name == "order_id":
            key = plan.order_key
            if plan.row_in_id:
                key = f"concat_ws(chr(31), {key}, CAST({_SRC_ROW} AS VARCHAR))"
            items.append(f"coalesce(order_id, 'O' || left(md5({key}), 16)) AS order_id")
        elif name != "event_id":
            items.append(_q(name))
    return ", ".join(items)


def _content_hash(row_in_id: bool) -> str:
    # With the source row number in it, identical rows of a file get distinct
    # ids that a re-ingest of the same file derives again.
    parts = [f"CAST({_SRC_ROW} AS VARCHAR)"] if row_in_id else []
    for field in ARROW_SCHEMA:
        if field.name == "event_id":
            continue
        if field.name == "event_timestamp":
            value = "CAST(epoch_us(event_timestamp) AS VARCHAR)"
        else:
            value = f"CAST({_q(field.name)} AS VARCHAR)"
        parts.append(f"coalesce({value}, '')")
    return f"md5(concat_ws(chr(31), {', '.join(parts)}))"


def _build_sql(plan: _Plan, flags: bool, withdrawn: bool) -> str:
    rules = list(plan.rules)
    # A cheap boolean for every row; the text listing the broken rules is only
    # built for the (usually few) bad rows.
    any_bad = " OR ".join(f"({cond})" for _, _, cond in rules)
    problems = ", ".join(
        f"CASE WHEN {cond} THEN {_lit(field + ':' + rule)} END" for field, rule, cond in rules
    )
    if flags:
        # The reader's findings (bytes not UTF-8, nested JSON values) come first.
        any_bad = f"{FLAGS} IS NOT NULL OR {any_bad}"
        problems = f"{FLAGS}, {problems}"
    where = ""
    if withdrawn:
        # Withdrawn ids are stored trimmed: a row spelling the id with spaces
        # around it belongs to the same customer (only those rows are trimmed).
        customer = f"CASE WHEN _edge_ws THEN trim(customer_id, {_WS}) ELSE customer_id END"
        where = (
            f"WHERE customer_id IS NULL OR {customer} NOT IN (SELECT customer_id FROM withdrawn)"
        )
    carried = f"{FLAGS}, " if flags else ""
    carried += f"{_SRC_ROW}, " if plan.row_in_id else ""
    return f"""
        WITH parsed AS (
            SELECT {_POS}, {carried}{", ".join(plan.parsed)}
            FROM src
        ),
        canonical AS (
            SELECT {_POS}, {f"{_SRC_ROW}, " if plan.row_in_id else ""}{_canonical_select(plan)},
                   event_id AS _given_id,
                   CASE WHEN coalesce({any_bad}, false)
                        THEN concat_ws(';', {problems}) END AS _problems
            FROM parsed {where}
        )
        SELECT coalesce(_given_id, {_content_hash(plan.row_in_id)}) AS event_id, *
        FROM canonical
    """


def _translated_flags(
    flags: pa.ChunkedArray | None, mapping: Mapping[str, str], used: Collection[str]
) -> pa.Array | None:
    """The reader's ``column:rule`` flags in field names, kept for the fields validation reads."""
    if flags is None or flags.null_count == len(flags):
        return None
    out: list[str | None] = []
    for text in flags.to_pylist():
        kept = []
        for item in (text or "").split(";") if text else []:
            column, _, rule = item.rpartition(":")
            name = mapping.get(column, column)
            if name in used:
                kept.append(f"{name}:{rule}")
        out.append(";".join(kept) or None)
    array = pa.array(out, pa.string())
    return None if array.null_count == len(array) else array


def _kinds(table: pa.Table) -> dict[str, str]:
    return {f.name: _kind(f.type) for f in table.schema}


def validate_events(
    table: pa.Table,
    *,
    source: str = "",
    mapping: Mapping[str, str] | None = None,
    orders_only: bool = False,
    timezone: str = "UTC",
    now: datetime | None = None,
    withdrawn: Collection[str] = (),
    row_offset: int = 0,
    unparsed: Sequence[RowProblem] = (),
    columns_required: bool = True,
    timestamp_format: str | None = None,
    keep_identical_rows: bool = False,
) -> ValidationResult:
    """Split a source table into canonical events and quarantine records.

    Parameters
    ----------
    table : pa.Table
        Rows as read from the source (see ``propensity.events._readers``),
        possibly with the reader's ``__source_row__`` and ``__flags__`` columns.
    source : str
        Name of the source file, recorded in quarantine records.
    mapping : dict, optional
        ``{source_name: canonical_name}`` renames applied first.
    orders_only : bool
        Read the rows as an orders log (customer, time, amount, quantity).
    timezone : str
        IANA zone of naive timestamps.
    now : datetime, optional
        Reference time for the future-timestamp rule (default: the clock).
    withdrawn : collection of str
        Customers whose rows are dropped (counted, not quarantined).
    row_offset : int
        Source rows before ``table`` (when a file is validated batch by
        batch), so reported row numbers are those of the whole file; unused
        when the table gives each row's source row.
    unparsed : sequence of RowProblem
        Rows of the source the reader could not parse: quarantined (or, when
        they name a withdrawn customer, dropped) and counted as read.
    columns_required : bool
        Whether a required column absent from the table is an error (a file
        with a header or schema) or only makes every row miss it (JSON Lines,
        whose lines each name their own fields).
    timestamp_format : str, optional
        How text (and integer) timestamps are written: strptime codes such
        as ``%Y%m%d``, or ``epoch_s`` / ``epoch_ms`` (also for numeric
        columns). Default: ISO 8601 text only (see
        :mod:`propensity.events.timestamps`).
    keep_identical_rows : bool
        Make the source row number part of derived ids (``event_id``, and
        the derived ``order_id`` of orders-only rows), so identical rows of a
        file are all kept; default: identical rows share an id and are
        stored once.

    Returns
    -------
    ValidationResult

    Raises
    ------
    IngestError
        If required columns are absent, the mapping clashes, the time zone
        is unknown or the timestamp format is not usable.

    Examples
    --------
    >>> raw = pa.table({"customer_id": ["C1"], "event_type": ["purchase"],
    ...                 "event_timestamp": ["2024-01-05 10:00"], "price": ["-3"]})
    >>> result = validate_events(raw, source="events.csv")
    >>> result.rejected.column("rule").to_pylist()
    ['negative']
    """
    reference = (now or datetime.now(UTC)) + FUTURE_TOLERANCE
    if reference.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    timestamps.check_format(timestamp_format)
    reader_columns = {c: table.column(c) for c in (SOURCE_ROW, FLAGS) if c in table.column_names}
    table = table.drop_columns(list(reader_columns))
    unparsed_records, unparsed_removed = _unparsed_records(unparsed, source, withdrawn)
    if not table.num_columns and not table.num_rows:
        # A JSON Lines source none of whose lines could be parsed.
        return ValidationResult(
            _OUT_SCHEMA.append(pa.field("__row__", pa.int64())).empty_table(),
            unparsed_records,
            unparsed_removed,
            len(unparsed),
        )
    source_rows = reader_columns.get(SOURCE_ROW)
    original_names = table.column_names
    renamed, back = _rename(table, mapping)
    if not columns_required:
        for name in _absent_required(renamed.column_names, orders_only):
            renamed = renamed.append_column(name, pa.nulls(renamed.num_rows, pa.string()))
    for reserved in (_POS, _SRC_ROW):
        if reserved in renamed.column_names:
            raise IngestError(f"column name {reserved} is reserved")
    now_sql = f"TIMESTAMPTZ {_lit(reference.astimezone(UTC).isoformat())}"
    kinds = _kinds(renamed)
    planner = _orders_plan if orders_only else _events_plan
    plan = planner(kinds, now_sql, timestamp_format)
    plan.row_in_id = keep_identical_rows
    has_consent = "consent" in kinds
    if has_consent:
        kind = kinds["consent"]
        plan.parsed.append(f"{_consent('consent', kind)} AS _consent")
        plan.parsed.append(f"{_present('consent', kind)} AS _has_consent")
        plan.rules.append(("consent", "not_boolean", "_has_consent AND _consent IS NULL"))
        plan.used.add("consent")
    flags = _translated_flags(reader_columns.get(FLAGS), dict(mapping or {}), plan.used)
    con = _connection()
    try:
        con.execute(f"SET TimeZone = {_lit(timezone)}")
    except duckdb.Error:
        raise IngestError(f"unknown time zone {timezone!r}") from None
    try:
        return _validated(
            con, plan, flags, withdrawn, renamed, table, original_names, back, source,
            source_rows, row_offset, keep_identical_rows, unparsed_records, unparsed_removed,
            len(unparsed),
        )  # fmt: skip
    finally:
        for name in ("src", "withdrawn"):
            with contextlib.suppress(duckdb.Error):
                con.unregister(name)


def _connection() -> duckdb.DuckDBPyConnection:
    """This thread's DuckDB connection: opening one costs far more than validating 500 rows."""
    con: duckdb.DuckDBPyConnection | None = getattr(_LOCAL, "con", None)
    if con is None:
        con = _LOCAL.con = duckdb.connect()
    return con


def _validated(
    con: duckdb.DuckDBPyConnection,
    plan: _Plan,
    flags: pa.ChunkedArray | pa.Array | None,
    withdrawn: Collection[str],
    renamed: pa.Table,
    table: pa.Table,
    original_names: list[str],
    back: dict[str, str],
    source: str,
    source_rows: pa.ChunkedArray | None,
    row_offset: int,
    keep_identical_rows: bool,
    unparsed_records: pa.Table,
    unparsed_removed: int,
    n_unparsed: int,
) -> ValidationResult:
    if withdrawn:
        con.register("withdrawn", pa.table({"customer_id": pa.array(list(withdrawn), pa.string())}))
    sql = _build_sql(plan, flags is not None, bool(withdrawn))
    positions = pa.array(range(renamed.num_rows), pa.int64())
    src = _prepared(renamed, plan.used, positions)
    if flags is not None:
        src = src.append_column(FLAGS, flags)
    if keep_identical_rows:
        src = src.append_column(_SRC_ROW, _row_numbers(positions, source_rows, row_offset))
    valid_parts, bad_parts, kept = [], [], 0
    # Chunks bound DuckDB's working memory on large files.
    for start in range(0, max(src.num_rows, 1), _CHUNK_ROWS):
        con.register("src", src.slice(start, _CHUNK_ROWS))
        out = con.sql(sql).to_arrow_table()
        con.unregister("src")
        kept += out.num_rows
        bad = pc.is_valid(out.column("_problems"))
        if pc.any(bad).as_py():
            bad_parts.append(out.filter(bad).select([_POS, "_problems"]))
            out = out.filter(pc.invert(bad))
        rows = _row_numbers(out.column(_POS), source_rows, row_offset)
        valid_parts.append(
            out.select([f.name for f in ARROW_SCHEMA])
            .cast(_OUT_SCHEMA)
            .append_column("__row__", rows)
        )
    bad_rows = (
        pa.concat_tables(bad_parts)
        if bad_parts
        else pa.table({_POS: pa.array([], pa.int64()), "_problems": pa.array([], pa.string())})
    )
    rejected = _quarantine_records(
        bad_rows,
        table,
        original_names,
        back,
        source,
        _row_numbers(bad_rows.column(_POS), source_rows, row_offset),
        plan.reasons,
    )
    if unparsed_records.num_rows:
        rejected = pa.concat_tables([rejected, unparsed_records]).sort_by("row_number")
    return ValidationResult(
        valid=pa.concat_tables(valid_parts),
        rejected=rejected,
        consent_removed=table.num_rows - kept + unparsed_removed,
        read=table.num_rows + n_unparsed,
    )


def _absent_required(names: Sequence[str], orders_only: bool) -> list[str]:
    if orders_only:
        times = [] if set(ORDER_TIME_COLUMNS) & set(names) else [ORDER_TIME_COLUMNS[0]]
        value = [] if {"amount", "price"} & set(names) else ["amount"]
        return [c for c in ("customer_id",) if c not in names] + value + times
    return [c for c in ("customer_id", "event_type", "event_timestamp") if c not in names]


def _row_numbers(
    positions: pa.ChunkedArray | pa.Array, source_rows: pa.ChunkedArray | None, offset: int
) -> pa.ChunkedArray | pa.Array:
    """1-based source row numbers of table positions."""
    positions = positions.cast(pa.int64())
    if source_rows is None:
        return pc.add(positions, 1 + offset)
    return pc.add(pc.take(source_rows.combine_chunks(), positions), 1)


def _quarantine_records(
    bad: pa.Table,
    table: pa.Table,
    original_names: list[str],
    back: dict[str, str],
    source: str,
    row_numbers: pa.ChunkedArray | pa.Array,
    reasons: Mapping[tuple[str, str], str],
) -> pa.Table:
    positions = bad.column(_POS).cast(pa.int64())
    raw_rows = _as_text_safe(table.take(positions)).to_pylist() if bad.num_rows else []
    if not table.num_columns:
        # Rows without any field (bare ``{}``): Arrow lists no rows for a table without columns.
        raw_rows = [{} for _ in range(bad.num_rows)]
    records: dict[str, list[Any]] = {name: [] for name in QUARANTINE_SCHEMA.names}
    for number, problems, raw in zip(
        row_numbers.to_pylist(), bad.column("_problems").to_pylist(), raw_rows, strict=True
    ):
        field, rule = problems.split(";", 1)[0].split(":", 1)
        column = back.get(field, field)
        value = raw.get(column) if column in original_names else None
        records["source_file"].append(source)
        records["row_number"].append(number)
        records["field"].append(field)
        records["rule"].append(rule)
        # As a JSON Lines reader shows it whatever the column's type (``true``, not ``True``):
        # a column of booleans only, or mixed with text, gives the same value text.
        records["value"].append(_value_text(value))
        records["rules"].append(problems)
        records["raw"].append(json.dumps(raw, default=str, sort_keys=False))
        records["source_sha256"].append(None)
        records["reason"].append(reasons.get((field, rule), RULES.get(rule)))
    return pa.table(records, schema=QUARANTINE_SCHEMA)


def _as_text_safe(table: pa.Table) -> pa.Table:
    """Temporal columns as text, so a value beyond Python's dates can still be shown."""
    for index, field in enumerate(table.schema):
        kind = field.type
        if pa.types.is_temporal(kind):
            try:
                column = table.column(index).cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                column = table.column(index).cast(pa.int64()).cast(pa.string())
            table = table.set_column(index, field.name, column)
    return table


_TOKENS = re.compile(r"[\s,;|\"'{}\[\]:]+")


def _unparsed_records(
    problems: Sequence[RowProblem], source: str, withdrawn: Collection[str]
) -> tuple[pa.Table, int]:
    """Quarantine records of rows the reader could not parse, and how many were withdrawn.

    A row that names a withdrawn customer (as one of its fields) is dropped,
    not kept: the quarantine holds no data of such customers.
    """
    records: dict[str, list[Any]] = {name: [] for name in QUARANTINE_SCHEMA.names}
    removed = 0
    for problem in problems:
        if withdrawn and any(t in withdrawn for t in _TOKENS.split(problem.text) if t):
            removed += 1
            continue
        records["source_file"].append(source)
        records["row_number"].append(problem.row + 1)
        records["field"].append(ROW_FIELD)
        records["rule"].append(problem.rule)
        records["value"].append(problem.text)
        records["rules"].append(f"{ROW_FIELD}:{problem.rule}")
        # A JSON string, not an object: the row has no fields to name.
        records["raw"].append(json.dumps(problem.text))
        records["source_sha256"].append(None)
        records["reason"].append(RULES.get(problem.rule))
    return pa.table(records, schema=QUARANTINE_SCHEMA), removed


def withdrawn_customers(table: pa.Table, mapping: Mapping[str, str] | None = None) -> set[str]:
    """Customers (ids trimmed) whose ``consent`` column is false in some row of ``table``.

    Examples
    --------
    >>> withdrawn_customers(pa.table({"customer_id": ["C1", " C2"], "consent": [True, False]}))
    {'C2'}
    """
    table = table.drop_columns([c for c in (SOURCE_ROW, FLAGS) if c in table.column_names])
    table, _ = _rename(table, mapping)
    if "consent" not in table.column_names or "customer_id" not in table.column_names:
        return set()
    kinds = _kinds(table)
    customer = f"trim({_text('customer_id', kinds['customer_id'])}, {_WS})"
    con = duckdb.connect()
    positions = pa.array(range(table.num_rows), pa.int64())
    con.register("src", _prepared(table, ("customer_id", "consent"), positions))
    rows = con.execute(
        f"SELECT DISTINCT {customer} FROM src "
        f"WHERE {_consent('consent', kinds['consent'])} = false AND {customer} <> ''"
    ).fetchall()
    con.close()
    return {r[0] for r in rows}
