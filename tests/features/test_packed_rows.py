"""Packed rows: the batch read from them equals Feast's own read, after any mix of writes.

A real Feast repo on the SQLite plugin; every write goes through the plugin
(the bulk writer, Feast's ``write_to_online_store``, erasure) or, as a foreign
writer would, straight into Feast's table with ``sqlite3``.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from feast import Entity, FeatureStore, FeatureView, Field, FileSource
from feast.repo_config import RepoConfig
from feast.types import Float64
from feast.value_type import ValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propensity.features.online import (
    BulkSqliteOnlineStore,
    FeastReader,
    SqliteReader,
    _packed,
    _read,
    entity_key,
    write_many,
)

T0 = datetime(2024, 3, 1, tzinfo=UTC)
NOW = (T0 + timedelta(days=40)).timestamp()
VIEWS = {"alpha": ["a0", "a1", "a2", "a3"], "beta": ["b0", "b1"]}
IDS = [f"C{c:04d}" for c in range(40)]
REFS = [f"{view}:{name}" for view, names in VIEWS.items() for name in names]
TTLS = {"alpha": 10 * 86400.0, "beta": 30 * 86400.0}


def _frame(ids: list[str], values: list[list[float | None]], stamps: list[datetime]) -> pa.Table:
    columns: dict[str, object] = {
        "customer_id": pa.array(ids),
        "event_timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
    }
    names = [n for names in VIEWS.values() for n in names]
    for j, name in enumerate(names):
        columns[name] = pa.array([row[j] for row in values], pa.float64())
    return pa.table(columns)


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    data = tmp_path / "features.parquet"
    pq.write_table(_frame(IDS[:1], [[0.0] * 6], [T0]), data)
    config = RepoConfig(
        project="proj",
        provider="local",
        registry=str(tmp_path / "registry.db"),
        online_store={
            "type": "propensity.features.online.sqlite.BulkSqliteOnlineStore",
            "path": str(tmp_path / "online.db"),
        },
        offline_store={"type": "duckdb"},
        entity_key_serialization_version=3,
        repo_path=tmp_path,
    )
    feast = FeatureStore(config=config)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)
    source = FileSource(path=str(data), timestamp_field="event_timestamp")
    views = [
        FeatureView(
            name=view,
            entities=[customer],
            ttl=timedelta(seconds=TTLS[view]),
            schema=[Field(name=n, dtype=Float64) for n in names],
            source=source,
            online=True,
        )
        for view, names in VIEWS.items()
    ]
    feast.apply([customer, *views])
    return feast


def _path(store: FeatureStore) -> Path:
    return Path(store.config.repo_path) / "online.db"  # type: ignore[arg-type]


def _assert_reads_agree(store: FeatureStore, ids: list[str] = IDS) -> None:
    """The plugin's batch read equals Feast's ``get_online_features``, field by field."""
    assert len(ids) >= _read.GROUPED_ROWS  # a batch, then a few customers one by one
    reader = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS)
    feast = FeastReader(store, REFS, ttls=TTLS)
    for some in (ids, *([c] for c in ids[:4])):
        ours, theirs = reader.read(some, NOW), feast.read(some, NOW)
        for field in ("matrix", "found", "stale", "timestamps"):
            np.testing.assert_array_equal(
                getattr(ours, field), getattr(theirs, field), err_msg=field
            )


def _complete(store: FeatureStore) -> list[str]:
    with sqlite3.connect(_path(store)) as conn:
        return _packed.complete(conn, ["proj_alpha", "proj_beta"])


values = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False))
rows = st.lists(values, min_size=6, max_size=6)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["bulk", "feast", "erase"]),
            st.lists(st.sampled_from(IDS), min_size=1, max_size=25, unique=True),
            st.lists(rows, min_size=25, max_size=25),
            st.lists(st.integers(0, 30), min_size=25, max_size=25),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_batch_read_equals_feasts_after_any_writes(store: FeatureStore, steps: list) -> None:
    for kind, ids, table, days in steps:
        stamps = [T0 + timedelta(days=d) for d in days[: len(ids)]]
        frame = _frame(ids, table[: len(ids)], stamps)
        if kind == "bulk":  # the Arrow bulk writer, both views in one transaction
            write_many(store, {"alpha": frame, "beta": frame}, end=T0 + timedelta(days=31))
        elif kind == "feast":  # Feast's own path into online_write_batch
            alpha = frame.select(["customer_id", "event_timestamp", *VIEWS["alpha"]])
            store.write_to_online_store("alpha", alpha.to_pandas())
        else:
            BulkSqliteOnlineStore.delete_entities(
                _path(store), "proj", [entity_key(c) for c in ids]
            )
        _assert_reads_agree(store)
        assert _complete(store) == ["proj_alpha", "proj_beta"]  # the writes kept the copy


def _seed(store: FeatureStore) -> None:
    table = [[float(i), float(i) + 0.5, None, 1.0, 2.0, float(-i)] for i in range(len(IDS))]
    write_many(store, {"alpha": _frame(IDS, table, [T0] * len(IDS))}, end=T0)
    write_many(store, {"beta": _frame(IDS, table, [T0] * len(IDS))}, end=T0)


def test_the_batch_read_comes_from_the_packed_rows(store: FeatureStore) -> None:
    _seed(store)
    _assert_reads_agree(store)
    # Changed in the packed copy only: the batch read shows it, so it read the copy.
    vals = _packed.columns("proj_alpha")[1]
    blob = b"".join(b"\x29" + np.float64(v).tobytes() for v in (7.25, 0.0, 0.0, 0.0))
    with sqlite3.connect(_path(store)) as conn:
        conn.execute(
            f'UPDATE _packed_proj SET "{vals}" = ? WHERE entity_key = ?', (blob, entity_key(IDS[3]))
        )
    read = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS).read(IDS, NOW)
    assert read.matrix[3, 0] == 7.25


def test_a_foreign_write_turns_the_copy_off_until_it_is_rebuilt(store: FeatureStore) -> None:
    _seed(store)
    # A writer other than the plugin (here sqlite3 itself) changes Feast's rows.
    with sqlite3.connect(_path(store)) as conn:
        conn.execute(
            "UPDATE proj_alpha SET value = ? WHERE entity_key = ? AND feature_name = 'a1'",
            (b"\x29" + np.float64(99.0).tobytes(), entity_key(IDS[5])),
        )
    assert _complete(store) == ["proj_beta"]
    _assert_reads_agree(store)  # read from Feast's rows
    read = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS).read(IDS, NOW)
    assert read.matrix[5, 1] == 99.0
    # The next bulk write rebuilds the copy from Feast's rows and marks it again.
    write_many(store, {"alpha": _frame(IDS[:1], [[1.0] * 6], [T0])}, end=T0)
    assert _complete(store) == ["proj_alpha", "proj_beta"]
    _assert_reads_agree(store)
    with sqlite3.connect(_path(store)) as conn:
        vals = _packed.columns("proj_alpha")[1]
        blob = conn.execute(
            f'SELECT "{vals}" FROM _packed_proj WHERE entity_key = ?', (entity_key(IDS[5]),)
        ).fetchone()[0]
    assert np.frombuffer(blob, dtype=_read.DOUBLE_RECORD)["value"][1] == 99.0


def test_a_table_made_again_by_someone_else_is_not_trusted(store: FeatureStore) -> None:
    _seed(store)
    with sqlite3.connect(_path(store)) as conn:
        ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'proj_beta'").fetchone()[0]
        saved = conn.execute("SELECT * FROM proj_beta").fetchall()
        conn.execute("DROP TABLE proj_beta")  # its triggers go with it
        conn.execute(ddl)
        changed = [(k, n, b"\x29" + np.float64(-3.0).tobytes(), *rest) for k, n, _, *rest in saved]
        conn.executemany(
            f"INSERT INTO proj_beta VALUES ({', '.join('?' * len(saved[0]))})", changed
        )
    assert _complete(store) == ["proj_alpha", "proj_beta"]  # marked, but no triggers now
    _assert_reads_agree(store)
    read = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS).read(IDS, NOW)
    assert (read.matrix[:, 4:] == -3.0).all()
    # The next write finds the triggers gone: it rebuilds the copy from Feast's rows.
    write_many(store, {"beta": _frame(IDS[:1], [[1.0] * 6], [T0])}, end=T0)
    _assert_reads_agree(store)
    read = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS).read(IDS, NOW)
    assert (read.matrix[1:, 4:] == -3.0).all() and (read.matrix[0, 4:] == 1.0).all()


def test_customers_with_different_feature_rows_read_row_by_row(store: FeatureStore) -> None:
    _seed(store)
    # A retired feature's row for one customer, and another's rows of two timestamps.
    pushed = pd.DataFrame(
        {"customer_id": [IDS[2]], "event_timestamp": [T0 + timedelta(days=20)], "a0": [5.0]}
    )
    for name in VIEWS["alpha"][1:]:
        pushed[name] = None
    store.write_to_online_store("alpha", pushed)
    with sqlite3.connect(_path(store)) as conn:
        row = conn.execute(
            "SELECT value, event_ts FROM proj_alpha WHERE entity_key = ? AND feature_name = 'a0'",
            (entity_key(IDS[7]),),
        ).fetchone()
    conn = sqlite3.connect(_path(store), isolation_level=None)
    try:  # through the plugin's own statements, so the copy stays complete
        conn.execute("BEGIN IMMEDIATE")
        kept = _packed.complete(conn, ["proj_alpha"])
        conn.execute(
            "INSERT INTO proj_alpha (entity_key, feature_name, value, event_ts) "
            "VALUES (?, 'a_retired', ?, ?)",
            (entity_key(IDS[7]), row[0], row[1]),
        )
        conn.execute(
            "UPDATE proj_alpha SET event_ts = event_ts - 86400 WHERE entity_key = ? "
            "AND feature_name = 'a3'",
            (entity_key(IDS[9]),),
        )
        keys = _packed.stage_keys(conn, [entity_key(IDS[7]), entity_key(IDS[9])])
        _packed.refresh(conn, "proj", "proj_alpha", keys)
        _packed.keep_complete(conn, kept)
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert _complete(store) == ["proj_alpha", "proj_beta"]
    _assert_reads_agree(store)
    read = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS).read(IDS, NOW)
    assert read.timestamps[9] == read.timestamps[0] - 86400
    assert read.matrix[2, 0] == 5.0


def test_erasure_removes_packed_rows_and_keeps_the_copy(store: FeatureStore) -> None:
    _seed(store)
    gone = [entity_key(c) for c in IDS[:3]]
    BulkSqliteOnlineStore.delete_entities(_path(store), "proj", gone)
    assert _complete(store) == ["proj_alpha", "proj_beta"]
    with sqlite3.connect(_path(store)) as conn:
        left = conn.execute("SELECT count(*) FROM _packed_proj").fetchone()[0]
    assert left == len(IDS) - 3
    data = _path(store).read_bytes()
    assert not any(k in data for k in gone)
    read = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS).read(IDS, NOW)
    assert not read.found[:3].any() and read.found[3:].all()
    _assert_reads_agree(store)


_WRITER = """
import sys
import pyarrow.parquet as pq
from feast import FeatureStore
from propensity.features.online import write_many

