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
