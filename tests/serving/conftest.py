from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from propensity.serving.process import stop, wait_ready

sys.path.insert(0, str(Path(__file__).parent))

from project import Project, build_project, start_service  # noqa: E402

API_KEY = "test-key-7c0ffee5ecret"
#: The test server's deadline for receiving a request body (seconds).
BODY_TIMEOUT = 1.5


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return build_project(tmp_path_factory.mktemp("serving") / "project")


@dataclass
class Server:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="session")
def server(project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real BentoML service in a subprocess (one per test session: BentoML's metrics
    registry is per process)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    url, process = start_service(
        project,
        log,
        tmp_path_factory.mktemp("bentoml_home"),
        PROPENSITY_SERVING__API_KEY=API_KEY,
        PROPENSITY_SERVING__RELOAD_SECONDS="0.5",
        PROPENSITY_SERVING__BATCH_LIMIT="50",
        PROPENSITY_SERVING__BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
    )
    try:
        try:
            wait_ready(url, process, timeout=90)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{log.read_text()[-3000:]}") from None
        yield Server(url, log, process)
    finally:
        stop(process)
