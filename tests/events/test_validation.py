"""Validation rules: each bad row lands in quarantine with its row, field and rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.events.ingest import ingest
from propensity.events.lake import EventLake
from propensity.events.validation import RULES, validate_events

NOW = datetime(2024, 6, 1, tzinfo=UTC)
HEADER = "customer_id,event_type,event_timestamp,price,quantity,propensity,consent"
GOOD = "C0000001,page_view,2024-01-05 10:00:00,,,,"


def _ingest_csv(tmp_path: Path, bad_line: str, **kwargs: object) -> tuple[pd.DataFrame, object]:
    """Ingest a CSV holding a good row, the bad row (data row 2), and a good row."""
    source = tmp_path / "events.csv"
    other = GOOD.replace("C0000001", "C0000002")
    source.write_text("\n".join([HEADER, GOOD, bad_line, other]) + "\n")
    report = ingest([source], EventLake(tmp_path / "lake"), tmp_path / "q", now=NOW, **kwargs)
    assert report.accepted == 2
    assert report.quarantined == 1
    assert report.read == 3
    assert report.quarantine_path is not None
    return pq.read_table(report.quarantine_path).to_pandas(), report


@pytest.mark.parametrize(
    ("bad_line", "field", "rule", "value"),
    [
        (",page_view,2024-01-05,,,,", "customer_id", "missing", None),
        ("C0000003,,2024-01-05,,,,", "event_type", "missing", None),
        ("C0000003,page_view,,,,,", "event_timestamp", "missing", None),
        (
            "C0000003,page_view,05/01/2024 10h,,,,",
            "event_timestamp",
            "unparseable_timestamp",
            "05/01/2024 10h",
        ),
        ("C0000003,page_view,2024-06-02,,,,", "event_timestamp", "future_timestamp", "2024-06-02"),
        ("C0000003,teleport,2024-01-05,,,,", "event_type", "unknown_event_type", "teleport"),
        ("C0000003,purchase,2024-01-05,abc,1,,", "price", "not_numeric", "abc"),
        ("C0000003,purchase,2024-01-05,-1.5,1,,", "price", "negative", "-1.5"),
        ("C0000003,purchase,2024-01-05,2,-1,,", "quantity", "negative", "-1"),
        ("C0000003,campaign_exposure,2024-01-05,,,0,", "propensity", "out_of_range", "0"),
        ("C0000003,campaign_exposure,2024-01-05,,,1.2,", "propensity", "out_of_range", "1.2"),
        ("C0000003,page_view,2024-01-05,,,,maybe", "consent", "not_boolean", "maybe"),
    ],
)
def test_rule_quarantines_row_with_field_rule_and_value(
    tmp_path: Path, bad_line: str, field: str, rule: str, value: str | None
) -> None:
    quarantine, _ = _ingest_csv(tmp_path, bad_line)

    row = quarantine.iloc[0]
    assert (row["row_number"], row["field"], row["rule"]) == (2, field, rule)
    assert row["value"] == value
    assert row["source_file"].endswith("events.csv")
    assert rule in RULES
    raw = json.loads(row["raw"])
    assert list(raw) == HEADER.split(",")
    assert raw["customer_id"] == (bad_line.split(",")[0] or None)


def test_future_rule_uses_injected_now_with_tolerance(tmp_path: Path) -> None:
    raw = pa.table(
        {
            "customer_id": ["C1", "C2"],
            "event_type": ["page_view", "page_view"],
            "event_timestamp": ["2024-06-01T00:04:00Z", "2024-06-01T00:06:00Z"],
        }
    )
    result = validate_events(raw, now=NOW)
    assert result.valid.column("customer_id").to_pylist() == ["C1"]
    assert result.rejected.column("rule").to_pylist() == ["future_timestamp"]


def test_string_in_numeric_parquet_column_is_wrong_type(tmp_path: Path) -> None:
    raw = pa.table(
        {
            "customer_id": ["C1", "C2", "C3"],
            "event_type": ["purchase"] * 3,
            "event_timestamp": pa.array([NOW.replace(year=2023)] * 3, pa.timestamp("us", tz="UTC")),
            "price": pa.array([True, False, None]),
            "quantity": [1.0, float("nan"), 2.0],
        }
    )
    result = validate_events(raw, source="x.parquet", now=NOW)
    rejected = result.rejected.to_pandas()
    assert rejected[["row_number", "field", "rule"]].values.tolist() == [
        [1, "price", "not_numeric"],
        [2, "price", "not_numeric"],
    ]
    assert rejected["rules"].tolist()[1] == "price:not_numeric;quantity:not_numeric"
    assert result.valid.column("__row__").to_pylist() == [3]


def test_row_breaking_several_rules_is_reported_once_with_all_rules(tmp_path: Path) -> None:
    quarantine, report = _ingest_csv(tmp_path, ",teleport,someday,-1,x,2,")
    assert len(quarantine) == 1
    assert quarantine["rule"].iloc[0] == "missing"
    assert quarantine["rules"].iloc[0].split(";") == [
        "customer_id:missing",
        "event_timestamp:unparseable_timestamp",
        "event_type:unknown_event_type",
        "price:negative",
        "quantity:not_numeric",
        "propensity:out_of_range",
    ]
    assert report.quarantined_by_reason == {"missing": 1}


@pytest.mark.parametrize(
    ("stamp", "expected_utc"),
    [
        ("2024-01-05 10:00:00", "2024-01-05 09:00:00+00:00"),  # naive: Paris winter time
        ("2024-07-05 10:00:00", "2024-07-05 08:00:00+00:00"),  # naive: Paris summer time
        ("2024-01-05T10:00:00Z", "2024-01-05 10:00:00+00:00"),  # aware: kept
        ("2024-01-05T10:00:00-05:00", "2024-01-05 15:00:00+00:00"),  # aware: converted
        ("2024-01-05", "2024-01-04 23:00:00+00:00"),  # date: local midnight
    ],
)
def test_naive_times_read_in_project_zone_aware_converted(stamp: str, expected_utc: str) -> None:
    raw = pa.table({"customer_id": ["C1"], "event_type": ["search"], "event_timestamp": [stamp]})
    result = validate_events(raw, timezone="Europe/Paris", now=datetime(2025, 1, 1, tzinfo=UTC))
    got = result.valid.column("event_timestamp").to_pandas().iloc[0]
    assert got == pd.Timestamp(expected_utc)
    assert str(result.valid.schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"


def test_naive_arrow_timestamps_read_in_project_zone() -> None:
    naive = pa.array([datetime(2024, 1, 5, 10)], pa.timestamp("us"))
    raw = pa.table({"customer_id": ["C1"], "event_type": ["search"], "event_timestamp": naive})
    result = validate_events(raw, timezone="America/New_York", now=NOW)
    assert result.valid.column("event_timestamp")[0].as_py() == datetime(2024, 1, 5, 15, tzinfo=UTC)


def test_unknown_timezone_is_an_error() -> None:
    raw = pa.table(
        {"customer_id": ["C1"], "event_type": ["search"], "event_timestamp": ["2024-01-01"]}
    )
    with pytest.raises(ValueError, match="Mars/Olympus"):
        validate_events(raw, timezone="Mars/Olympus")


def test_valid_numbers_pass_and_counts_add_up(tmp_path: Path) -> None:
    source = tmp_path / "events.csv"
    source.write_text(
        HEADER
        + "\nC1,purchase,2024-01-05,0,0,,"
        + "\nC1,campaign_exposure,2024-01-05,,,1,"
        + "\nC2,purchase,2024-01-06,x,,,\n"
    )
    report = ingest([source], tmp_path / "lake", tmp_path / "q", now=NOW)
    assert (report.read, report.accepted, report.quarantined) == (3, 2, 1)
    counts = report.files[str(source)]
    assert (
        counts.read
        == counts.accepted + counts.duplicates + counts.quarantined + counts.consent_removed
    )


@pytest.mark.parametrize(
    ("stamp", "rule"),
    [
        ("-infinity", "unparseable_timestamp"),
        ("infinity", "unparseable_timestamp"),
        ("epoch", "unparseable_timestamp"),
        ("2026-3-2", "unparseable_timestamp"),
        ("2024-01-05 10:00 PST", "unparseable_timestamp"),
        ("2024-01-05 10:00:00 Europe/Paris", "unparseable_timestamp"),
        ("2024-01-05T10:00:00+25:00", "unparseable_timestamp"),
        ("2024-01-05T10:00:00+05:60", "unparseable_timestamp"),
        ("10000-01-01", "unparseable_timestamp"),
        ("0000-01-01", "implausible_timestamp"),
        ("0001-01-01", "implausible_timestamp"),
        ("1900-01-01", "implausible_timestamp"),
        ("1969-12-31T23:59:59Z", "implausible_timestamp"),
    ],
)
def test_timestamps_outside_iso_shape_or_plausible_range_are_quarantined(
    tmp_path: Path, stamp: str, rule: str
) -> None:
    quarantine, _ = _ingest_csv(tmp_path, f"C0000003,page_view,{stamp},,,,")
    row = quarantine.iloc[0]
    assert (row["row_number"], row["field"], row["rule"], row["value"]) == (
        2,
        "event_timestamp",
        rule,
        stamp,
    )
    assert rule in RULES


@pytest.mark.parametrize(
    ("stamp", "expected_utc"),
    [
        ("2024-01-05T10:00:00.123456+0530", "2024-01-05 04:30:00.123456+00:00"),
        ("2024-01-05 10:00+01", "2024-01-05 09:00:00+00:00"),
        ("2024-01-05T10:00:00-14:00", "2024-01-06 00:00:00+00:00"),
        ("  2024-01-05T10:00Z ", "2024-01-05 10:00:00+00:00"),
        ("1970-01-01", "1970-01-01 00:00:00+00:00"),
    ],
)
def test_iso_shapes_are_accepted(stamp: str, expected_utc: str) -> None:
    raw = pa.table({"customer_id": ["C1"], "event_type": ["search"], "event_timestamp": [stamp]})
    result = validate_events(raw, now=NOW)
    assert result.rejected.num_rows == 0
    assert result.valid.column("event_timestamp").to_pandas().iloc[0] == pd.Timestamp(expected_utc)


@pytest.mark.parametrize(
    ("bad_line", "field", "rule", "value"),
    [
        ("C0000003,purchase,2024-01-05,NaN,1,,", "price", "not_numeric", "NaN"),
        ("C0000003,purchase,2024-01-05,2,inf,,", "quantity", "not_numeric", "inf"),
        ("C0000003,campaign_exposure,2024-01-05,,,nan,", "propensity", "not_numeric", "nan"),
        ("   ,page_view,2024-01-05,,,,", "customer_id", "missing", "   "),
        ("C0000003,\t ,2024-01-05,,,,", "event_type", "missing", "\t "),
        ("C0000003,page_view, ,,,,", "event_timestamp", "missing", " "),
        (" C0000003,page_view,2024-01-05,,,,", "customer_id", "whitespace", " C0000003"),
        ("C0000003 ,page_view,2024-01-05,,,,", "customer_id", "whitespace", "C0000003 "),
    ],
)
def test_text_nan_and_whitespace_ids_are_quarantined(
    tmp_path: Path, bad_line: str, field: str, rule: str, value: str
) -> None:
    quarantine, _ = _ingest_csv(tmp_path, bad_line)
    row = quarantine.iloc[0]
    assert (row["row_number"], row["field"], row["rule"], row["value"]) == (2, field, rule, value)


def test_arrow_timestamps_out_of_range_never_crash() -> None:
    year_300000 = 300_000 * 365 * 86_400  # seconds: beyond DuckDB's microsecond timestamps
    stamps = {
        "ts_us": (
            pa.array([datetime(1, 1, 1), datetime(2024, 1, 5)], pa.timestamp("us")),
            "implausible_timestamp",
        ),
        "ts_s": (
            pa.array([-year_300000, 1_704_448_800], pa.timestamp("s", tz="UTC")),
            "implausible_timestamp",
        ),
        "ts_ms": (
            pa.array([year_300000 * 1000, 1_704_448_800_000], pa.timestamp("ms")),
            "future_timestamp",
        ),
        "date": (pa.array([-2_000_000, 19_727], pa.date32()), "implausible_timestamp"),
    }
    for name, (column, rule) in stamps.items():
        raw = pa.table(
            {"customer_id": ["C1", "C2"], "event_type": ["search"] * 2, "event_timestamp": column}
        )
        result = validate_events(raw, source=f"{name}.parquet", now=NOW)
        assert result.valid.column("customer_id").to_pylist() == ["C2"], name
        assert result.rejected.column("rule").to_pylist() == [rule], name


def test_parquet_columns_of_the_wrong_type_are_quarantined_naming_the_field() -> None:
    good = {"customer_id": ["C1"], "event_type": ["search"], "event_timestamp": ["2024-01-05"]}
    cases = {
        "customer_id": pa.array([1.5]),
        "event_type": pa.array([True]),
        "event_timestamp": pa.array([1_704_448_800], pa.int64()),
        "session_id": pa.array([[1, 2]]),
    }
    for field, column in cases.items():
        raw = pa.table({**good, field: column})
        result = validate_events(raw, source="typed.parquet", now=NOW)
        record = result.rejected.to_pylist()
        assert [(r["row_number"], r["field"], r["rule"]) for r in record] == [
            (1, field, "wrong_type")
        ], field
    # Integer ids are lossless as text.
    result = validate_events(pa.table({**good, "customer_id": [42]}), now=NOW)
    assert result.valid.column("customer_id").to_pylist() == ["42"]


def test_consent_withdrawal_covers_the_id_spelled_with_spaces(tmp_path: Path) -> None:
    source = tmp_path / "events.csv"
    source.write_text(
        "customer_id,event_type,event_timestamp,consent\n"
        "C1,search,2024-01-05,yes\n"
        " C1 ,search,2024-01-06,no\n"
        "C2,search,2024-01-07,yes\n"
    )
    report = ingest([source], tmp_path / "lake", tmp_path / "q", now=NOW)
    # No row of C1 is kept anywhere, whichever way its id is spelled.
    assert (report.accepted, report.consent_removed, report.quarantined) == (1, 2, 0)
