"""Validate source rows against the canonical event schema, vectorized in DuckDB.

Every row either becomes a canonical event or a quarantine record naming the
source file, the 1-based data row, the field, the rule and the offending value,
with the raw row as JSON. A row breaking several rules is quarantined once:
``field``/``rule``/``value`` describe the first broken rule in the order of
:data:`RULES`, and ``rules`` lists all of them (``field:rule;field:rule``).

Text values are kept as given (no whitespace trimming); an empty text value
counts as absent.

Time: text and naive timestamps are read in ``timezone``; values carrying an
offset (``Z``, ``+02:00``) or an aware Arrow type are converted to UTC. Text
timestamps must be ISO 8601 (a date alone means midnight).

Orders-only sources (customer, date or datetime, amount, optional quantity)
become ``purchase`` events: ``quantity`` defaults to 1 and ``price`` is the
unit price ``amount / quantity``, so ``price * quantity`` is the order amount.
Their ``order_id`` is derived from the row's content.

Rows without an ``event_id`` get one derived from their canonical content
(an MD5 hex digest), so identical rows share an id and re-ingesting a file is
a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from propensity.events._readers import IngestError
from propensity.events.schema import ARROW_SCHEMA, EVENT_TYPES, NUMERIC_COLUMNS

__all__ = [
    "RULES",
    "QUARANTINE_SCHEMA",
    "FUTURE_TOLERANCE",
    "ORDER_TIME_COLUMNS",
    "ValidationResult",
    "validate_events",
    "withdrawn_customers",
]

RULES: dict[str, str] = {
    "missing": "a required field is absent or empty",
    "unparseable_timestamp": "the timestamp is not an ISO 8601 date or datetime",
    "future_timestamp": "the timestamp is later than now (plus a small tolerance)",
    "unknown_event_type": "event_type is not one of the documented event types",
    "not_numeric": "a numeric field holds text or a value of another type, or is not finite",
    "negative": "price, quantity or amount is below zero",
    "not_positive": "an order quantity is zero or below",
    "out_of_range": "propensity is outside (0, 1]",
    "not_boolean": "consent is not true/false/yes/no/1/0",
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
    ]
)

FUTURE_TOLERANCE = timedelta(minutes=5)
ORDER_TIME_COLUMNS: tuple[str, ...] = ("timestamp", "date", "order_date", "event_timestamp")

_STRING_COLUMNS = tuple(f.name for f in ARROW_SCHEMA if pa.types.is_string(f.type))
_TRUE = ("true", "t", "yes", "y", "1", "1.0")
_FALSE = ("false", "f", "no", "n", "0", "0.0")
_POS = "__pos__"
_CHUNK_ROWS = 2_000_000
_OUT_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in ARROW_SCHEMA])


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
        Rows in the source.
    """

    valid: pa.Table
    rejected: pa.Table
    consent_removed: int
    read: int


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _text(col: str) -> str:
    # No trimming: it tripled the cost of this step on large files.
    return f"NULLIF(CAST({_q(col)} AS VARCHAR), '')"


def _number(col: str, kind: pa.DataType) -> str:
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return f"CAST({_q(col)} AS DOUBLE)"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return f"TRY_CAST(trim({_q(col)}) AS DOUBLE)"
    # Booleans, timestamps, nested values: the wrong type for a number.
    return "CAST(NULL AS DOUBLE)"


def _timestamp(col: str, kind: pa.DataType) -> str:
    if pa.types.is_timestamp(kind):
        # Aware values keep their instant; naive ones are read in the session zone.
        return f"CAST({_q(col)} AS TIMESTAMPTZ)"
    if pa.types.is_date(kind):
        return f"CAST(CAST({_q(col)} AS TIMESTAMP) AS TIMESTAMPTZ)"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return f"TRY_CAST(trim({_q(col)}) AS TIMESTAMPTZ)"
    return "CAST(NULL AS TIMESTAMPTZ)"


