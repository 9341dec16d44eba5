"""Ingestion end to end: formats, mapping, dedupe, orders-only, consent, unreadable files."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.events.ingest import IngestError, IngestReport, ingest
from propensity.events.lake import EventLake

NOW = datetime(2024, 6, 1, tzinfo=UTC)
ROWS = [
    {
        "customer_id": "C0000001",
        "event_type": "session_start",
        "event_timestamp": "2024-01-05T10:00:00Z",
    },
    {
        "customer_id": "C0000001",
        "event_type": "purchase",
        "event_timestamp": "2024-01-05T10:05:00Z",
        "price": 12.5,
        "quantity": 2.0,
    },
    {"customer_id": "C0000002", "event_type": "search", "event_timestamp": "2024-02-01T08:00:00Z"},
]


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        ROWS, columns=["customer_id", "event_type", "event_timestamp", "price", "quantity"]
    )


def _write(path: Path, frame: pd.DataFrame) -> Path:
    name = path.name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".csv.gz"):
        frame.to_csv(path, index=False, compression="gzip")
    elif name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(frame.to_json(orient="records", lines=True))
    else:
        path.write_text(frame.to_json(orient="records", lines=True))
    return path


def _adds_up(report: IngestReport) -> bool:
    parts = report.accepted + report.duplicates + report.quarantined + report.consent_removed
    per_file = all(
        c.read == c.accepted + c.duplicates + c.quarantined + c.consent_removed
        for c in report.files.values()
    )
    return report.read == parts and per_file


@pytest.mark.parametrize("name", ["e.csv", "e.csv.gz", "e.parquet", "e.jsonl", "e.jsonl.gz"])
def test_each_format_lands_the_same_events(tmp_path: Path, name: str) -> None:
    source = _write(tmp_path / name, _frame())
    lake = EventLake(tmp_path / "lake")

    report = ingest([source], lake, tmp_path / "q", now=NOW)

    assert (report.read, report.accepted, report.quarantined) == (3, 3, 0)
    stored = lake.read().sort_values("event_timestamp").reset_index(drop=True)
    assert stored["customer_id"].tolist() == ["C0000001", "C0000001", "C0000002"]
    assert stored["event_timestamp"].iloc[1] == pd.Timestamp("2024-01-05 10:05", tz="UTC")
    assert stored["price"].iloc[1] == 12.5
    assert stored["event_id"].str.fullmatch("[0-9a-f]{32}").all()


def test_same_content_in_three_formats_gets_one_id(tmp_path: Path) -> None:
    files = [_write(tmp_path / n, _frame()) for n in ("a.csv", "b.parquet", "c.jsonl")]
    report = ingest(files, tmp_path / "lake", tmp_path / "q", now=NOW)
    assert (report.accepted, report.duplicates) == (3, 6)
    assert [c.accepted for c in report.files.values()] == [3, 0, 0]
    assert _adds_up(report)


def test_reingest_adds_nothing(tmp_path: Path) -> None:
    source = _write(tmp_path / "e.csv", _frame())
    lake = EventLake(tmp_path / "lake")
    ingest([source], lake, tmp_path / "q", now=NOW)
    files = lake.files()

    again = ingest([source], lake, tmp_path / "q", now=NOW)

    assert (again.accepted, again.duplicates) == (0, 3)
    assert lake.files() == files
    assert lake.count() == 3


def test_duplicates_within_a_file(tmp_path: Path) -> None:
    extra = pd.DataFrame(
        [{"customer_id": "C0000009", "event_type": "search", "event_timestamp": "2024-03-01"}]
    )
    frame = pd.concat([_frame(), _frame().iloc[[0]], extra], ignore_index=True)
    frame["event_id"] = ["a", "b", "c", None, "a"]
    source = _write(tmp_path / "e.csv", frame)
    lake = EventLake(tmp_path / "lake")

    report = ingest([source], lake, tmp_path / "q", now=NOW)

    # Row 4 has no id: it gets a content hash (new); row 5 repeats id "a" with
    # other content: a conflict, quarantined, the first version kept.
    assert (report.read, report.accepted, report.duplicates) == (5, 4, 0)
    assert (report.conflicts, report.quarantined) == (1, 1)
    assert _adds_up(report)
    stored = lake.read().set_index("event_id")
    assert stored.loc["a", "customer_id"] == "C0000001"
    record = pq.read_table(report.quarantine_path).to_pylist()[0]
    assert (record["row_number"], record["field"], record["rule"], record["value"]) == (
        5,
        "event_id",
        "conflicting_duplicate",
        "a",
    )
    assert json.loads(record["raw"])["customer_id"] == "C0000009"
    identical = _write(tmp_path / "twice.csv", pd.concat([_frame(), _frame()]))
    report = ingest([identical], tmp_path / "lake2", tmp_path / "q", now=NOW)
    assert (report.accepted, report.duplicates) == (3, 3)


def test_column_mapping(tmp_path: Path) -> None:
    frame = _frame().rename(
        columns={"customer_id": "user", "event_timestamp": "ts", "event_type": "kind"}
    )
    source = _write(tmp_path / "e.parquet", frame)
    lake = EventLake(tmp_path / "lake")
    mapping = {"user": "customer_id", "ts": "event_timestamp", "kind": "event_type"}

    report = ingest([source], lake, tmp_path / "q", mapping=mapping, now=NOW)

    assert report.accepted == 3
    assert sorted(lake.read()["customer_id"].unique()) == ["C0000001", "C0000002"]
    with pytest.raises(IngestError, match=r"e\.parquet.*customer_id.*mapping"):
        ingest([source], lake, tmp_path / "q", now=NOW)


def test_orders_only(tmp_path: Path) -> None:
    orders = pd.DataFrame(
        {
            "client": ["C1", "C1", "C2", "C2", "C3"],
            "order_date": ["2024-01-03", "2024-01-04", "2024-02-01", "2024-02-01", "2024-02-02"],
            "amount": ["30", "10.5", "8", "8", "-4"],
            "quantity": ["3", "", "2", "2", "1"],
        }
    )
    source = _write(tmp_path / "orders.csv", orders)
    lake = EventLake(tmp_path / "lake")

    report = ingest(
        [source], lake, tmp_path / "q", mapping={"client": "customer_id"}, orders_only=True, now=NOW
    )

    assert (report.accepted, report.duplicates, report.quarantined) == (3, 1, 1)
    stored = lake.read().sort_values("event_timestamp").reset_index(drop=True)
    assert (stored["event_type"] == "purchase").all()
    assert stored[["price", "quantity"]].values.tolist() == [[10.0, 3.0], [10.5, 1.0], [4.0, 2.0]]
    assert stored["order_id"].str.fullmatch("O[0-9a-f]{16}").all()
    rejected = pq.read_table(report.quarantine_path).to_pylist()
    assert [(r["row_number"], r["field"], r["rule"]) for r in rejected] == [
        (5, "amount", "negative")
    ]
    again = ingest(
        [source], lake, tmp_path / "q", mapping={"client": "customer_id"}, orders_only=True, now=NOW
    )
    assert again.accepted == 0


#: A retail export's columns (unit prices, quantities) mapped for an orders-only ingest.
_RETAIL_MAPPING = {
    "CustomerID": "customer_id",
    "InvoiceDate": "timestamp",
    "UnitPrice": "price",
    "Quantity": "quantity",
}


def test_orders_only_with_unit_prices(tmp_path: Path) -> None:
    # Retail logs give a unit price and a quantity per line (no amount): price is kept
    # as given, and the order amount (price x quantity) enters the derived order id.
    lines = pd.DataFrame(
        {
            "CustomerID": ["12346.0", "12346.0", "12347.0", "12347.0"],
            "InvoiceDate": ["12/1/2010 8:26", "12/1/2010 8:26", "12/2/2010 9:01", "12/3/2010 9:01"],
            "UnitPrice": ["2.55", "3.39", "abc", "0.85"],
            "Quantity": ["6", "6", "2", "-1"],
        }
    )
    source = _write(tmp_path / "retail.csv", lines)
    mapping = dict(_RETAIL_MAPPING)
    lake = EventLake(tmp_path / "lake")
    report = ingest(
        [source], lake, tmp_path / "q", mapping=mapping, orders_only=True,
        timestamp_format="%m/%d/%Y %H:%M", now=NOW,
    )  # fmt: skip
    assert (report.accepted, report.quarantined) == (2, 2)
    stored = lake.read().sort_values("price").reset_index(drop=True)
    assert stored[["price", "quantity"]].values.tolist() == [[2.55, 6.0], [3.39, 6.0]]
    assert stored["order_id"].nunique() == 2
    rejected = pq.read_table(report.quarantine_path).to_pylist()
    assert [(r["row_number"], r["field"], r["rule"], r["value"]) for r in rejected] == [
        (3, "price", "not_numeric", "abc"),
        (4, "quantity", "not_positive", "-1"),
    ]
    # Without an amount or a unit price, the error names what is missing.
    no_value = _write(tmp_path / "no_value.csv", lines.drop(columns="UnitPrice"))
    del mapping["UnitPrice"]
    with pytest.raises(IngestError, match=r"lacks column\(s\) \['amount'\]"):
        ingest([no_value], lake, tmp_path / "q", mapping=mapping, orders_only=True, now=NOW)


def test_an_excel_workbook_is_read_like_its_csv_export(tmp_path: Path) -> None:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.append([None])  # a blank row above the header
    sheet.append(["CustomerID", "InvoiceDate", "UnitPrice", "Quantity"])
    sheet.append([12346, datetime(2010, 12, 1, 8, 26), 2.55, 6])
    sheet.append([None, None, None, None])  # blank rows are not rows
    sheet.append(["12347", "2010-12-02 09:01", "abc", 2])  # dates typed as text work too
    sheet.append([12348, datetime(2010, 12, 3), 1.25, 4, "stray"])  # beyond the header
    sheet.append([12349, datetime(2010, 12, 3, 10, 0), 0.85, 1])
    book.save(tmp_path / "retail.xlsx")
    mapping = dict(_RETAIL_MAPPING)
    lake = EventLake(tmp_path / "lake")
    report = ingest(
        [tmp_path / "retail.xlsx"], lake, tmp_path / "q", mapping=mapping, orders_only=True,
        now=NOW,
    )  # fmt: skip
    assert (report.read, report.accepted, report.quarantined) == (4, 2, 2)
    stored = lake.read().sort_values("customer_id").reset_index(drop=True)
    assert stored["customer_id"].tolist() == ["12346", "12349"]
    assert stored["price"].tolist() == [2.55, 0.85]
    assert str(stored["event_timestamp"][0]) == "2010-12-01 08:26:00+00:00"
    rejected = pq.read_table(report.quarantine_path).to_pylist()
    assert [(r["row_number"], r["field"], r["rule"]) for r in rejected] == [
        (2, "price", "not_numeric"),
        (3, "(row)", "ragged_row"),
    ]


def test_consent_file_drops_batch_rows_and_erases_stored_events(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    ingest([_write(tmp_path / "old.csv", _frame())], lake, tmp_path / "q", now=NOW)
    new = _frame().assign(
        event_timestamp=lambda f: f["event_timestamp"].str.replace("2024", "2023")
    )
    consent = tmp_path / "consent.csv"
    consent.write_text("customer_id,consent\nC0000001,false\nC0000002,true\n")

    report = ingest(
        [_write(tmp_path / "new.csv", new)], lake, tmp_path / "q", consent_file=consent, now=NOW
    )

    assert (report.read, report.accepted, report.consent_removed) == (3, 1, 2)
    assert report.erased_from_lake == 2
    assert set(lake.read()["customer_id"]) == {"C0000002"}
    assert lake.count() == 2
    assert _adds_up(report)


def test_consent_file_without_consent_column_lists_withdrawals(tmp_path: Path) -> None:
    consent = tmp_path / "withdrawn.parquet"
    pq.write_table(pa.table({"customer_id": ["C0000002"]}), consent)
    report = ingest(
        [_write(tmp_path / "e.csv", _frame())],
        tmp_path / "lake",
        tmp_path / "q",
        consent_file=consent,
        now=NOW,
    )
    assert (report.accepted, report.consent_removed) == (2, 1)


def test_consent_column_withdraws_customer_everywhere(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    ingest([_write(tmp_path / "old.csv", _frame())], lake, tmp_path / "q", now=NOW)
    frame = pd.DataFrame(
        {
            "customer_id": ["C0000002", "C0000002", "C0000003"],
            "event_type": ["search", "not-a-type", "search"],
            "event_timestamp": ["2024-03-01", "2024-03-02", "2024-03-03"],
            "consent": ["yes", "no", "yes"],
        }
    )

    report = ingest([_write(tmp_path / "new.csv", frame)], lake, tmp_path / "q", now=NOW)

    # The invalid row of the withdrawn customer is dropped too, not kept in quarantine.
    assert (report.accepted, report.quarantined, report.consent_removed) == (1, 0, 2)
    assert report.erased_from_lake == 1
    assert set(lake.read()["customer_id"]) == {"C0000001", "C0000003"}


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.parquet", b"this is not parquet", "cannot be read as parquet"),
        ("bad.jsonl.gz", b"not gzip at all", "cannot be read as jsonl"),
        ("bad.csv.gz", b"not gzip at all", "cannot be read as csv"),
        ("cols.csv", b"a,b\n1,2\n", "required column(s) ['customer_id'"),
        ("empty.csv", b"", "empty file"),
        ("bad.xlsx", b"x", "cannot be read as xlsx"),
        ("bad.xls", b"x", "unsupported file type"),
    ],
)
def test_unreadable_file_raises_one_clear_error(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    good = _write(tmp_path / "good.csv", _frame())
    bad = tmp_path / name
    bad.write_bytes(content)
    lake = EventLake(tmp_path / "lake")

    with pytest.raises(IngestError) as info:
        ingest([good, bad], lake, tmp_path / "q", now=NOW)

    message = str(info.value)
    assert name in message and reason in message
    assert "\n" not in message
    assert lake.count() == 0  # nothing stored from a failed run


def test_jsonl_with_mixed_types_quarantines_the_odd_value(tmp_path: Path) -> None:
    lines = [dict(ROWS[1]), dict(ROWS[1], price="twelve", event_timestamp="2024-01-06T00:00:00Z")]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    report = ingest([source], tmp_path / "lake", tmp_path / "q", now=NOW)
    assert (report.accepted, report.quarantined) == (1, 1)
    record = pq.read_table(report.quarantine_path).to_pylist()[0]
    assert (record["row_number"], record["field"], record["rule"], record["value"]) == (
        2,
        "price",
        "not_numeric",
        "twelve",
    )


def test_progress_and_summary(tmp_path: Path) -> None:
    calls: list[tuple[str, float, float]] = []
    source = _write(tmp_path / "e.csv", _frame())
    report = ingest(
        source,
        tmp_path / "lake",
        tmp_path / "q",
        now=NOW,
        progress=lambda d, done, total: calls.append((d, done, total)),
    )
    size = source.stat().st_size
    assert ("ingest e.csv", size, size) in calls
    # Two months touched: January and February.
    assert [c for c in calls if c[0] == "store"] == [
        ("store", 0, 2),
        ("store", 1, 2),
        ("store", 2, 2),
    ]
    text = report.summary()
    assert "total" in text and str(source) in text
    assert report.to_rich().row_count == 2


@pytest.mark.parametrize("name", ["e.csv", "e.parquet", "e.jsonl"])
def test_small_batches_keep_row_numbers_counts_and_dedupe_exact(tmp_path: Path, name: str) -> None:
    frame = pd.concat([_frame(), _frame()], ignore_index=True)
    frame["event_id"] = ["a", "b", "c", "a", "e", "f"]  # row 4 repeats row 1
    frame.loc[1, "event_type"] = "teleport"  # row 2: bad
    frame.loc[5, "price"] = -1.0  # row 6: bad
    source = _write(tmp_path / name, frame)
    lake = EventLake(tmp_path / "lake")

    # Batches of two rows: the repeat and each bad row sit in different batches.
    report = ingest([source], lake, tmp_path / "q", now=NOW, batch_rows=2)

    assert (report.read, report.accepted, report.duplicates, report.quarantined) == (6, 3, 1, 2)
    assert _adds_up(report)
    rejected = pq.read_table(report.quarantine_path).to_pylist()
    assert [(r["row_number"], r["rule"]) for r in rejected] == [
        (2, "unknown_event_type"),
        (6, "negative"),
    ]
    assert sorted(lake.read()["event_id"]) == ["a", "c", "e"]
    again = ingest([source], lake, tmp_path / "q", now=NOW, batch_rows=4)
    assert (again.accepted, again.duplicates, again.quarantined) == (0, 4, 2)
    # The bad rows are counted again, but their records are stored once.
    assert (again.already_quarantined, again.quarantine_path) == (2, None)


def test_consent_value_in_a_later_file_applies_to_earlier_files(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.csv", _frame())
    later = pd.DataFrame(
        {
            "customer_id": ["C0000001"],
            "event_type": ["search"],
            "event_timestamp": ["2024-03-01"],
            "consent": ["no"],
        }
    )
    second = _write(tmp_path / "b.jsonl", later)

    report = ingest([first, second], tmp_path / "lake", tmp_path / "q", now=NOW)

    assert (report.accepted, report.consent_removed) == (1, 3)
    assert [c.consent_removed for c in report.files.values()] == [2, 1]


def test_failed_run_leaves_no_staging_or_quarantine_files(tmp_path: Path) -> None:
    bad_rows = _frame().assign(event_type="teleport")
    files = [_write(tmp_path / "bad.csv", bad_rows), tmp_path / "broken.parquet"]
    files[1].write_bytes(b"not parquet")
    lake = EventLake(tmp_path / "lake")

    with pytest.raises(IngestError, match="broken.parquet"):
        ingest(files, lake, tmp_path / "q", now=NOW)

    assert lake.count() == 0
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
    assert not list(lake.root.rglob("*.parquet"))


@pytest.mark.parametrize(
    ("name", "content", "rule"),
    [
        ("header.csv", b"customer_id,event_type,event_timestamp\n", None),
        ("allbad.csv", b"customer_id,event_type,event_timestamp\nC1,teleport,2024-01-05\n", "x"),
        ("allbad.jsonl", b'{"customer_id": "C1", "event_type": "x", "event_timestamp": 1}\n', "x"),
        ("onlybad.jsonl", b'{"customer_id": \n', "x"),
        ("empty.jsonl", b"", None),
    ],
)
def test_run_without_a_valid_row_completes_and_publishes_its_quarantine(
    tmp_path: Path, name: str, content: bytes, rule: str | None
) -> None:
    source = tmp_path / name
    source.write_bytes(content)
    lake = EventLake(tmp_path / "lake")

    report = ingest([source], lake, tmp_path / "q", now=NOW)

    assert report.accepted == 0 and lake.count() == 0
    assert _adds_up(report)
    assert report.quarantined == (0 if rule is None else 1)
    if rule is not None:
        assert report.quarantine_path is not None
        assert pq.read_table(report.quarantine_path).num_rows == 1


def test_parquet_of_wrong_types_is_quarantined_not_a_crash(tmp_path: Path) -> None:
    source = tmp_path / "typed.parquet"
    pq.write_table(
        pa.table({"customer_id": [1.5, 2.5], "event_type": [1, 2], "event_timestamp": [1.0, 2.0]}),
        source,
    )
    report = ingest([source], tmp_path / "lake", tmp_path / "q", now=NOW)
    assert (report.read, report.accepted, report.quarantined) == (2, 0, 2)
    records = pq.read_table(report.quarantine_path).to_pylist()
    assert [(r["row_number"], r["field"], r["rule"]) for r in records] == [
        (1, "customer_id", "wrong_type"),
        (2, "customer_id", "wrong_type"),
    ]
    assert records[0]["rules"].split(";") == [
        "customer_id:wrong_type",
        "event_timestamp:wrong_type",
        "event_type:unknown_event_type",
    ]


HEAD = "customer_id,event_type,event_timestamp,price\n"


@pytest.mark.parametrize("batch_rows", [1, 2, 1000])
def test_bad_bytes_ragged_rows_and_bad_json_lines_cost_only_their_row(
    tmp_path: Path, batch_rows: int
) -> None:
    csv_source = tmp_path / "e.csv"
    csv_source.write_bytes(
        HEAD.encode()
        + b"C1,search,2024-01-05,\n"
        + b"C\xff2,search,2024-01-05,\n"  # row 2: not UTF-8
        + b"C3,search,2024-01-05,,extra\n"  # row 3: one field too many
        + b"\n"  # a blank line is not a row
        + b"C4,search\n"  # row 4: too few fields
        + b"C5,purchase,2024-01-05,-1\n"  # row 5: negative price
        + b"C6,search,2024-01-06,\n"
    )
    json_source = tmp_path / "e.jsonl"
    line = '{"customer_id": "%s", "event_type": "search", "event_timestamp": "2024-01-05"}\n'
    json_source.write_bytes(
        (line % "J1").encode()
        + b'{"customer_id": "J\xff2", "event_type": "search"}\n'  # row 2: not UTF-8
        + b'{"customer_id": "J3", \n'  # row 3: cut short
        + b"\n"
        + b"[1, 2]\n"  # row 4: not an object
        + (line % "J5").encode()
    )
    lake = EventLake(tmp_path / "lake")

    report = ingest([csv_source, json_source], lake, tmp_path / "q", now=NOW, batch_rows=batch_rows)

    assert sorted(lake.read()["customer_id"]) == ["C1", "C6", "J1", "J5"]
    assert _adds_up(report)
    records = pq.read_table(report.quarantine_path).to_pylist()
    got = sorted(
        (Path(r["source_file"]).name, r["row_number"], r["field"], r["rule"]) for r in records
    )
    assert got == [
        ("e.csv", 2, "customer_id", "not_utf8"),
        ("e.csv", 3, "(row)", "ragged_row"),
        ("e.csv", 4, "(row)", "ragged_row"),
        ("e.csv", 5, "price", "negative"),
        ("e.jsonl", 2, "(row)", "not_utf8"),
        ("e.jsonl", 3, "(row)", "bad_json"),
        ("e.jsonl", 4, "(row)", "bad_json"),
    ]
    values = {(Path(r["source_file"]).name, r["row_number"]): r["value"] for r in records}
    assert values["e.csv", 2] == "C\ufffd2"
    assert values["e.csv", 3] == "C3,search,2024-01-05,,extra"


def test_unknown_mapping_target_is_an_error_listing_valid_targets(tmp_path: Path) -> None:
    source = _write(tmp_path / "e.csv", _frame())
    with pytest.raises(IngestError, match=r"\['customr_id'\].*valid targets: customer_id, "):
        ingest([source], tmp_path / "lake", tmp_path / "q", mapping={"user": "customr_id"})


@pytest.mark.parametrize("name", ["e.csv", "e.parquet", "e.jsonl"])
def test_mapped_source_column_absent_from_a_file_is_an_error(tmp_path: Path, name: str) -> None:
    source = _write(tmp_path / name, _frame())
    lake = EventLake(tmp_path / "lake")
    with pytest.raises(IngestError, match=rf"{name}: mapped column\(s\) \['user'\] not found"):
        ingest([source], lake, tmp_path / "q", mapping={"user": "customer_id"}, now=NOW)
    assert lake.count() == 0


def test_reingest_does_not_duplicate_quarantine_records(tmp_path: Path) -> None:
    frame = _frame()
    frame.loc[1, "price"] = -1.0
    source = _write(tmp_path / "e.csv", frame)
    lake = EventLake(tmp_path / "lake")
    first = ingest([source], lake, tmp_path / "q", now=NOW)
    # The same content under another name is the same source.
    copy = tmp_path / "copy.csv"
    copy.write_bytes(source.read_bytes())

    again = ingest([source, copy], lake, tmp_path / "q", now=NOW)

    assert (first.quarantined, again.quarantined, again.already_quarantined) == (1, 2, 2)
    assert again.quarantine_path is None
    stored = pq.read_table(tmp_path / "q").to_pylist()
    assert [(r["row_number"], r["rule"]) for r in stored] == [(2, "negative")]
    # Other content gets its own records.
    frame.loc[2, "price"] = -2.0
    other = ingest([_write(tmp_path / "e.csv", frame)], lake, tmp_path / "q", now=NOW)
    assert (other.quarantined, other.already_quarantined) == (2, 0)


def test_event_id_reappearing_with_other_content_is_a_conflict(tmp_path: Path) -> None:
    frame = _frame().assign(event_id=["a", "b", "c"])
    lake = EventLake(tmp_path / "lake")
    ingest([_write(tmp_path / "day1.csv", frame)], lake, tmp_path / "q", now=NOW)
    changed = frame.copy()
    changed.loc[0, "event_type"] = "page_view"  # "a" again, other content
    changed.loc[2, "event_id"] = "d"  # new

    report = ingest([_write(tmp_path / "day2.csv", changed)], lake, tmp_path / "q", now=NOW)

    assert (report.accepted, report.duplicates, report.conflicts, report.quarantined) == (
        1,
        1,
        1,
        1,
    )
    assert _adds_up(report)
    assert "conflicts (event_id seen with other content): 1" in report.summary()
    record = pq.read_table(report.quarantine_path).to_pylist()[0]
    assert (record["row_number"], record["rule"], record["value"]) == (
        1,
        "conflicting_duplicate",
        "a",
    )
    assert json.loads(record["raw"])["event_type"] == "page_view"
    stored = lake.read().set_index("event_id")
    assert stored.loc["a", "event_type"] == "session_start"  # the first version stays


def test_unparseable_row_naming_a_withdrawn_customer_is_dropped_not_quarantined(
    tmp_path: Path,
) -> None:
    source = tmp_path / "e.csv"
    source.write_text(HEAD + "C1,search,2024-01-05,\nC9,search,2024-01-05,,x\nC2,search\n")
    consent = tmp_path / "consent.csv"
    consent.write_text("customer_id\nC9\n")
    report = ingest([source], tmp_path / "lake", tmp_path / "q", consent_file=consent, now=NOW)
    assert (report.accepted, report.consent_removed, report.quarantined) == (1, 1, 1)
    records = pq.read_table(report.quarantine_path).to_pylist()
    assert [r["value"] for r in records] == ["C2,search"]
