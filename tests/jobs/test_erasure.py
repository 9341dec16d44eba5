"""Erasure: a forgotten customer is gone from the lake, the feature tables, the online
stores (SQLite and Redis, read back through Feast) and raw copies; nobody else changed;
no file of the project holds the id afterwards; no ingest brings the customer back."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from jobs_project import Periods, drop, free_port, make_project

from propensity.config import OnlineStore, Settings
from propensity.events.ingest import IngestError, ingest
from propensity.events.lake import EventLake
from propensity.events.suppression import KEY_FILE, Screen, SuppressionList
from propensity.features.definitions import VIEWS
from propensity.features.online import entity_key, write_many
from propensity.features.snapshots import build_features, feature_table_path
from propensity.features.store import FeatureStoreAdapter
from propensity.jobs.erasure import AUDIT_FILE, check_ids, forget
from propensity.jobs.erasure_scan import find_traces
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
    write_many(adapter.store, list(VIEWS), end=adapter.latest_snapshot().to_pydatetime())
    return {"settings": settings, "events": small, "ids": ids.to_pylist()}


def test_entity_key_matches_feast():
    from feast.value_type import ValueType

    from propensity.features.online._codec import encode_entity_keys

    expected = encode_entity_keys(
        {"customer_id": pa.array(["C0000042"])}, {"customer_id": ValueType.STRING}
    )
    assert [entity_key("C0000042")] == expected


def test_forget_removes_everywhere_and_nothing_else(store):
    settings: Settings = store["settings"]
    # Not C0000001: the Feast entity's description quotes it as an example id.
    gone = store["ids"][1:3]
    lake = EventLake(settings.path(settings.lake_dir))
    events_before = lake.read()
    tables_before = _feature_tables(settings)
    online_before = _online_rows(settings)
    gone_keys = {entity_key(c) for c in gone}
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
    assert report.landing_files == 1 and report.landing_rows == mine.num_rows
    assert pq.read_table(processed / "old.parquet").num_rows == 0
    # Audit: counts and keyed id hashes, never the ids themselves.
    text = (job_dir(settings) / AUDIT_FILE).read_text()
    record = json.loads(text.splitlines()[-1])
    assert record["actor"] == "dpo@example.org" and record["status"] == "done"
    keyed = SuppressionList(job_dir(settings)).keyed_hashes([*gone, "C9999999"])
    assert sorted(record["id_hmac"]) == sorted(keyed)
    assert record["counts"]["lake_events"] == report.lake_events
    assert not any(c in text for c in gone)
    assert report.traces == []


def test_forgotten_customer_is_not_ingested_back(store):
    settings: Settings = store["settings"]
    gone = store["ids"][1]
    assert SuppressionList(job_dir(settings)).matching([gone]) == {gone}
    events = store["events"]
    late = events.filter(pc.is_in(events["customer_id"], value_set=pa.array(store["ids"][:5])))
    drop(settings, late, "late.parquet")
    result = retrain(settings, policy=RetrainPolicy(models=(), min_new_rows=10**9))
    assert result.status == "refreshed" and result.ingested_files == ["late.parquet"]
    mine = int(pc.sum(pc.is_in(late["customer_id"], value_set=pa.array(store["ids"][1:3]))).as_py())
    assert result.ingest is not None and result.ingest.suppressed == mine > 0
    assert result.suppressed_events == mine
    lake = EventLake(settings.path(settings.lake_dir)).read(["customer_id"])
    assert gone not in set(lake["customer_id"])
    # The processed raw copy lost the erased rows and kept everyone else's.
    copy = pq.read_table(settings.path(settings.landing_dir) / "processed" / "late.parquet")
    assert copy.num_rows == late.num_rows - mine
    assert not find_traces(settings, store["ids"][1:3])


def test_an_ingest_that_passes_no_list_still_applies_the_lakes(store, tmp_path):
    # A notebook or script calling ingest() directly, without the project's list.
    settings: Settings = store["settings"]
    gone = store["ids"][1]
    forget(settings, [gone])  # erased before (a no-op then), so this test also runs alone
    events = store["events"]
    mine = events.filter(pc.equal(events["customer_id"], gone))
    path = tmp_path / "export.parquet"
    pq.write_table(mine, path)
    report = ingest([path], EventLake(settings.path(settings.lake_dir)), tmp_path / "q")
    assert report.accepted == 0 and report.suppressed == mine.num_rows > 0
    lake = EventLake(settings.path(settings.lake_dir)).read(["customer_id"])
    assert gone not in set(lake["customer_id"])
    # A lake whose bound list went missing refuses to ingest rather than let them back.
    lake_root = tmp_path / "moved-lake"
    shutil.copytree(settings.path(settings.lake_dir), lake_root)
    with pytest.raises(IngestError, match="suppression list folder .* is missing"):
        ingest([path], EventLake(lake_root), tmp_path / "q")


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_forget_removes_redis_rows(store, tmp_path: Path):
    port = free_port()
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
                write_many(
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


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    return subprocess.run(
        [sys.executable, "-m", "propensity.cli", *args],
        cwd=settings.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _csv(table: pa.Table, path: Path) -> Path:
    frame = table.to_pandas()
    frame["event_timestamp"] = frame["event_timestamp"].map(lambda t: t.isoformat())
    frame.to_csv(path, index=False)
    return path


def test_forget_leaves_no_trace_and_reingest_cannot_bring_back(store, tmp_path, caplog):
    settings: Settings = store["settings"]
    victim, neighbour = store["ids"][20], store["ids"][21]
    events: pa.Table = store["events"]
    both = events.filter(pc.is_in(events["customer_id"], value_set=pa.array([victim, neighbour])))
    # The original export, kept outside the project: ingested again after the erasure.
    original = _csv(both, tmp_path / "export.csv")
    bad = tmp_path / "bad.jsonl"  # rows that would be quarantined, one with a padded id
    bad.write_text(
        json.dumps({"customer_id": victim, "event_type": "nope", "event_timestamp": "2026-01-02"})
        + "\n"
        + json.dumps(
            {"customer_id": f" {victim}", "event_type": "search", "event_timestamp": "2026-01-02"}
        )
        + "\n"
    )
    quarantine = settings.path(settings.quarantine_dir)
    (quarantine / "files").mkdir(parents=True, exist_ok=True)
    # Every other place an id lands: a quarantine record, a whole corrupt file moved
    # aside with its reason, a processed landing copy (CSV, gzipped), the temporary
    # files of a killed ingest in the quarantine folder and the lake's staging area.
    pq.write_table(
        pa.table({"rule": ["event_type"], "raw": [json.dumps({"customer_id": victim})]}),
        quarantine / "quarantine-old.parquet",
    )
    (quarantine / "files" / "broken.csv").write_text(f"customer_id,x\n{victim},1\n{neighbour},2\n")
    (quarantine / "files" / "broken.csv.reason.txt").write_text(f"row 2: {victim} is odd\n")
    processed = settings.path(settings.landing_dir) / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    (processed / "old.csv.gz").write_bytes(gzip.compress(original.read_bytes()))
    tmp = quarantine / ".quarantine-0123.parquet.tmp"
    pq.write_table(both.slice(0, 5), tmp, compression="none")
    os.utime(tmp, (time.time() - 3600, time.time() - 3600))
    staged = settings.path(settings.lake_dir) / "_staging" / "dead"
    staged.mkdir(parents=True)
    pq.write_table(both, staged / "part.parquet")
    db = settings.path(settings.online_store.sqlite_path)
    key = entity_key(victim)
    wal = Path(f"{db}-wal")
    assert key in db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    before = find_traces(settings, [victim])
    assert {t.path for t in before} >= {tmp, staged / "part.parquet", db}

    # A reader keeps the store open (as the scoring service does), so the WAL
    # outlives the erasing connection and is not folded back when it closes.
    reader = sqlite3.connect(db)
    reader.execute("SELECT count(*) FROM sqlite_master").fetchall()

    caplog.set_level(logging.DEBUG)
    report = forget(settings, [victim], actor="dpo", scan=False)
    # The online store's main file alone, copied right away without its WAL (the
    # audit scan below checkpoints SQLite files itself), holds no trace.
    copy = tmp_path / "copy.db"
    shutil.copyfile(db, copy)
    assert key not in copy.read_bytes() and victim.encode() not in copy.read_bytes()

    assert find_traces(settings, [victim]) == []
    assert report.temp_files == 1 and not tmp.exists()
    assert report.quarantine_rows == 3  # the record, the CSV line, the reason line
    assert f"{neighbour},2" in (quarantine / "files" / "broken.csv").read_text()
    kept = gzip.decompress((processed / "old.csv.gz").read_bytes()).decode()
    assert neighbour in kept and victim not in kept
    con = sqlite3.connect(copy)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    reader.close()
    # The key never reaches the logs.
    secret = (job_dir(settings) / KEY_FILE).read_text().strip()
    assert secret not in caplog.text and secret not in report.summary()

    # The scan alone, from the command line: nothing left (exit 0).
    checked = _cli(settings, "forget", "--check", victim)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no file holds the id" in checked.stdout

    # Re-ingest the original export and the bad rows, through the CLI and ingest().
    again = _cli(settings, "ingest", str(original), str(bad))
    assert again.returncode == 0, again.stdout + again.stderr
    lake = EventLake(settings.path(settings.lake_dir))
    report2 = ingest(
        [original, bad],
        lake,
        quarantine,
        suppression=SuppressionList(job_dir(settings)),
    )
    mine = int(pc.sum(pc.equal(both["customer_id"], victim)).as_py())
    assert report2.suppressed == mine + 2  # the padded row is dropped, not quarantined
    assert report2.read == (
        report2.accepted + report2.duplicates + report2.quarantined + report2.consent_removed
    )
    assert victim not in set(lake.read(["customer_id"])["customer_id"])
    assert neighbour in set(lake.read(["customer_id"])["customer_id"])
    build_features(settings)
    for table in _feature_tables(settings).values():
        assert victim not in set(table["customer_id"])
    assert find_traces(settings, [victim]) == []


def test_padded_ids_are_erased_exactly_as_given(tmp_path):
    settings = Settings(root=tmp_path)
    lake = EventLake(settings.path(settings.lake_dir))
    base = {
        "event_type": ["search"] * 3,
        "event_timestamp": pa.array([pd.Timestamp("2026-01-01", tz="UTC")] * 3),
    }
    from propensity.events.schema import ARROW_SCHEMA

    rows = {f.name: pa.nulls(3, f.type) for f in ARROW_SCHEMA}
    rows.update(
        event_id=pa.array(["e1", "e2", "e3"]),
        customer_id=pa.array(["C0000005", " C0000005", "C0000006"]),
        **base,
    )
    lake.append(pa.table({f.name: pa.array(rows[f.name]).cast(f.type) for f in ARROW_SCHEMA}))
    with pytest.raises(ValueError, match="whitespace"):
        check_ids(["   "])
    report = forget(settings, [" C0000005"])
    assert report.lake_events == 1 and len(report.warnings) == 1
    assert "surrounding whitespace" in report.summary()
    left = sorted(lake.read(["customer_id"])["customer_id"])
    assert left == ["C0000005", "C0000006"]  # the unpadded customer is someone else
    blank = _cli(settings, "forget", " ")
    assert blank.returncode == 2 and "Traceback" not in blank.stderr
    assert "whitespace" in blank.stdout + blank.stderr


def test_audit_hashes_are_keyed_and_old_files_migrate(tmp_path):
    one, two = SuppressionList(tmp_path / "a"), SuppressionList(tmp_path / "b")
    one.add(["C0000042"], {"actor": "x"})
    two.add(["C0000042"], {"actor": "x"})
    assert one.keyed_hashes(["C0000042"]) != two.keyed_hashes(["C0000042"])
    plain = hashlib.sha256(b"C0000042").hexdigest()
    for folder in (one, two):
        assert plain not in folder.audit_path.read_text()
        assert stat.S_IMODE(folder.key_path.stat().st_mode) == 0o600
        assert "C0000042" not in folder.audit_path.read_text()
    # Keyed hashes of the SHA-256 digest: RFC 2104 HMAC, checked with the standard library.
    import hmac

    key = bytes.fromhex(one.key_path.read_text())
    digest = hashlib.sha256(b"C0000042").digest()
    assert one.keyed_hashes(["C0000042"]) == [hmac.new(key, digest, "sha256").hexdigest()]
    # An audit file of an older release, plain digests only: still suppresses...
    old = SuppressionList(tmp_path / "old")
    old.folder.mkdir()
    old.audit_path.write_text(json.dumps({"id_sha256": [plain], "counts": {}}) + "\n")
    assert old.matching(["C0000042", "C0000043"]) == {"C0000042"}
    # ...and is rewritten with keyed hashes only.
    assert old.migrate() == 1 and old.migrate() == 0
    assert plain not in old.audit_path.read_text()
    assert old.matching(["C0000042", "C0000043"]) == {"C0000042"}
    # Without the key a listed customer cannot be matched: ingest refuses to run.
    old.key_path.unlink()
    with pytest.raises(Exception, match="erasure key missing"):
        Screen(old)


def test_screen_hashes_distinct_ids_once(tmp_path):
    erased = SuppressionList(tmp_path)
    erased.add(["C2"], {})
    screen = Screen(erased)
    batch = pa.table({"customer_id": ["C1", "C2", "C2", " C2", None, "C3"]})
    assert screen.withdrawn(batch, {"C9"}) == {"C9", "C2", " C2"}
    assert screen.rows == 3
    assert Screen(SuppressionList(tmp_path / "none")).withdrawn(batch, set()) == set()
