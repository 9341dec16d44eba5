"""The event lake: manifest commits, dedupe on append, erasure, crash safety."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.events.lake import MANIFEST_NAME, EmptyLakeError, EventLake
from propensity.events.schema import ARROW_SCHEMA

_NULLABLE = pa.schema([pa.field(f.name, f.type) for f in ARROW_SCHEMA])


def make_events(n: int, *, seed: int = 0, start: str = "2024-01-01", prefix: str = "E") -> pa.Table:
    """``n`` canonical page views of 20 customers spread over about three months."""
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.integers(0, 90 * 86_400, n)).astype("timedelta64[s]")
    stamps = pd.to_datetime(np.datetime64(start) + offsets).tz_localize("UTC")
    columns = {f.name: pa.nulls(n, f.type) for f in ARROW_SCHEMA}
    columns.update(
        customer_id=pa.array([f"C{i:07d}" for i in rng.integers(0, 20, n)]),
        event_id=pa.array([f"{prefix}{i}" for i in range(n)]),
        event_timestamp=pa.array(stamps, pa.timestamp("us", tz="UTC")),
        event_type=pa.array(["page_view"] * n),
        price=pa.array(rng.random(n)),
    )
    return pa.table(columns).cast(_NULLABLE)


def test_append_commits_partitioned_files_and_reads_back(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    events = make_events(300)

    assert lake.append(events) == 300

    assert {p.parent.name for p in lake.files()} == {
        "event_month=2024-01",
        "event_month=2024-02",
        "event_month=2024-03",
    }
    assert lake.count() == 300
    back = lake.read().sort_values("event_id", key=lambda s: s.str[1:].astype(int))
    expected = events.to_pandas()
    pd.testing.assert_frame_equal(back.reset_index(drop=True), expected)
    assert lake.max_timestamp() == expected["event_timestamp"].max()
    for path in lake.files():
        month = path.parent.name.split("=")[1]
        stamps = pq.read_table(path, columns=["event_timestamp"]).column(0).to_pandas()
        assert (stamps.dt.strftime("%Y-%m") == month).all()


def test_append_skips_stored_and_repeated_event_ids(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    events = make_events(100)
    lake.append(events.slice(0, 60))

    doubled = pa.concat_tables([events, events.slice(90, 10)])
    assert lake.append(doubled) == 40
    assert lake.append(events) == 0
    assert lake.count() == 100
    assert lake.read(["event_id"])["event_id"].is_unique


def test_first_row_of_a_repeated_event_id_wins(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    events = make_events(2)
    events = events.set_column(1, "event_id", pa.array(["same", "same"]))

    added = lake.append_new(events)

    assert added.num_rows == 1
    assert lake.read()["price"].tolist() == [events.column("price")[0].as_py()]


def test_empty_lake(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "missing")
    assert lake.files() == []
    assert lake.count() == 0
    assert lake.max_timestamp() is None
    assert list(lake.read(["customer_id", "price"]).columns) == ["customer_id", "price"]
    with pytest.raises(EmptyLakeError, match="empty"):
        lake.duckdb_scan()


def test_duckdb_scan_reads_committed_rows_only(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    lake.append(make_events(50))
    # An orphan part file (a killed writer's leftover) must stay invisible.
    orphan = lake.files()[0].parent / "part-orphan.parquet"
    pq.write_table(make_events(7, prefix="X"), orphan)

    count = duckdb.sql(f"SELECT count(*) FROM {lake.duckdb_scan()}").fetchall()[0][0]

    assert count == 50
    assert len(lake.read()) == 50
    lake.append(make_events(5, prefix="N"))
    assert not orphan.exists()
    assert lake.count() == 55


def test_erase_customers_rewrites_only_affected_files(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    lake.append(make_events(200, start="2024-01-01"))
    later = make_events(30, seed=1, start="2024-06-01", prefix="L")
    later = later.set_column(0, "customer_id", pa.array(["C9999999"] * 30))
    lake.append(later)
    untouched = [p for p in lake.files() if p.parent.name >= "event_month=2024-06"]
    victim = lake.read(["customer_id"])["customer_id"].iloc[0]
    expected = int((lake.read(["customer_id"])["customer_id"] == victim).sum())

    removed = lake.erase_customers([victim, "C-unknown"])

    assert removed == expected > 0
    assert lake.count() == 230 - expected
    remaining = lake.read(["customer_id"])["customer_id"]
    assert victim not in set(remaining)
    assert len(remaining) == lake.count()
    assert all(p in lake.files() for p in untouched)
    on_disk = sorted(tmp_path.glob("lake/event_month=*/*.parquet"))
    assert on_disk == sorted(lake.files())
    assert lake.erase_customers([victim]) == 0


def test_manifest_lists_rows_and_time_range(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    lake.append(make_events(40))
    manifest = json.loads((tmp_path / "lake" / MANIFEST_NAME).read_text())
    assert sum(entry["rows"] for entry in manifest["files"]) == 40
    assert all(entry["min_timestamp"] <= entry["max_timestamp"] for entry in manifest["files"])
    assert not list((tmp_path / "lake").glob("*.tmp"))


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from propensity.events.ingest import ingest
    from propensity.events.lake import EventLake
    if sys.argv[4:] == ["--die-before-commit"]:
        # The process dies (SIGKILL, no clean-up) after the part files were moved into
        # the lake and before the manifest commit: the worst moment for a crash.
        def die(self, files):
            os.kill(os.getpid(), signal.SIGKILL)
        EventLake._commit = die
    report = ingest([sys.argv[1]], sys.argv[2], sys.argv[3])
    print(report.accepted)
    """
)


