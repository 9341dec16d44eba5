"""The BentoML service: the only module that imports bentoml.

Run it with ``bentoml serve propensity.serving.service:Scoring --port 3000``
(or :func:`serve`, which ``propensity serve`` calls). Routes:

* ``POST /score``, ``POST /score_batch``, ``POST /audience``: a Starlette app
  mounted in the service (see :mod:`propensity.serving.app`); about a
  millisecond faster per call than ``@bentoml.api`` methods;
* ``GET /docs.json``: the OpenAPI document of every route (from the mounted app);
* ``GET /healthz`` / ``/livez`` (liveness), ``GET /readyz`` (503, the reason
  in the body, until the champions are loaded and the online store holds
  materialized rows for every view they read), ``GET /metrics`` (Prometheus),
  all served by BentoML and open without the API key so probes and scrapers
  need no secret. Beside BentoML's request series, ``/metrics`` holds
  ``propensity_segment_members{segment=…}``, each live segment's size, read from
  the activation state every :data:`SEGMENT_GAUGE_SECONDS`.

The project is located by ``PROPENSITY_CONFIG`` (a ``propensity.yaml``); its
``serving:`` settings (or ``PROPENSITY_SERVING__*`` variables) configure the
service itself. Nothing is loaded when this module is imported: the settings,
the routes and the champions load when BentoML starts the service in its worker.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import bentoml
from bentoml._internal.server.http import instruments
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from propensity.config import ENV_PREFIX, PROJECT_FILE, ConfigError, Settings, load_settings
from propensity.serving.app import ROUTES, build_app
from propensity.serving.runtime import Runtime, freeze_heap
from propensity.streaming.worker import EventWorker

__all__ = [
    "Scoring",
    "serve",
    "settings_environment",
    "SEGMENT_GAUGE_SECONDS",
    "SERVICE_IMPORT",
    "UNKNOWN_ROUTE",
]

SERVICE_IMPORT = "propensity.serving.service:Scoring"
#: The ``endpoint`` label of every request to a path no route serves.
UNKNOWN_ROUTE = "__unknown__"
#: How often the live segments' gauge is read from the activation state.
SEGMENT_GAUGE_SECONDS = 5.0
_log = logging.getLogger(__name__)


class _Current:
    """The running service's runtime and routes, set when the service starts."""

    runtime: Runtime | None = None
    app: Any = None

    def __call__(self) -> Runtime | None:
        return self.runtime


def _load() -> Settings:
    # A bad setting ends the server with its message, not a traceback (exit code 2).
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _config_message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"setting {'.'.join(str(p) for p in e['loc'])!r}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)


_CURRENT = _Current()


class _Forward:
    """ASGI endpoint that hands a request to the routes built when the service started.

    BentoML needs the app when this module is imported, and matches a mounted
    Starlette app's routes before its own; the routes' behaviour depends on the
    settings (key, limits), which are read only when the service starts.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = _CURRENT.app
        if app is None:  # a request before the service started
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)


_APP = Starlette(routes=[Route(p, _Forward(), methods=list(m)) for p, m in ROUTES.items()])
_HOT_ROUTES = ["/score", "/score_batch", "/audience"]
#: Every path with a route (ours, then BentoML's); anything else is labelled UNKNOWN_ROUTE.
_ROUTES = frozenset([*ROUTES, "/", "/schema.json", "/healthz", "/livez", "/readyz", "/metrics"])
_STATIC = "/static_content/"
_RAW_PATH = "propensity.raw_path"


class _RestorePath:
    """Hands the application the request path the metrics label replaced."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if _RAW_PATH in scope:
            scope = {**scope, "path": scope[_RAW_PATH]}
        await self.app(scope, receive, send)


