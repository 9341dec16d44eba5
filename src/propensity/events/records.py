"""Validate in-memory JSON records (``POST /events``, the stream) without a DuckDB round trip.

:func:`validate_records` gives what validating the records as a JSON Lines
file gives (:func:`~propensity.events._readers.read_records` then
:func:`~propensity.events.validation.validate_events`): the same valid
events, and the same rejected rows with the same ``field``, ``rule``,
``rules`` and ``reason``. It is not a second validator but a shortcut for the
records whose verdict is certain from plain Python values:

* every text field is a ``str`` or absent, every number an ``int`` or a finite
  ``float``, ``consent`` a ``bool``, ``event_id`` given, and the timestamp text
  either not ISO 8601 at all or of the shape
  ``YYYY-MM-DD[T ]HH:MM[:SS[.ffffff]]`` with ``Z`` or ``±HH:MM`` (naive only
  when the project zone is UTC);
* such a record is checked here with the rules of :data:`RULES`, in their
  order; any other record (a nested value, an integer id, a naive local time,
  ``NaN``, a control character at the edge of a value...) is *deferred*: the
  deferred records go through the file path together, and their results are
  merged back by position.

Consent spans the batch: a customer withdrawn by any record (or listed on
the suppression list) loses all their records, fast or deferred. A rejected
record's ``raw`` is the record as sent (JSON) and ``value`` the offending
value as sent; the file path shows the same values, except that an integer
in a column that also holds floats reads there as a float (``-3.0``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from propensity.events import timestamps
from propensity.events._readers import _encodable, read_records
from propensity.events._readers import _text as _as_text
from propensity.events.schema import ARROW_SCHEMA, EVENT_TYPES, NUMERIC_COLUMNS
from propensity.events.validation import (
    FUTURE_TOLERANCE,
    QUARANTINE_SCHEMA,
    RULES,
    ValidationResult,
    validate_events,
    withdrawn_customers,
)

if TYPE_CHECKING:
    from propensity.events.suppression import Screen

__all__ = ["TEXT_COLUMNS", "validate_records"]

#: Columns the JSON reader keeps as text (ids, the timestamp, consent).
TEXT_COLUMNS = frozenset(
    {f.name for f in ARROW_SCHEMA if pa.types.is_string(f.type)} | {"event_timestamp", "consent"}
)
_STRINGS = tuple(f.name for f in ARROW_SCHEMA if pa.types.is_string(f.type))
_OTHER_TEXT = tuple(c for c in _STRINGS if c not in ("customer_id", "event_type"))
_OUT_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in ARROW_SCHEMA]).append(
    pa.field("__row__", pa.int64())
)
# The characters DuckDB's trim is given in validation (``_WS``).
_WS = " \t\n\x0b\x0c\r"
_ISO = re.compile(timestamps.ISO_SHAPE, re.ASCII)
_FAST_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_MAX_EXACT_INT = 1 << 53
_DEFER = object()
_TIME_REASON = timestamps.expected(None)


def _utc_micros(text: str, naive_ok: bool) -> int | None | object:
    """µs since 1970 UTC of a timestamp text; None if not ISO 8601; ``_DEFER`` if unsure."""
    m = _FAST_TIME.fullmatch(text)
    if m is None:
        # Not the shape DuckDB is asked to parse, untrimmed or trimmed: unparseable.
        if _ISO.fullmatch(text) or _ISO.fullmatch(text.strip(_WS)):
            return _DEFER
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    if zone is None and not naive_ok:
        return _DEFER
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return _DEFER
    h, mi, s = int(hour), int(minute), int(second or 0)
    if h > 23 or mi > 59 or s > 59:
        return _DEFER
    offset = 0
    if zone is not None and zone != "Z":
        oh, om = int(zone[1:3]), int(zone[4:6])
        if oh > 14 or om > 59:
            return _DEFER
        offset = (oh * 60 + om) * (1 if zone[0] == "+" else -1)
    micros = int((fraction or "").ljust(6, "0"))
    return ((days * 86_400 + h * 3600 + mi * 60 + s - offset * 60) * 1_000_000) + micros


def _blank(value: str) -> bool:
    return not value.strip(_WS)


def _text_ok(value: Any) -> bool:
    # NUL and lone surrogates are left to the JSON reader, whose handling is its own.
    if value is None:
        return True
    return isinstance(value, str) and "\x00" not in value and _encodable(value)


def _clean_edges(value: str) -> bool:
    """No control character other than whitespace at either end (those are deferred)."""
    return _blank(value) or (
        (value[0] >= "!" or value[0] in _WS) and (value[-1] >= "!" or value[-1] in _WS)
    )


def _number_ok(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT
    return isinstance(value, float) and math.isfinite(value)


#: How the fast path checks each canonical field's value (other keys: only not nested).
_TEXT, _NUMBER, _CONSENT = "text", "number", "consent"
_FIELD_KIND = {
    **dict.fromkeys(_STRINGS, _TEXT),
    **dict.fromkeys(NUMERIC_COLUMNS, _NUMBER),
    "consent": _CONSENT,
}


def _fast(record: Any, naive_ok: bool) -> int | None:
    """The record's timestamp (µs, None when absent/unparseable) if it can be checked here.

    Raises ``LookupError`` to defer the record.
    """
    if not isinstance(record, dict):
        raise LookupError
    # One pass over the record's own keys (a batch's records hold few of the schema's).
    for key, value in record.items():
        # Reserved reader columns (``__source_row__``) are the file path's error to raise.
        if not isinstance(key, str) or key.startswith("__"):
            raise LookupError
        if value is None:
            continue
        kind = _FIELD_KIND.get(key)
        if kind is _TEXT:
            if not _text_ok(value):
                raise LookupError
        elif kind is _NUMBER:
            if not _number_ok(value):
                raise LookupError
        elif kind is _CONSENT:
            if not isinstance(value, bool):
                raise LookupError
        elif isinstance(value, dict | list):
            raise LookupError
    customer = record.get("customer_id")
    if customer is not None and not _clean_edges(customer):
        raise LookupError
    event_id = record.get("event_id")
    if event_id is None or _blank(event_id):
        raise LookupError  # derived ids are the file path's (DuckDB's md5 of its casts)
    stamp = record.get("event_timestamp")
    if stamp is None or (isinstance(stamp, str) and _blank(stamp)):
        return None
    if not isinstance(stamp, str):
        raise LookupError
    micros = _utc_micros(stamp, naive_ok)
    if micros is _DEFER:
        raise LookupError
    assert micros is None or isinstance(micros, int)
    return micros


def _present(value: Any) -> Any:
    """A text value as validation stores it: blank is absent."""
    return None if value is None or _blank(value) else value


def _problems(record: dict, micros: int | None, now_us: int) -> list[tuple[str, str]]:
    """Broken rules of a record, in the order of validation's plan."""
    out: list[tuple[str, str]] = []
    customer = _present(record.get("customer_id"))
    if customer is None:
        out.append(("customer_id", "missing"))
    elif customer[0] < "!" or customer[-1] < "!":
        out.append(("customer_id", "whitespace"))
    kind = _present(record.get("event_type"))
    if kind is None:
        out.append(("event_type", "missing"))
    stamp = record.get("event_timestamp")
    if stamp is None or _blank(stamp):
        out.append(("event_timestamp", "missing"))
    elif micros is None:
        out.append(("event_timestamp", "unparseable_timestamp"))
    elif micros < 0:
        out.append(("event_timestamp", "implausible_timestamp"))
    elif micros > now_us:
        out.append(("event_timestamp", "future_timestamp"))
    if kind is not None and kind not in EVENT_TYPES:
        out.append(("event_type", "unknown_event_type"))
    for name in NUMERIC_COLUMNS:
        value = record.get(name)
        if value is None:
            continue
        if name == "propensity":
            if value <= 0 or value > 1:
                out.append((name, "out_of_range"))
        elif value < 0:
            out.append((name, "negative"))
    return out


