"""Readiness follows the online store: a service over an empty store is not ready.

A service whose online store holds nothing answers 404 for every customer;
reporting it ready would let a load balancer send it traffic. These tests run
the real service on a fresh, empty Redis database and the real SQLite plugin.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY
from project import Project, start_service

from propensity.config import OnlineStore
from propensity.features.definitions import VIEWS
from propensity.features.online.redis import marks_key
from propensity.features.online.sqlite import marks_table
from propensity.features.store import PROJECT, FeatureStoreAdapter
from propensity.serving.process import stop

REDIS = os.environ.get("REDIS_URL", "localhost:6379").removeprefix("redis://").split(",")[0]
#: A database index no other test uses: flushed before and after.
REDIS_DB = 7


def _redis_client():  # type: ignore[no-untyped-def]
    redis = pytest.importorskip("redis")
    host, _, port = REDIS.partition(":")
    client = redis.Redis(host=host or "localhost", port=int(port or 6379), db=REDIS_DB)
    try:
        client.ping()
    except redis.ConnectionError:
        if "REDIS_URL" in os.environ:
            pytest.fail(f"REDIS_URL is set but no redis-server answers at {REDIS}")
        pytest.skip(f"no redis-server at {REDIS}")
    return client


@pytest.fixture
def empty_redis() -> Iterator[object]:
    client = _redis_client()
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _wait_listening(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/livez", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not listening:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.redis
def test_empty_redis_store_is_not_ready_until_materialized(
    project: Project, empty_redis: object, tmp_path: Path
) -> None:
    redis_url = f"redis://{REDIS}/{REDIS_DB}"
    settings = project.settings.model_copy(
        update={"online_store": OnlineStore(kind="redis", redis_url=redis_url)}
    )
    log = tmp_path / "server.log"
    url, process = start_service(
        project,
        log,
        tmp_path / "bentoml_home",
        PROPENSITY_SERVING__API_KEY=API_KEY,
        PROPENSITY_ONLINE_STORE__KIND="redis",
        PROPENSITY_ONLINE_STORE__REDIS_URL=redis_url,
    )
    customer = project.customers[0]
    try:
        _wait_listening(url, process, log)
        with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
            deadline = time.monotonic() + 60  # until the champions are loaded
            while "materialized" not in (body := client.get("/readyz").text):
                assert time.monotonic() < deadline, body
                time.sleep(0.3)
            probes = [client.get("/readyz") for _ in range(3)]
            assert {p.status_code for p in probes} == {503}
            reason = probes[0].text
            assert "no materialized rows" in reason and "materialize" in reason
            assert any(f"{view!r}" in reason for view in VIEWS)  # names the empty views
            assert client.post("/score", json={"customer_id": customer}).status_code == 404

            FeatureStoreAdapter(settings).materialize()
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            scored = client.post("/score", json={"customer_id": customer})
            assert scored.status_code == 200
            assert 0 <= scored.json()["churn_probability"] <= 1
    finally:
        stop(process)
    # The reason is logged once, not once per probe.
    assert log.read_text().count("no materialized rows") == 1


@pytest.mark.redis
def test_redis_store_without_marks_counts_its_rows(project: Project, empty_redis) -> None:  # type: ignore[no-untyped-def]
    settings = project.settings.model_copy(
        update={"online_store": OnlineStore(kind="redis", redis_url=f"redis://{REDIS}/{REDIS_DB}")}
    )
    adapter = FeatureStoreAdapter(settings)
    assert adapter.materialized_views() == set()
    adapter.materialize()
    assert adapter.materialized_views() == set(VIEWS)
    # A store written before marks existed: its rows still count.
    assert empty_redis.delete(marks_key(PROJECT)) == 1  # type: ignore[attr-defined]
    assert adapter.materialized_views() == set(VIEWS)


def test_sqlite_store_without_marks_counts_its_rows(project: Project, tmp_path: Path) -> None:
    source = project.settings.path(project.settings.online_store.sqlite_path)
    copy = tmp_path / "online.db"
    shutil.copy(source, copy)

    def adapter_for(path: Path) -> FeatureStoreAdapter:
        online = project.settings.online_store.model_copy(update={"sqlite_path": path})
        return FeatureStoreAdapter(project.settings.model_copy(update={"online_store": online}))

    assert adapter_for(tmp_path / "absent.db").materialized_views() == set()
    adapter = adapter_for(copy)
    assert adapter.materialized_views() == set(VIEWS)
    view = sorted(VIEWS)[0]
    with sqlite3.connect(copy) as conn:
        conn.execute(f'DROP TABLE "{marks_table(PROJECT)}"')
    assert adapter.materialized_views() == set(VIEWS)  # written before marks: rows count
    with sqlite3.connect(copy) as conn:
        conn.execute(f'DELETE FROM "{PROJECT}_{view}"')
    assert adapter.materialized_views() == set(VIEWS) - {view}