def test_killed_ingest_leaves_lake_unchanged_and_next_ingest_completes(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    lake.append(make_events(500, prefix="OLD"))
    before_files = lake.files()
    before = lake.read().sort_values("event_id").reset_index(drop=True)
    source = tmp_path / "new.parquet"
    pq.write_table(make_events(20_000, seed=3, start="2024-02-15", prefix="NEW"), source)
    argv = [sys.executable, "-c", _WRITER, str(source), str(lake.root), str(tmp_path / "q")]
    killed = subprocess.run([*argv, "--die-before-commit"], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    # The writer died with its new part files in the month folders, uncommitted.
    assert set(lake.root.glob("event_month=*/*.parquet")) - set(before_files)

    assert lake.files() == before_files
    assert lake.count() == 500
    after = lake.read().sort_values("event_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)

    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.strip() == "20000"
    assert lake.count() == 20_500
    on_disk = set(lake.root.glob("event_month=*/*.parquet"))
    assert on_disk == set(lake.files())


def test_append_reads_only_the_months_it_touches(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    lake.append(make_events(300))
    # Spoil the committed March file: an append of January rows must not read it.
    march = next(p for p in lake.files() if p.parent.name == "event_month=2024-03")
    march.write_bytes(b"spoiled")
    events = make_events(300)
    january = events.filter(pa.compute.less(pa.compute.month(events.column("event_timestamp")), 2))
    fresh = january.slice(0, 5).set_column(1, "event_id", pa.array([f"NEW{i}" for i in range(5)]))

    assert lake.append(january) == 0
    assert lake.append(pa.concat_tables([january, fresh])) == 5


def test_staged_append_in_batches_dedupes_across_batches(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    events = make_events(100)
    lake.append(events.slice(0, 30))
    tagged = events.append_column("tag", pa.array(range(100), pa.int32()))

    with lake.staged_append() as stage:
        stage.write(tagged.slice(0, 50))
        stage.write(tagged.slice(40, 60))  # rows 40-49 repeat the first batch
        with pytest.raises(ValueError, match="extra columns"):
            stage.write(events.slice(0, 1))
        added = stage.commit(returning=["tag"])
        with pytest.raises(RuntimeError, match="committed"):
            stage.write(tagged)

    assert sorted(added.column("tag").to_pylist()) == list(range(30, 100))
    assert lake.count() == 100
    assert "tag" not in pq.read_schema(lake.files()[-1]).names
    assert not list(lake.root.glob("_staging/*"))


def test_staged_append_left_without_commit_stores_nothing(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    with lake.staged_append() as stage:
        stage.write(make_events(50))
    assert lake.count() == 0
    assert not list(lake.root.rglob("*.parquet"))


def test_commit_of_nothing_staged_returns_the_columns_asked_for(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    lake.append(make_events(5))
    files = lake.files()
    with lake.staged_append() as stage:
        added = stage.commit(returning=["__file__"])
    assert added.num_rows == 0 and added.column_names == ["__file__"]
    assert stage.conflicts is not None and stage.conflicts.num_rows == 0
    assert lake.files() == files


def test_event_id_staged_again_with_other_content_is_a_conflict(tmp_path: Path) -> None:
    lake = EventLake(tmp_path / "lake")
    events = make_events(4)
    lake.append(events)
    changed = events.set_column(
        events.schema.get_field_index("price"), "price", pa.array([0.5, 9.0, 9.0, 9.0])
    ).slice(0, 2)
    resent = pa.concat_tables([events.slice(2, 1), changed, make_events(1, prefix="N")])
    with lake.staged_append() as stage:
        stage.write(resent.append_column("tag", pa.array([1, 2, 3, 4])))
        added = stage.commit()
    assert added.column("event_id").to_pylist() == ["N0"]
    assert stage.conflicts is not None
    # E2 is the same event again; E0 and E1 carry another price: conflicts.
    assert sorted(stage.conflicts.column("event_id").to_pylist()) == ["E0", "E1"]
    assert sorted(stage.conflicts.column("tag").to_pylist()) == [2, 3]
    assert lake.read_table().sort_by("event_id").column("price")[0] == events.column("price")[0]