store = FeatureStore(repo_path=sys.argv[1])
frame = pq.read_table(sys.argv[2])
write_many(store, {"alpha": frame, "beta": frame}, end=frame["event_timestamp"][0].as_py(),
           chunk_rows=1, progress=lambda n: print(n, flush=True))
"""


def test_a_writer_killed_mid_write_leaves_the_copy_equal_to_feasts_rows(
    store: FeatureStore, tmp_path: Path
) -> None:
    _seed(store)
    # The same repo as a folder a child process can open.
    config = {
        "project": "proj",
        "provider": "local",
        "registry": str(tmp_path / "registry.db"),
        "online_store": {
            "type": "propensity.features.online.sqlite.BulkSqliteOnlineStore",
            "path": str(_path(store)),
        },
        "offline_store": {"type": "duckdb"},
        "entity_key_serialization_version": 3,
    }
    (tmp_path / "feature_store.yaml").write_text(yaml.safe_dump(config))
    table = [[100.0 + i] * 6 for i in range(len(IDS))]
    later = T0 + timedelta(days=5)
    pq.write_table(_frame(IDS, table, [later] * len(IDS)), tmp_path / "update.parquet")
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path), str(tmp_path / "update.parquet")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(5):  # five transactions (a customer each) committed, then killed
            assert child.stdout is not None and child.stdout.readline()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert _complete(store) == ["proj_alpha", "proj_beta"]
    _assert_reads_agree(store)  # the packed copy holds what Feast's rows hold, no more
    read = SqliteReader(_path(store), REFS, project="proj", ttls=TTLS).read(IDS, NOW)
    written = read.matrix[:, 0] >= 100.0
    assert 5 <= written.sum() < len(IDS)  # the kill landed mid-write
    # Each customer all new or all old, across both views.
    assert (written == (read.matrix[:, 4] >= 100.0)).all()