def _customer_key(value: Any) -> str | None:
    """The id the suppression list is matched against: the value as text, as the reader reads it."""
    if value is None or isinstance(value, dict | list):
        return None
    text = _as_text(value)
    # An id that is not text (a lone surrogate) is rejected as not_utf8, never stored.
    return text if text is None or _text_ok(text) else None


def validate_records(
    records: Sequence[Any],
    *,
    source: str = "records",
    timezone: str = "UTC",
    now: datetime | None = None,
    screen: Screen | None = None,
) -> ValidationResult:
    """Validate JSON-like records exactly as the same lines of a JSON Lines file.

    Parameters
    ----------
    records : sequence
        One event each (normally a dict of JSON values).
    source : str
        Recorded as ``source_file`` of the quarantine records.
    timezone : str
        Project time zone (naive timestamps).
    now : datetime, optional
        Reference time of the future-timestamp rule (default: the clock).
    screen : Screen, optional
        The suppression list's screen: listed customers' records are dropped.

    Returns
    -------
    ValidationResult
        ``valid`` in record order with ``__row__`` (1-based position),
        ``rejected`` sorted by ``row_number``.

    Examples
    --------
    >>> result = validate_records([{"event_id": "e1", "customer_id": "C1",
    ...     "event_type": "teleport", "event_timestamp": "2026-06-01T10:00:00Z"}],
    ...     now=datetime(2026, 6, 1, 12, tzinfo=UTC))
    >>> result.valid.num_rows, result.rejected.column("rule").to_pylist()
    (0, ['unknown_event_type'])
    """
    reference = (now or datetime.now(UTC)) + FUTURE_TOLERANCE
    if reference.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now_us = (reference - datetime(1970, 1, 1, tzinfo=UTC)) // _ONE_US
    naive_ok = timezone == "UTC"
    fast: list[tuple[int, dict, int | None]] = []
    deferred: list[int] = []
    withdrawn: set[str] = set()
    for index, record in enumerate(records):
        try:
            micros = _fast(record, naive_ok)
        except LookupError:
            deferred.append(index)
            continue
        fast.append((index, record, micros))
        if record.get("consent") is False:
            customer = (record.get("customer_id") or "").strip(_WS)
            if customer:
                withdrawn.add(customer)
    deferred_table: pa.Table | None = None
    problems: list[Any] = []
    if deferred:
        deferred_table, problems = read_records(
            [records[i] for i in deferred], TEXT_COLUMNS, source
        )
        if "consent" in deferred_table.column_names:
            withdrawn |= withdrawn_customers(deferred_table)
    if screen is not None:
        ids = [_customer_key(r.get("customer_id")) for r in records if isinstance(r, Mapping)]
        listed = pa.table({"customer_id": pa.array([i for i in ids if i is not None], pa.string())})
        withdrawn = screen.withdrawn(listed, withdrawn)
    valid, rejected, removed = _check(fast, withdrawn, now_us, source)
    if deferred_table is not None:
        checked = validate_events(
            deferred_table,
            source=source,
            timezone=timezone,
            now=now,
            withdrawn=withdrawn,
            unparsed=problems,
            columns_required=False,
        )
        valid, rejected, removed = _merged(valid, rejected, removed, checked, deferred)
    return ValidationResult(valid, rejected, removed, len(records))


