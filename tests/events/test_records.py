"""The in-memory fast path of validation gives the file path's verdicts, rule by rule."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from propensity.events._readers import read_records
from propensity.events.records import TEXT_COLUMNS, validate_records
from propensity.events.schema import ARROW_SCHEMA, NUMERIC_COLUMNS
from propensity.events.validation import validate_events, withdrawn_customers

NOW = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)

# Values the fast path checks itself (rule breakers included), then values it defers.
_CLEAN = {
    "customer_id": ["C1", "C2", " C1", "C1 ", "", "  ", "C\u00e9"],
    "event_type": ["page_view", "purchase", "add_to_cart", "teleport", " page_view", ""],
    "event_timestamp": [
        "2026-06-01T11:59:00Z",
        "2026-06-01T11:59:00.123456Z",
        "2026-06-01 11:59Z",
        "2026-06-01T13:59:00+02:00",
        "2026-06-01T09:29:00-02:30",
        "2026-06-01T12:10:00Z",  # beyond the future tolerance
        "2026-06-01T12:04:00Z",  # within it
        "1969-12-31T23:59:59Z",
        "1900-01-01T00:00:00+14:00",
        "yesterday",
        "",
        "2026-06-01T11:59:00",  # naive: fast in UTC only
    ],
    "event_id": ["a", "b", "c", "\u00e9"],
    "text": ["s1", "", " ", "p\u00e9"],
    "number": [0, 3, -1, 0.0, -0.0, 0.5, 1.0, 1.5, -2.5, 1e20],
    "consent": [True, False],
}
_ODD = {
    "customer_id": ["\tC3", "C1\x01", 7, "C\x00", "C\ud800"],  # a lone surrogate: no text
    "event_type": [3, False],
    "event_timestamp": [
        "2026-06-01T11:59:00.1234567Z",
        "2026-06-01T13:59:00+0200",
        "2026-06-01T13:59:00+02",
        "2026-06-01",
        "0000-01-01T00:00:00Z",
        "2026-02-30T10:00:00Z",
        "2026-06-01T24:00:00Z",
        "2026-06-01T23:59:60Z",
        "2026-06-01T10:00:00+15:00",
        " 2026-06-01T11:59:00Z ",
        1717243200,
    ],
    "event_id": ["", " ", 9],
    "text": [3, 2.5, False, {"a": 1}],
    "number": [float("nan"), float("inf"), "3", "abc", True, [1], 1 << 60],
    "consent": ["no", 1, "maybe"],
}
_KIND = {"session_id": "text", "product_id": "text", "extra": "text", "price": "number",
         "quantity": "number", "propensity": "number"}  # fmt: skip
_REQUIRED = ("customer_id", "event_type", "event_timestamp", "event_id")


@st.composite
def _records(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 29)) == 0:
        return draw(st.sampled_from([["a"], 3, None, "x"]))
    odd = draw(st.integers(0, 2)) == 0
    record: dict = {}
    for name in (*_REQUIRED, *_KIND, "consent"):
        # Required fields mostly present, the others mostly absent.
        if draw(st.integers(0, 9)) >= (9 if name in _REQUIRED else 3):
            continue
        kind = _KIND.get(name, name)
        pool = _CLEAN[kind] + (_ODD[kind] if odd else [])
        record[name] = draw(st.sampled_from([*pool, None]))
    return record


def _file_path(records: list, timezone: str):
    table, problems = read_records(records, TEXT_COLUMNS, "POST /events")
    withdrawn = withdrawn_customers(table) if "consent" in table.column_names else set()
    return validate_events(
        table,
        source="POST /events",
        timezone=timezone,
        now=NOW,
        withdrawn=withdrawn,
        unparsed=problems,
        columns_required=False,
    )


def _same_value(fast: str | None, slow: str | None, field: str) -> bool:
    if fast == slow:
        return True
    # An integer in a column that also holds floats reads as a float on the file path.
    if field in NUMERIC_COLUMNS and fast is not None and slow is not None:
        try:
            return math.isclose(float(fast), float(slow)) or (
                math.isnan(float(fast)) and math.isnan(float(slow))
            )
        except ValueError:
            return False
    return False


def _compare(records: list, timezone: str) -> None:
    slow = _file_path(records, timezone)
    fast = validate_records(records, source="POST /events", timezone=timezone, now=NOW)
    names = [f.name for f in ARROW_SCHEMA] + ["__row__"]
    assert fast.valid.select(names).to_pylist() == slow.valid.select(names).to_pylist()
    keys = ["row_number", "field", "rule", "rules", "reason", "source_file"]
    assert fast.rejected.select(keys).to_pylist() == slow.rejected.select(keys).to_pylist()
    for a, b, f in zip(
        fast.rejected.column("value").to_pylist(),
        slow.rejected.column("value").to_pylist(),
        fast.rejected.column("field").to_pylist(),
        strict=True,
    ):
        assert _same_value(a, b, f), (f, a, b)
    assert fast.consent_removed == slow.consent_removed
    assert fast.read == slow.read == len(records)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(_records(), min_size=1, max_size=12),
    timezone=st.sampled_from(["UTC", "Europe/Paris"]),
)
@example(
    records=[
        {"customer_id": "C1", "event_type": "page_view", "event_id": "a",
         "event_timestamp": "2026-06-01T11:59:00Z", "price": -3},
        {"customer_id": "C1", "event_type": "page_view", "event_id": "b",
         "event_timestamp": "2026-06-01T11:59:00Z", "price": 2.5, "consent": True},
    ],
    timezone="UTC",
)  # fmt: skip
def test_fast_path_gives_the_file_paths_verdicts(records: list, timezone: str) -> None:
    _compare(records, timezone)


def test_clean_batches_never_touch_the_file_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import propensity.events.records as module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("deferred a clean record")

    monkeypatch.setattr(module, "validate_events", refuse)
    records = [
        {"event_id": f"e{i}", "customer_id": f"C{i % 3}", "event_type": kind,
         "event_timestamp": "2026-06-01T11:59:00.5+00:00", "session_id": "s", "price": 2}
        for i, kind in enumerate(["page_view", "teleport", "purchase", "add_to_cart"])
    ] + [{"event_id": "x", "customer_id": "C9", "event_type": "page_view",
          "event_timestamp": "2026-06-01T12:30:00Z"}]  # fmt: skip
    result = validate_records(records, now=NOW)
    assert result.valid.column("__row__").to_pylist() == [1, 3, 4]
    assert result.rejected.column("rule").to_pylist() == ["unknown_event_type", "future_timestamp"]
    assert result.valid.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    _compare(records, "UTC")


def test_a_withdrawal_in_a_deferred_record_drops_the_customers_fast_records() -> None:
    records = [
        {"event_id": "a", "customer_id": "C1", "event_type": "page_view",
         "event_timestamp": "2026-06-01T11:59:00Z"},
        # Deferred (consent as text), yet it withdraws C1 for the whole batch.
        {"event_id": "b", "customer_id": "C1", "event_type": "page_view",
         "event_timestamp": "2026-06-01T11:59:00Z", "consent": "no"},
    ]  # fmt: skip
    result = validate_records(records, now=NOW)
    assert (result.valid.num_rows, result.consent_removed) == (0, 2)
    _compare(records, "UTC")


def test_a_lone_surrogate_is_rejected_as_not_utf8_and_the_rest_kept() -> None:
    # A JSON "\ud800" escape decodes to a string no UTF-8 can hold: quarantined, not a crash.
    records = [
        {"event_id": "e1", "customer_id": "C\ud800", "event_type": "page_view",
         "event_timestamp": "2026-06-01T11:59:00Z"},
        {"event_id": "e2", "customer_id": "C2", "event_type": "page_view",
         "event_timestamp": "2026-06-01T11:59:00Z", "product_id": "P\udfff"},
        {"event_id": "e3", "customer_id": "C3", "event_type": "page_view",
         "event_timestamp": "2026-06-01T11:59:00Z"},
    ]  # fmt: skip
    result = validate_records(records, now=NOW)
    assert result.valid["event_id"].to_pylist() == ["e3"]
    rejected = result.rejected.to_pylist()
    assert [(r["row_number"], r["rule"]) for r in rejected] == [(1, "not_utf8"), (2, "not_utf8")]
    assert [r["field"] for r in rejected] == ["customer_id", "product_id"]


def test_a_boolean_in_a_numeric_field_shows_as_json_text_alone_or_mixed() -> None:
    """Found by the comparison above: a batch whose only ``propensity`` is a boolean
    (a column of booleans) showed ``True``, one that mixes it with numbers ``true``."""
    bad = {
        "customer_id": "C1",
        "event_type": "page_view",
        "event_timestamp": "2026-06-01T11:59:00Z",
        "event_id": "a",
        "propensity": True,
    }
    mixed = [bad, {**bad, "event_id": "b", "propensity": 0.5}]
    for records in ([bad], mixed):
        _compare(records, "UTC")
        rejected = validate_records(records, source="x", timezone="UTC", now=NOW).rejected
        assert rejected.column("value").to_pylist() == ["true"]
