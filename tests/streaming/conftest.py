from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow as pa
import pytest

from propensity.config import Settings, load_settings
from propensity.events.simulator import SimulationConfig, simulate

TIMEZONE = "America/New_York"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_project(root: Path) -> Settings:
    root.mkdir(parents=True, exist_ok=True)
    (root / "propensity.yaml").write_text(
        f"timezone: {TIMEZONE}\nmlflow_tracking_uri: sqlite:///data/mlflow.db\n"
    )
    return load_settings(root, environ={})


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, records: list[dict[str, Any]], timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.url}/events", json={"events": records}, timeout=timeout)


def start_server(settings: Settings, log: Path, port: int | None = None) -> Server:
    """``bentoml serve`` the service of a project without models (``/events`` needs none)."""
    port = port or free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    environ.update(
        PROPENSITY_CONFIG=str(settings.root / "propensity.yaml"),
        BENTOML_HOME=str(log.parent / "bentoml_home"),
        PROPENSITY_STREAMING__FLUSH_SECONDS="1",
    )
    command = [
        sys.executable, "-m", "bentoml", "serve", "propensity.serving.service:Scoring",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("ab") as out:
        # Its own process group: a kill reaches BentoML's worker processes too.
        process = subprocess.Popen(
            command, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/docs.json", timeout=2).status_code == 200:
                return Server(url, process, log)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            kill_server(Server(url, process, log))
            raise RuntimeError(f"server not up:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def kill_server(server: Server) -> None:
    """SIGKILL the server and every worker it started: no shutdown hook runs."""
    family = [psutil.Process(server.process.pid)]
    with contextlib.suppress(psutil.Error):
        family += family[0].children(recursive=True)
    for proc in family:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(family, timeout=30)
    server.process.wait()


def stop_server(server: Server) -> None:
    """Terminate the server and its workers (BentoML's workers outlive a lone parent)."""
    family = [psutil.Process(server.process.pid)] if server.process.poll() is None else []
    with contextlib.suppress(psutil.Error):
        family += family[0].children(recursive=True) if family else []
    for proc in family:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    server.process.wait()


def day_of_events(customers: int = 150, seed: int = 7) -> pa.Table:
    """Yesterday (UTC) of simulated events, in time order."""
    start = datetime.now(UTC).date() - timedelta(days=1)
    sim = simulate(SimulationConfig(customers=customers, days=1, seed=seed, start=start))
    return sim.events.sort_by("event_timestamp")


def as_records(table: pa.Table) -> list[dict[str, Any]]:
    out = []
    for row in table.to_pylist():
        record = {k: v for k, v in row.items() if v is not None}
        record["event_timestamp"] = row["event_timestamp"].isoformat()
        out.append(record)
    return out


def yesterday() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


@pytest.fixture
def project(tmp_path: Path) -> Settings:
    return make_project(tmp_path / "project")


@pytest.fixture
def server(project: Settings, tmp_path: Path) -> Iterator[Server]:
    running = start_server(project, tmp_path / "server.log")
    try:
        yield running
    finally:
        stop_server(running)