def _check(
    fast: list[tuple[int, dict, int | None]], withdrawn: Collection[str], now_us: int, source: str
) -> tuple[pa.Table, pa.Table, int]:
    good: list[dict] = []
    stamps: list[int | None] = []
    rows: list[int] = []
    bad: dict[str, list[Any]] = {name: [] for name in QUARANTINE_SCHEMA.names}
    removed = 0
    for index, record, micros in fast:
        customer = _present(record.get("customer_id"))
        if customer is not None and withdrawn and customer.strip(_WS) in withdrawn:
            # Validation compares the trimmed id only for ids with an edge
            # character below '!'; _fast deferred the others with such edges.
            removed += 1
            continue
        problems = _problems(record, micros, now_us)
        if problems:
            field, rule = problems[0]
            value = record.get(field)
            bad["source_file"].append(source)
            bad["row_number"].append(index + 1)
            bad["field"].append(field)
            bad["rule"].append(rule)
            bad["value"].append(_as_text(value))
            bad["rules"].append(";".join(f"{f}:{r}" for f, r in problems))
            bad["raw"].append(json.dumps(record, default=str))
            bad["source_sha256"].append(None)
            reason = _TIME_REASON if rule == "unparseable_timestamp" else RULES.get(rule)
            bad["reason"].append(reason)
            continue
        good.append(record)
        stamps.append(micros)
        rows.append(index + 1)
    return _columns(good, stamps, rows), pa.table(bad, schema=QUARANTINE_SCHEMA), removed


#: The fields Arrow reads straight from the records (the timestamp is parsed already).
_READ_SCHEMA = pa.schema([f for f in _OUT_SCHEMA if f.name in (*_STRINGS, *NUMERIC_COLUMNS)])


def _columns(records: list[dict], stamps: list[int | None], rows: list[int]) -> pa.Table:
    """The valid records as the validated table: blank text is absent, as validation stores it."""
    # Arrow converts the records in C++ (the per-field Python loop was most of a batch).
    read = pa.Table.from_pylist(records, schema=_READ_SCHEMA)
    columns: dict[str, Any] = {}
    for name in _STRINGS:
        text = read.column(name)
        blank = pc.equal(pc.utf8_trim(text, _WS), "")
        columns[name] = pc.if_else(blank, pa.scalar(None, pa.string()), text)
    for name in NUMERIC_COLUMNS:
        columns[name] = read.column(name)
    columns["event_timestamp"] = pa.array(stamps, pa.int64()).cast(
        _OUT_SCHEMA.field("event_timestamp").type
    )
    columns["__row__"] = pa.array(rows, pa.int64())
    return pa.table([columns[f.name] for f in _OUT_SCHEMA], schema=_OUT_SCHEMA)


def _merged(
    valid: pa.Table,
    rejected: pa.Table,
    removed: int,
    checked: ValidationResult,
    deferred: list[int],
) -> tuple[pa.Table, pa.Table, int]:
    """Fast results plus the file path's results of the deferred records, by position."""
    back = pa.array([i + 1 for i in deferred], pa.int64())

    def renumbered(table: pa.Table, column: str) -> pa.Table:
        rows = pc.take(back, pc.subtract(table.column(column), 1))
        return table.set_column(table.schema.get_field_index(column), column, rows)

    other_valid = renumbered(checked.valid, "__row__").cast(_OUT_SCHEMA)
    other_bad = renumbered(checked.rejected, "row_number")
    valid = pa.concat_tables([valid, other_valid]).sort_by("__row__")
    rejected = pa.concat_tables([rejected, other_bad]).sort_by("row_number")
    return valid, rejected, removed + checked.consent_removed


_ONE_US = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