def _rename(table: pa.Table, mapping: Mapping[str, str] | None) -> tuple[pa.Table, dict[str, str]]:
    """Apply ``{source: canonical}``; return the table and ``{canonical: source}``."""
    mapping = dict(mapping or {})
    names = [mapping.get(name, name) for name in table.column_names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise IngestError(f"column mapping gives several columns the name(s) {repeated}")
    back = {mapping.get(name, name): name for name in table.column_names}
    return table.rename_columns(names), back


def _consent(col: str) -> str:
    value = f"lower(trim(CAST({_q(col)} AS VARCHAR)))"
    trues = ", ".join(_lit(v) for v in _TRUE)
    falses = ", ".join(_lit(v) for v in _FALSE)
    return f"CASE WHEN {value} IN ({trues}) THEN true WHEN {value} IN ({falses}) THEN false END"


def withdrawn_customers(table: pa.Table, mapping: Mapping[str, str] | None = None) -> set[str]:
    """Customers whose ``consent`` column is false in some row of ``table``.

    Examples
    --------
    >>> withdrawn_customers(pa.table({"customer_id": ["C1", "C2"], "consent": [True, False]}))
    {'C2'}
    """
    table, _ = _rename(table, mapping)
    if "consent" not in table.column_names or "customer_id" not in table.column_names:
        return set()
    con = duckdb.connect()
    con.register("src", table)
    rows = con.execute(
        f"SELECT DISTINCT {_text('customer_id')} FROM src "
        f"WHERE {_consent('consent')} = false AND {_text('customer_id')} IS NOT NULL"
    ).fetchall()
    con.close()
    return {r[0] for r in rows}


@dataclass
class _Plan:
    parsed: list[str]  # "expr AS name" items of the parsing step
    rules: list[tuple[str, str, str]]  # (field, rule, condition) in reporting order
    fields: dict[str, str]  # rule field -> source column holding the raw value
    order_key: str | None  # SQL for a derived order_id, orders-only mode


def _events_plan(table: pa.Table, now_sql: str) -> _Plan:
    cols = dict(zip(table.column_names, table.schema.types, strict=True))
    missing = [c for c in ("customer_id", "event_type", "event_timestamp") if c not in cols]
    if missing:
        raise IngestError(
            f"required column(s) {missing} not found; columns are {list(cols)} "
            "(map source names with a column mapping)"
        )
    parsed = [
        f"{_text(c) if c in cols else 'CAST(NULL AS VARCHAR)'} AS {_q(c)}" for c in _STRING_COLUMNS
    ]
    parsed.append(f"{_timestamp('event_timestamp', cols['event_timestamp'])} AS event_timestamp")
    parsed.append(f"{_text('event_timestamp')} IS NOT NULL AS _has_event_timestamp")
    numbers = [c for c in NUMERIC_COLUMNS if c in cols]
    for c in NUMERIC_COLUMNS:
        parsed.append(f"{_number(c, cols[c]) if c in cols else 'CAST(NULL AS DOUBLE)'} AS {_q(c)}")
    for c in numbers:
        parsed.append(f"{_text(c)} IS NOT NULL AS _has_{c}")
    types = ", ".join(_lit(t) for t in EVENT_TYPES)
    rules = [
        ("customer_id", "missing", "customer_id IS NULL"),
        ("event_type", "missing", "event_type IS NULL"),
        ("event_timestamp", "missing", "NOT _has_event_timestamp"),
        (
            "event_timestamp",
            "unparseable_timestamp",
            "_has_event_timestamp AND event_timestamp IS NULL",
        ),
        ("event_timestamp", "future_timestamp", f"event_timestamp > {now_sql}"),
        ("event_type", "unknown_event_type", f"event_type NOT IN ({types})"),
    ]
    for c in numbers:
        rules.append((c, "not_numeric", f"_has_{c} AND ({c} IS NULL OR NOT isfinite({c}))"))
        if c == "propensity":
            rules.append((c, "out_of_range", f"isfinite({c}) AND ({c} <= 0 OR {c} > 1)"))
        else:
            rules.append((c, "negative", f"{c} < 0"))
    fields = {name: name for name in cols}
    return _Plan(parsed, rules, fields, None)


def _orders_plan(table: pa.Table, now_sql: str) -> _Plan:
    cols = dict(zip(table.column_names, table.schema.types, strict=True))
    time_col = next((c for c in ORDER_TIME_COLUMNS if c in cols), None)
    missing = [c for c in ("customer_id", "amount") if c not in cols]
    if time_col is None:
        missing.append("|".join(ORDER_TIME_COLUMNS))
    if missing:
        raise IngestError(
            f"orders-only source lacks column(s) {missing}; columns are {list(cols)} "
            "(map source names with a column mapping)"
        )
    assert time_col is not None
    canonical_text = [c for c in _STRING_COLUMNS if c not in ("event_type",)]
    parsed = [
        f"{_text(c) if c in cols else 'CAST(NULL AS VARCHAR)'} AS {_q(c)}" for c in canonical_text
    ]
    parsed.append("'purchase' AS event_type")
    parsed.append(f"{_timestamp(time_col, cols[time_col])} AS event_timestamp")
    parsed.append(f"{_text(time_col)} IS NOT NULL AS _has_time")
    parsed.append(f"{_number('amount', cols['amount'])} AS amount")
    parsed.append(f"{_text('amount')} IS NOT NULL AS _has_amount")
    if "quantity" in cols:
        parsed.append(f"{_number('quantity', cols['quantity'])} AS _quantity")
        parsed.append(f"{_text('quantity')} IS NOT NULL AS _has_quantity")
    else:
        parsed += ["CAST(NULL AS DOUBLE) AS _quantity", "false AS _has_quantity"]
    parsed.append("CAST(NULL AS DOUBLE) AS propensity")
    rules = [
        ("customer_id", "missing", "customer_id IS NULL"),
        (time_col, "missing", "NOT _has_time"),
        (time_col, "unparseable_timestamp", "_has_time AND event_timestamp IS NULL"),
        (time_col, "future_timestamp", f"event_timestamp > {now_sql}"),
        ("amount", "missing", "NOT _has_amount"),
        ("amount", "not_numeric", "_has_amount AND (amount IS NULL OR NOT isfinite(amount))"),
        ("amount", "negative", "amount < 0"),
        (
            "quantity",
            "not_numeric",
            "_has_quantity AND (_quantity IS NULL OR NOT isfinite(_quantity))",
        ),
        ("quantity", "not_positive", "_quantity <= 0"),
    ]
    fields = {name: name for name in cols}
    key = (
        "concat_ws(chr(31), customer_id, CAST(epoch_us(event_timestamp) AS VARCHAR), "
        "CAST(amount AS VARCHAR), CAST(coalesce(_quantity, 1) AS VARCHAR))"
    )
    return _Plan(parsed, rules, fields, key)


def _canonical_select(plan: _Plan) -> str:
    items = []
    for field in ARROW_SCHEMA:
        name = field.name
        if plan.order_key is not None and name == "quantity":
            items.append("coalesce(_quantity, 1) AS quantity")
        elif plan.order_key is not None and name == "price":
            items.append("amount / coalesce(_quantity, 1) AS price")
        elif plan.order_key is not None and name == "order_id":
            items.append(f"coalesce(order_id, 'O' || left(md5({plan.order_key}), 16)) AS order_id")
        elif name != "event_id":
            items.append(_q(name))
    return ", ".join(items)


def _content_hash() -> str:
    parts = []
    for field in ARROW_SCHEMA:
        if field.name == "event_id":
            continue
        if field.name == "event_timestamp":
            value = "CAST(epoch_us(event_timestamp) AS VARCHAR)"
        else:
            value = f"CAST({_q(field.name)} AS VARCHAR)"
        parts.append(f"coalesce({value}, '')")
    return f"md5(concat_ws(chr(31), {', '.join(parts)}))"


def _build_sql(plan: _Plan, with_consent: bool, withdrawn: bool) -> str:
    rules = list(plan.rules)
    if with_consent:
        rules.append(
            (
                "consent",
                "not_boolean",
                f"{_text('consent')} IS NOT NULL AND {_consent('consent')} IS NULL",
            )
        )
    # A cheap boolean for every row; the text listing the broken rules is only
    # built for the (usually few) bad rows.
    any_bad = " OR ".join(f"({cond})" for _, _, cond in rules)
    problems = ", ".join(
        f"CASE WHEN {cond} THEN {_lit(field + ':' + rule)} END" for field, rule, cond in rules
    )
    where = ""
    if withdrawn:
        where = (
            "WHERE customer_id IS NULL OR customer_id NOT IN (SELECT customer_id FROM withdrawn)"
        )
    return f"""
        WITH parsed AS (
            SELECT {_POS}, {", ".join(plan.parsed)}
            FROM src
        ),
        canonical AS (
            SELECT {_POS}, {_canonical_select(plan)},
                   event_id AS _given_id,
                   CASE WHEN coalesce({any_bad}, false)
                        THEN concat_ws(';', {problems}) END AS _problems
            FROM parsed {where}
        )
        SELECT coalesce(_given_id, {_content_hash()}) AS event_id, *
        FROM canonical
    """


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
) -> ValidationResult:
    """Split a source table into canonical events and quarantine records.

    Parameters
    ----------
    table : pa.Table
        Rows as read from the source (see ``propensity.events._readers``).
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
        batch), so reported row numbers are those of the whole file.

    Returns
    -------
    ValidationResult

    Raises
    ------
    IngestError
        If required columns are absent or the mapping clashes.

    Examples
    --------
    >>> raw = pa.table({"customer_id": ["C1"], "event_type": ["purchase"],
    ...                 "event_timestamp": ["2024-01-05 10:00"], "price": ["-3"]})
    >>> result = validate_events(raw, source="events.csv")
    >>> result.rejected.column("rule").to_pylist()
    ['negative']
    """
    original_names = table.column_names
    renamed, back = _rename(table, mapping)
    if _POS in renamed.column_names:
        raise IngestError(f"column name {_POS} is reserved")
    reference = (now or datetime.now(UTC)) + FUTURE_TOLERANCE
    if reference.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now_sql = f"TIMESTAMPTZ {_lit(reference.astimezone(UTC).isoformat())}"
    plan = _orders_plan(renamed, now_sql) if orders_only else _events_plan(renamed, now_sql)
    con = duckdb.connect()
    try:
        con.execute(f"SET TimeZone = {_lit(timezone)}")
    except duckdb.Error:
        con.close()
        raise ValueError(f"unknown time zone {timezone!r}") from None
    if withdrawn:
        con.register("withdrawn", pa.table({"customer_id": pa.array(list(withdrawn), pa.string())}))
    has_consent = "consent" in renamed.column_names
    if has_consent:
        plan.parsed.append("consent")
    sql = _build_sql(plan, has_consent, bool(withdrawn))
    valid_parts, bad_parts, kept = [], [], 0
    # Chunks bound DuckDB's working memory on large files.
    for start in range(0, max(renamed.num_rows, 1), _CHUNK_ROWS):
        chunk = renamed.slice(start, _CHUNK_ROWS)
        positions = pa.array(range(start, start + chunk.num_rows), pa.int64())
        con.register("src", chunk.append_column(_POS, positions))
        out = con.sql(sql).to_arrow_table()
        con.unregister("src")
        kept += out.num_rows
        bad = pc.is_valid(out.column("_problems"))
        if pc.any(bad).as_py():
            bad_parts.append(out.filter(bad).select([_POS, "_problems"]))
            out = out.filter(pc.invert(bad))
        valid_parts.append(
            out.select([f.name for f in ARROW_SCHEMA])
            .cast(_OUT_SCHEMA)
            .append_column("__row__", pc.add(out.column(_POS), 1 + row_offset))
        )
    con.close()
    bad_rows = pa.concat_tables(bad_parts) if bad_parts else pa.table({_POS: [], "_problems": []})
    rejected = _quarantine_records(
        bad_rows, table, original_names, back, plan.fields, source, row_offset
    )
    return ValidationResult(
        valid=pa.concat_tables(valid_parts),
        rejected=rejected,
        consent_removed=table.num_rows - kept,
        read=table.num_rows,
    )


def _quarantine_records(
    bad: pa.Table,
    table: pa.Table,
    original_names: list[str],
    back: dict[str, str],
    fields: dict[str, str],
    source: str,
    row_offset: int,
) -> pa.Table:
    positions = bad.column(_POS).cast(pa.int64())
    raw_rows = table.take(positions).to_pylist() if bad.num_rows else []
    records: dict[str, list[Any]] = {name: [] for name in QUARANTINE_SCHEMA.names}
    for pos, problems, raw in zip(
        positions.to_pylist(), bad.column("_problems").to_pylist(), raw_rows, strict=True
    ):
        field, rule = problems.split(";", 1)[0].split(":", 1)
        column = back.get(fields.get(field, field), field)
        value = raw.get(column) if column in original_names else None
        records["source_file"].append(source)
        records["row_number"].append(pos + 1 + row_offset)
        records["field"].append(field)
        records["rule"].append(rule)
        records["value"].append(None if value is None else str(value))
        records["rules"].append(problems)
        records["raw"].append(json.dumps(raw, default=str, sort_keys=False))
    return pa.table(records, schema=QUARANTINE_SCHEMA)
