"""Erasure: a forgotten customer is gone from the lake, the feature tables, the online
stores (SQLite and Redis, read back through Feast) and raw copies; nobody else changed."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from jobs_project import Periods, drop, make_project

from propensity.config import OnlineStore, Settings
from propensity.events.lake import EventLake
from propensity.features.definitions import VIEWS
from propensity.features.online_writer import write_online_many
from propensity.features.snapshots import build_features, feature_table_path
from propensity.features.store import FeatureStoreAdapter
from propensity.jobs.erasure import AUDIT_FILE, _entity_key, forget, id_hash
from propensity.jobs.lock import job_dir
from propensity.jobs.retrain import RetrainPolicy, retrain

pytestmark = pytest.mark.slow
N_CUSTOMERS = 300


def _online_rows(settings: Settings) -> pd.DataFrame:
    con = sqlite3.connect(settings.path(settings.online_store.sqlite_path))
    try:
        frames = [
            pd.read_sql(f'SELECT "{t}" AS tbl, entity_key, feature_name, value FROM "{t}"', con)
            for (t,) in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'propensity_%'"
            )
        ]
    finally:
        con.close()
    return pd.concat(frames, ignore_index=True)


def _feature_tables(settings: Settings) -> dict[str, pd.DataFrame]:
    folder = settings.path(settings.features_dir)
    return {v: pq.read_table(feature_table_path(folder, v)).to_pandas() for v in VIEWS}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, periods: Periods) -> dict:
    settings = make_project(tmp_path_factory.mktemp("erasure") / "project")
    events = periods.first
    ids = pa.array(sorted(set(events["customer_id"].to_pylist()))[:N_CUSTOMERS])
    small = events.filter(pc.is_in(events["customer_id"], value_set=ids))
    EventLake(settings.path(settings.lake_dir)).append(small)
    build_features(settings)
    adapter = FeatureStoreAdapter(settings)
    adapter.apply()
    write_online_many(adapter.store, list(VIEWS), end=adapter.latest_snapshot().to_pydatetime())
    return {"settings": settings, "events": small, "ids": ids.to_pylist()}


def test_entity_key_matches_feast():
    from feast.value_type import ValueType

    from propensity.features.online_writer import encode_entity_keys

    expected = encode_entity_keys(
        {"customer_id": pa.array(["C0000042"])}, {"customer_id": ValueType.STRING}
    )
    assert [_entity_key("C0000042")] == expected


def test_forget_removes_everywhere_and_nothing_else(store):
    settings: Settings = store["settings"]
    gone = store["ids"][:2]
    lake = EventLake(settings.path(settings.lake_dir))
    events_before = lake.read()
    tables_before = _feature_tables(settings)
    online_before = _online_rows(settings)
    gone_keys = {_entity_key(c) for c in gone}
    assert online_before["entity_key"].isin(gone_keys).any()
    # A quarantine file holding one of their raw rows, and an ingested landing copy.
    quarantine = settings.path(settings.quarantine_dir)
    quarantine.mkdir(parents=True, exist_ok=True)
    raw = [json.dumps({"customer_id": gone[0], "event_type": "bogus"}), json.dumps({"x": 1})]
    pq.write_table(
        pa.table({"rule": ["event_type", "missing"], "raw": raw}), quarantine / "q.parquet"
    )
    processed = settings.path(settings.landing_dir) / "processed"
    processed.mkdir(parents=True)
    mine = store["events"].filter(pc.equal(store["events"]["customer_id"], gone[1]))
    pq.write_table(mine, processed / "old.parquet")

    report = forget(settings, [*gone, "C9999999"], actor="dpo@example.org")

    # Gone from the lake...
    after = lake.read()
    assert not after["customer_id"].isin(gone).any()
    assert report.lake_events == int(events_before["customer_id"].isin(gone).sum()) > 0
    # ...and nobody else's events changed.
    others = events_before[~events_before["customer_id"].isin(gone)]
    key = ["event_id"]
    pd.testing.assert_frame_equal(
        others.sort_values(key).reset_index(drop=True),
        after.sort_values(key).reset_index(drop=True),
    )
    # Feature tables: their rows gone, the rest identical.
    for view, table in _feature_tables(settings).items():
        old = tables_before[view]
        assert not table["customer_id"].isin(gone).any()
        pd.testing.assert_frame_equal(
            old[~old["customer_id"].isin(gone)].reset_index(drop=True), table.reset_index(drop=True)
        )
        assert report.feature_rows[view] == int(old["customer_id"].isin(gone).sum())
    # Online store: their rows gone, every other row byte-identical.
    online_after = _online_rows(settings)
    assert not online_after["entity_key"].isin(gone_keys).any()
    kept = online_before[~online_before["entity_key"].isin(gone_keys)]
    cols = ["tbl", "entity_key", "feature_name"]
    pd.testing.assert_frame_equal(
        kept.sort_values(cols).reset_index(drop=True),
        online_after.sort_values(cols).reset_index(drop=True),
    )
    assert report.online_sqlite_rows == len(online_before) - len(online_after)
    # Feast itself finds nothing online for them, and still finds the others.
    adapter = FeatureStoreAdapter(settings)
    online = adapter.online([*gone, store["ids"][5]], "churn_v1")
    assert online.iloc[:2]["sessions_7d"].isna().all()
    assert online.iloc[2]["sessions_7d"] == online.iloc[2]["sessions_7d"]  # not NaN
    # Raw copies.
    assert report.quarantine_rows == 1
    assert pq.read_table(quarantine / "q.parquet")["raw"].to_pylist() == raw[1:]
    assert report.landing_files == 1 and not (processed / "old.parquet").exists()
    # Audit: counts and id hashes, never the ids themselves.
    text = (job_dir(settings) / AUDIT_FILE).read_text()
    record = json.loads(text.splitlines()[-1])
    assert record["actor"] == "dpo@example.org"
    assert sorted(record["id_sha256"]) == sorted(id_hash(c) for c in [*gone, "C9999999"])
    assert record["counts"]["lake_events"] == report.lake_events
    assert not any(c in text for c in gone)


def test_forgotten_customer_is_not_ingested_back(store):
    settings: Settings = store["settings"]
    gone = store["ids"][0]
    assert id_hash(gone) in (job_dir(settings) / AUDIT_FILE).read_text()
    late = store["events"].filter(pc.equal(store["events"]["customer_id"], gone))
    drop(settings, late, "late.parquet")
    result = retrain(settings, policy=RetrainPolicy(models=(), min_new_rows=10**9))
    assert result.status == "refreshed" and result.ingested_files == ["late.parquet"]
    assert result.suppressed_events == late.num_rows > 0
    lake = EventLake(settings.path(settings.lake_dir)).read(["customer_id"])
    assert gone not in set(lake["customer_id"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_forget_removes_redis_rows(store, tmp_path: Path):
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        base: Settings = store["settings"]
        settings = base.model_copy(
            update={
                "online_store": OnlineStore(kind="redis", redis_url=f"redis://127.0.0.1:{port}/0")
            }
        )
        adapter = FeatureStoreAdapter(settings)
        deadline = time.monotonic() + 10
        while True:
            try:
                write_online_many(
                    adapter.store, list(VIEWS), end=adapter.latest_snapshot().to_pydatetime()
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        victim, other = store["ids"][10], store["ids"][11]
        before = adapter.online([victim, other], "churn_v1")
        assert before["sessions_7d"].notna().all()
        report = forget(settings, [victim])
        assert report.online_redis_keys == 1
        after = adapter.online([victim, other], "churn_v1")
        assert pd.isna(after.loc[0, "sessions_7d"])
        pd.testing.assert_series_equal(before.iloc[1], after.iloc[1], check_names=False)
    finally:
        server.terminate()
        server.wait(timeout=10)
