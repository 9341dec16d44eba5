"""The BentoML service: the only module that imports bentoml.

Run it with ``bentoml serve propensity.serving.service:Scoring --port 3000``
(or :func:`serve`, which ``propensity serve`` calls). Routes:

* ``POST /score``, ``POST /score_batch``, ``POST /audience``: a Starlette app
  mounted in the service (see :mod:`propensity.serving.app`); about a
  millisecond faster per call than ``@bentoml.api`` methods;
* ``GET /healthz`` / ``/livez`` (liveness), ``GET /readyz`` (503 until the
  champions and the feature store are loaded), ``GET /metrics`` (Prometheus),
  all served by BentoML and open without the API key so probes and scrapers
  need no secret.

The project is located by ``PROPENSITY_CONFIG`` (a ``propensity.yaml``); its
``api_key``, ``reload_seconds`` and ``batch_limit`` settings (or the
``PROPENSITY_API_KEY``, ``PROPENSITY_RELOAD_SECONDS`` and
``PROPENSITY_BATCH_LIMIT`` variables) configure the service itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bentoml
import yaml

from propensity.config import Settings, load_settings
from propensity.serving.app import build_app
from propensity.serving.runtime import SERVING_ENV, Runtime, ServingConfig, freeze_heap

__all__ = ["Scoring", "serve", "SERVICE_IMPORT"]

SERVICE_IMPORT = "propensity.serving.service:Scoring"


class _Current:
    """The runtime of this process, set when BentoML instantiates the service."""

    runtime: Runtime | None = None

    def __call__(self) -> Runtime | None:
        return self.runtime


_CURRENT = _Current()
# The project comes from PROPENSITY_CONFIG; the key, reload interval and batch limit are
# settings too, so a project file and PROPENSITY_* variables configure the service alike.
_SETTINGS = load_settings()
_CONFIG = ServingConfig.from_settings(_SETTINGS)
_APP = build_app(
    _CURRENT,
    api_key=_CONFIG.api_key.get_secret_value() if _CONFIG.api_key else None,
    batch_limit=_CONFIG.batch_limit,
)
_HOT_ROUTES = ["/score", "/score_batch", "/audience"]


@bentoml.asgi_app(_APP, path="/")
@bentoml.service(
    name="propensity_scoring",
    workers=1,
    traffic={"timeout": 120},
    logging={"access": {"enabled": False}},
    tracing={"sample_rate": 0.0, "excluded_urls": _HOT_ROUTES},
)
class Scoring:
    """Churn, purchase propensity and next-best-action from online features."""

    def __init__(self) -> None:
        self.runtime = Runtime(_SETTINGS, _CONFIG, on_swap=freeze_heap).start()
        _CURRENT.runtime = self.runtime

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.runtime.close()


def serve(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 3000,
    *,
    api_key: str | None = None,
    reload_seconds: float | None = None,
    batch_limit: int | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> subprocess.Popen[Any]:
    """Run the scoring service for a project (``propensity serve``).

    The settings are written to a temporary project file the server reads
    (``PROPENSITY_CONFIG``), so overrides made in this process carry over.

    Parameters
    ----------
    settings : Settings
    host, port
        Where to listen.
    api_key : str, optional
        Require this ``X-API-Key`` (default: ``$PROPENSITY_API_KEY`` if set).
    reload_seconds, batch_limit : optional
        Override ``PROPENSITY_RELOAD_SECONDS`` / ``PROPENSITY_BATCH_LIMIT``.
    env : dict, optional
        Base environment of the server (default: this process's).
    wait : bool
        Block until the server exits (the CLI); False returns the running process.

    Returns
    -------
    subprocess.Popen

    Examples
    --------
    >>> serve(load_settings(), port=3000)  # doctest: +SKIP
    """
    environ = dict(os.environ if env is None else env)
    folder = Path(tempfile.mkdtemp(prefix="propensity-serve-"))
    project = folder / "propensity.yaml"
    # The key travels in the environment only: a dumped SecretStr is masked.
    data = settings.model_dump(mode="json", exclude={"api_key"})
    data["root"] = str(settings.root.resolve())
    if api_key is None and settings.api_key is not None:
        api_key = settings.api_key.get_secret_value()
    project.write_text(yaml.safe_dump(data))
    environ["PROPENSITY_CONFIG"] = str(project)
    for field, value in (
        ("api_key", api_key),
        ("reload_seconds", reload_seconds),
        ("batch_limit", batch_limit),
    ):
        if value is not None:
            environ[SERVING_ENV[field]] = str(value)
    command = [
        sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT,
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=environ)
    if wait:
        # A stop request to this command (systemd, docker stop, a job runner) must stop
        # the server too, or it would keep the port and the models in memory.
        previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())
        try:
            process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return process
