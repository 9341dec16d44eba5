"""Timestamp formats of sources and identical rows of a transaction log."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.events.ingest import IngestError, ingest
from propensity.events.lake import EventLake
from propensity.events.timestamps import guess_format
from propensity.events.validation import validate_events

NOW = datetime(2024, 6, 1, tzinfo=UTC)
ORDERS = "customer_id,date,amount\nC1,20240131,3\nC1,20240131,3\nC2,20240201,4\nC3,2024-02-01,5\n"


def _stamps(result: object) -> list[str]:
    valid = result.valid  # type: ignore[attr-defined]
    return [t.isoformat() for t in valid.column("event_timestamp").to_pylist()]


@pytest.mark.parametrize(
    ("fmt", "value", "stamp"),
    [
        ("%Y%m%d", "20240131", "2024-01-31T00:00:00+00:00"),
        ("%d/%m/%Y %H:%M", " 31/01/2024 10:30 ", "2024-01-31T10:30:00+00:00"),
        ("%m/%d/%Y", "01/31/2024", "2024-01-31T00:00:00+00:00"),
        ("%d.%m.%Y %H:%M:%S %z", "31.01.2024 10:30:00 +0200", "2024-01-31T08:30:00+00:00"),
        ("epoch_s", "1706697000", "2024-01-31T10:30:00+00:00"),
        ("epoch_ms", "1706697000000", "2024-01-31T10:30:00+00:00"),
    ],
)
def test_a_given_format_reads_text_timestamps(fmt: str, value: str, stamp: str) -> None:
    table = pa.table({"customer_id": ["C1"], "event_type": ["search"], "event_timestamp": [value]})
    result = validate_events(table, timestamp_format=fmt, now=NOW)
    assert result.rejected.num_rows == 0
    assert _stamps(result) == [stamp]


def test_naive_formatted_times_are_read_in_the_project_zone() -> None:
    table = pa.table({"customer_id": ["C1"], "date": ["20240131"], "amount": ["3"]})
    result = validate_events(
        table, orders_only=True, timestamp_format="%Y%m%d", timezone="Europe/Paris", now=NOW
    )
    assert _stamps(result) == ["2024-01-30T23:00:00+00:00"]


def test_rejection_names_the_expected_format() -> None:
    table = pa.table(
        {"customer_id": ["C1", "C2"], "date": ["20240131", "2024-01-31"], "amount": ["3", "4"]}
    )
    default = validate_events(table, orders_only=True, now=NOW).rejected
    assert default.column("rule").to_pylist() == ["unparseable_timestamp"]
    assert default.column("value").to_pylist() == ["20240131"]
    assert default.column("reason").to_pylist() == [
        "expected ISO 8601 (YYYY-MM-DD[ HH:MM[:SS]][±HH:MM])"
    ]
    given = validate_events(table, orders_only=True, timestamp_format="%Y%m%d", now=NOW).rejected
    assert given.column("row_number").to_pylist() == [2]
    assert given.column("reason").to_pylist() == ["expected %Y%m%d"]


def test_numeric_timestamps_need_an_epoch_unit() -> None:
    seconds = 1_706_697_000
    table = pa.table(
        {
            "customer_id": ["C1", "C2", "C3"],
            "event_type": ["search"] * 3,
            "event_timestamp": pa.array([seconds, seconds * 1000, 10**18], pa.int64()),
        }
    )
    default = validate_events(table, now=NOW).rejected
    assert set(default.column("rule").to_pylist()) == {"wrong_type"}
    assert "epoch_s or epoch_ms" in default.column("reason")[0].as_py()
    as_ms = validate_events(table, timestamp_format="epoch_ms", now=NOW)
    assert _stamps(as_ms)[1] == "2024-01-31T10:30:00+00:00"
    # A huge value is a rejected row, never a failed scan.
    assert as_ms.rejected.column("rule").to_pylist() == ["future_timestamp"]
    floats = table.set_column(2, "event_timestamp", pa.array([seconds + 0.5, 0.0, 1.0]))
    assert _stamps(validate_events(floats, timestamp_format="epoch_s", now=NOW))[0].startswith(
        "2024-01-31T10:30:00.5"
    )


def test_an_unusable_format_is_an_ingest_error(tmp_path: Path) -> None:
    (tmp_path / "o.csv").write_text(ORDERS)
    with pytest.raises(IngestError, match="'%Q' is not usable"):
        ingest(tmp_path / "o.csv", tmp_path / "lake", tmp_path / "q", timestamp_format="%Q")
    with pytest.raises(IngestError, match="no strptime code"):
        ingest(tmp_path / "o.csv", tmp_path / "lake", tmp_path / "q", timestamp_format="YYYYMMDD")


@pytest.mark.parametrize(
    ("values", "guess"),
    [
        (["20240131", "20240201"], ["%Y%m%d"]),
        (["31/01/2024", "15/02/2024"], ["%d/%m/%Y"]),
        (["01/31/2024", "02/15/2024"], ["%m/%d/%Y"]),
        (["01/02/2024"], ["%d/%m/%Y", "%m/%d/%Y"]),
        (["2024/01/31 10:00"], ["%Y/%m/%d %H:%M"]),
        (["31.01.2024"], ["%d.%m.%Y"]),
        (["1706697000"], ["epoch_s"]),
        (["1706697000000"], ["epoch_ms"]),
        (["yesterday"], []),
    ],
)
def test_guess_format(values: list[str], guess: list[str]) -> None:
    assert guess_format(values) == guess


def test_summary_hints_at_a_format_when_most_timestamps_fail(tmp_path: Path) -> None:
    (tmp_path / "o.csv").write_text(ORDERS)
    report = ingest(
        tmp_path / "o.csv", tmp_path / "lake", tmp_path / "q", orders_only=True, now=NOW
    )
    assert report.files[str(tmp_path / "o.csv")].timestamp_failures == 3
    assert len(report.hints) == 1
    assert "3 of 4 timestamps rejected" in report.hints[0]
    assert "--timestamp-format '%Y%m%d'" in report.summary()
    ok = ingest(
        tmp_path / "o.csv",
        tmp_path / "lake",
        tmp_path / "q",
        orders_only=True,
        timestamp_format="%Y%m%d",
        now=NOW,
    )
    assert ok.hints == []


def test_identical_rows_are_counted_and_can_be_kept(tmp_path: Path) -> None:
    source = tmp_path / "o.csv"
    source.write_text(ORDERS)
    lake = EventLake(tmp_path / "lake")
    options = {"orders_only": True, "timestamp_format": "%Y%m%d", "now": NOW}
    first = ingest(source, lake, tmp_path / "q", **options)  # type: ignore[arg-type]
    assert (first.accepted, first.duplicates, first.identical_rows) == (2, 1, 1)
    assert first.files[str(source)].identical_rows == 1
    assert "identical rows merged within a file: 1" in first.summary()
    # Against the lake every row is a duplicate now; the file still has one identical row.
    again = ingest(source, lake, tmp_path / "q", **options)  # type: ignore[arg-type]
    assert (again.accepted, again.duplicates, again.identical_rows) == (0, 3, 1)

    kept_lake = EventLake(tmp_path / "kept")
    kept = ingest(source, kept_lake, tmp_path / "q", keep_identical_rows=True, **options)  # type: ignore[arg-type]
    assert (kept.accepted, kept.duplicates, kept.identical_rows) == (3, 0, 0)
    orders = kept_lake.read_table(["order_id"]).column("order_id").to_pylist()
    assert len(set(orders)) == 3
    # The row number is part of the id: a re-ingest of the same file adds nothing.
    rerun = ingest(source, kept_lake, tmp_path / "q", keep_identical_rows=True, **options)  # type: ignore[arg-type]
    assert (rerun.accepted, rerun.duplicates) == (0, 3)


def test_identical_rows_across_batches_and_files(tmp_path: Path) -> None:
    rows = "customer_id,event_type,event_timestamp\n" + "C1,search,2024-01-05\n" * 5
    (tmp_path / "a.csv").write_text(rows)
    (tmp_path / "b.csv").write_text(rows)
    report = ingest(
        [tmp_path / "a.csv", tmp_path / "b.csv"],
        tmp_path / "lake",
        tmp_path / "q",
        now=NOW,
        batch_rows=2,
    )
    # b.csv's first row repeats a.csv's, not an earlier row of b.csv.
    assert (report.accepted, report.duplicates, report.identical_rows) == (1, 9, 8)
    assert {name: c.identical_rows for name, c in report.files.items()} == {
        str(tmp_path / "a.csv"): 4,
        str(tmp_path / "b.csv"): 4,
    }


def test_parquet_integer_dates_with_a_format(tmp_path: Path) -> None:
    path = tmp_path / "o.parquet"
    pq.write_table(
        pa.table(
            {
                "customer_id": ["C1", "C2"],
                "date": pa.array([20240131, 20240230], pa.int64()),
                "amount": [3.0, 4.0],
            }
        ),
        path,
    )
    report = ingest(
        path,
        tmp_path / "lake",
        tmp_path / "q",
        orders_only=True,
        timestamp_format="%Y%m%d",
        now=NOW,
    )
    assert (report.accepted, report.quarantined_by_reason) == (1, {"unparseable_timestamp": 1})


def test_cli_options(tmp_path: Path) -> None:
    (tmp_path / "o.csv").write_text(ORDERS)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "propensity.cli", "ingest", "o.csv", "--orders-only", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )

    hinted = run()
    assert hinted.returncode == 0, hinted.stderr
    assert "--timestamp-format '%Y%m%d'" in hinted.stdout
    kept = run("--timestamp-format", "%Y%m%d", "--keep-identical-rows")
    assert kept.returncode == 0, kept.stderr
    assert "│ total │    4 │        3 │" in kept.stdout
    bad = run("--timestamp-format", "%Q")
    assert bad.returncode == 2 and "'%Q' is not usable" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr


def test_project_setting_is_used_by_cli_project_and_overridden_by_the_flag(tmp_path: Path) -> None:
    from propensity.config import ConfigError, load_settings
    from propensity.project import Project

    (tmp_path / "o.csv").write_text(ORDERS)
    (tmp_path / "propensity.yaml").write_text("events:\n  timestamp_format: '%Y%m%d'\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "propensity.cli", "ingest", "o.csv", "--orders-only", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "200"},
        )

    from_setting = run()
    assert from_setting.returncode == 0, from_setting.stderr
    assert "looks like" not in from_setting.stdout  # no hint: every date was read
    lake = EventLake(tmp_path / "data" / "lake")
    read_by_cli = len(lake.read(["event_timestamp"]))
    assert read_by_cli > 0
    # the flag wins over the setting: ISO-only dates now fail and nothing is added
    overridden = run("--timestamp-format", "%d/%m/%Y")
    assert overridden.returncode == 0, overridden.stderr
    assert len(lake.read(["event_timestamp"])) == read_by_cli
    # Project.ingest reads the same setting (a second project, same file)
    other = tmp_path / "other"
    other.mkdir()
    (other / "propensity.yaml").write_text("events:\n  timestamp_format: '%Y%m%d'\n")
    report = Project.open(other / "propensity.yaml").ingest(tmp_path / "o.csv", orders_only=True)
    assert report.accepted == read_by_cli
    (other / "propensity.yaml").write_text("events:\n  timestamp_format: '%Q'\n")
    with pytest.raises(ConfigError, match="'%Q' is not usable"):
        load_settings(other / "propensity.yaml")