class _RouteLabelledMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's request metrics, labelled by route rather than by the raw path.

    BentoML labels each series with ``scope["path"]``, so every random path a
    scanner tries adds series for good (5,000 paths grew ``/metrics`` to 23 MB).
    Paths without a route share :data:`UNKNOWN_ROUTE`; BentoML's own code does the
    counting, and the application still sees the real path.
    """

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(_RestorePath(app), **options)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path not in _ROUTES:
                scope = {**scope, "path": _route_label(path), _RAW_PATH: path}
        await super().__call__(scope, receive, send)


def _route_label(path: str) -> str:
    """The route template a path without an exact route matches, or :data:`UNKNOWN_ROUTE`."""
    if path.startswith(_STATIC):
        return _STATIC
    parts = path.split("/")
    # One series per route, never per segment name or customer id.
    if len(parts) == 3 and parts[1] == "segments" and parts[2]:
        return "/segments/{name}"
    if len(parts) == 4 and parts[1] == "customers" and parts[2] and parts[3] == "segments":
        return "/customers/{customer_id}/segments"
    return UNKNOWN_ROUTE


# BentoML has no option for the label; its app factory looks the class up in this
# module when it builds the middleware stack (after this import, in each worker).
instruments.RunnerTrafficMetricsMiddleware = _RouteLabelledMetrics  # type: ignore[misc,assignment]


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
        settings = _load()
        config = settings.serving
        if config.api_key is None:
            _log.warning(
                "%sSERVING__API_KEY is not set: the scoring routes answer without authentication",
                ENV_PREFIX,
            )
        _CURRENT.app = build_app(
            _CURRENT,
            api_key=config.api_key.get_secret_value() if config.api_key else None,
            batch_limit=config.batch_limit,
            max_body_bytes=config.max_body_bytes,
            body_timeout_seconds=config.body_timeout_seconds,
            events=lambda: getattr(self, "events", None),
            segments=self._segments,
        )
        self._settings = settings
        self._live_segments: Any = None
        self._stopping = threading.Event()
        threading.Thread(target=self._export_segment_sizes, daemon=True).start()
        # Live events need no models: the processor starts before the champions load,
        # in a process of its own so that event batches never hold /score's GIL.
        self.events = EventWorker(settings).start()
        self.runtime = Runtime(settings, on_swap=freeze_heap).start()
        _CURRENT.runtime = self.runtime

    def _segments(self) -> Any:
        # Built on first use (it reads the triggers file); a missing file is looked for again.
        if self._live_segments is None:
            from propensity.serving.segments import LiveSegments

            self._live_segments = LiveSegments(self._settings)
        return self._live_segments

    def _export_segment_sizes(self) -> None:
        # Imported here: BentoML points prometheus_client at its multiprocess folder
        # when the worker starts, after this module was imported.
        from prometheus_client import Gauge

        from propensity.jobs.stream import retryable_errors

        members = Gauge(
            "propensity_segment_members",
            "Members of each live segment (GET /segments/{name}).",
            labelnames=["segment"],
            multiprocess_mode="livemostrecent",
        )
        failing = False
        while True:
            try:
                for name, size in self._segments().sizes().items():
                    members.labels(segment=name).set(size)
                failing = False
            except LookupError:
                pass  # no triggers file (yet): no segments to count
            except retryable_errors() as exc:
                if not failing:  # once per outage: the gauge keeps its last values
                    _log.warning("live segment sizes not read: %s", exc)
                failing = True
            if self._stopping.wait(SEGMENT_GAUGE_SECONDS):
                return

    def __is_ready__(self) -> bool:
        # BentoML's /readyz answers 503 with a fixed text when this returns False, and
        # lets an HTTPException through as the response: raising it puts the reason
        # (models not loaded, online store empty) in the probe's body.
        reason = self.runtime.not_ready()
        if reason is not None:
            raise HTTPException(503, detail=f"not ready: {reason}")
        return True

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stopping.set()
        self.runtime.close()
        self.events.close()


def settings_environment(settings: Settings) -> dict[str, str]:
    """``PROPENSITY_*`` variables that reproduce ``settings`` in another process.

    Every field is set (nested ones as ``PROPENSITY_A__B``), so the server sees
    the settings of this process, overrides included, and nothing is written to
    disk: secrets such as the API key or a Redis password stay in the
    environment of the server process.

    Examples
    --------
    >>> env = settings_environment(Settings(root="/srv/p"))
    >>> env["PROPENSITY_ROOT"], env["PROPENSITY_ONLINE_STORE__KIND"]
    ('/srv/p', 'sqlite')
    """
    data = settings.model_dump(mode="json")
    secret = settings.serving.api_key  # dumped masked; the real value is needed
    data["serving"]["api_key"] = secret.get_secret_value() if secret is not None else None
    data["root"] = str(settings.root.resolve())
    environ: dict[str, str] = {}

    def flatten(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                flatten(f"{prefix}{key.upper()}__", value)
            elif value is not None:
                environ[f"{prefix}{key.upper()}"] = str(value)

    flatten(ENV_PREFIX, data)
    return environ


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

    The settings reach the server process in its environment
    (:func:`settings_environment`), so overrides made in this process carry
    over and no file holds a secret.

    Parameters
    ----------
    settings : Settings
    host, port
        Where to listen.
    api_key : str, optional
        Require this ``X-API-Key`` (default: ``serving.api_key`` of the
        settings, i.e. ``$PROPENSITY_SERVING__API_KEY`` if set).
    reload_seconds, batch_limit : optional
        Override ``serving.reload_seconds`` / ``serving.batch_limit``.
    env : dict, optional
        Base environment of the server (default: this process's).
    wait : bool
        Block until the server exits (the CLI); False returns the running process.

    Returns
    -------
    subprocess.Popen

    Raises
    ------
    ValueError
        A serving setting is invalid (e.g. an empty API key), before any
        process starts.

    Examples
    --------
    >>> serve(load_settings(), port=3000)  # doctest: +SKIP
    """
    updates = {
        field: value
        for field, value in (
            ("api_key", api_key),
            ("reload_seconds", reload_seconds),
            ("batch_limit", batch_limit),
        )
        if value is not None
    }
    try:
        serving = settings.serving.model_validate({**dict(settings.serving), **updates})
    except ValidationError as exc:
        raise ValueError(_config_message(exc)) from None
    settings = settings.model_copy(update={"serving": serving})
    base = os.environ if env is None else env
    # Variables of the caller's environment were read into ``settings`` already; the
    # server gets the resolved values only, from the project's own file.
    environ = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    environ.update(settings_environment(settings))
    environ[ENV_PREFIX + "CONFIG"] = str(settings.root.resolve() / PROJECT_FILE)
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
