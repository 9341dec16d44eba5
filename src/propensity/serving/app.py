"""The hot HTTP routes as a small Starlette app (mounted inside the BentoML service).

A Starlette app mounted with ``@bentoml.asgi_app`` answers about a
millisecond faster than a ``@bentoml.api`` method, which is most of the
latency budget of ``/score``; BentoML still runs the server, the probes and
``/metrics`` around it.

Errors are JSON ``{"error": ..., "field": ...}``: 400 malformed JSON, 422 a
field missing or of the wrong type (the message names the field), 401 a
missing or wrong API key, 404 an unknown customer, 413 a batch over the
limit, 503 models not loaded yet. The API key is compared in constant time
and never logged or echoed.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from propensity.serving.schemas import AudienceRequest, BatchRequest, ScoreRequest

__all__ = ["build_app", "API_KEY_HEADER"]

API_KEY_HEADER = "x-api-key"
_log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=BaseModel)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _json(payload: Any, status: int = 200, started: float | None = None) -> Response:
    # pydantic-core serializes NaN as null and is several times faster than json.dumps.
    response = Response(to_json(payload), status_code=status, media_type="application/json")
    if started is not None:
        # Time spent scoring, apart from the network and HTTP parsing (a standard header
        # that browsers' and curl's timing views read).
        elapsed = (time.perf_counter() - started) * 1e3
        response.headers["server-timing"] = f"score;dur={elapsed:.2f}"
    return response


def _error(exc: _HTTPError) -> Response:
    return _json({"error": exc.message, "field": exc.field}, exc.status)


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise _HTTPError(400, f"malformed JSON: {first['msg']}") from None
        where = ".".join(str(p) for p in first["loc"]) or None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise _HTTPError(422, f"invalid request: {problems}", where) from None


def build_app(
    runtime: Callable[[], Any],
    *,
    api_key: str | None = None,
    batch_limit: int = 1000,
) -> Starlette:
    """Build the ``/score``, ``/score_batch`` and ``/audience`` routes.

    Parameters
    ----------
    runtime : callable
        Returns the current :class:`propensity.serving.runtime.Runtime`
        (or ``None`` before the service starts).
    api_key : str, optional
        When set, every route requires it in the ``X-API-Key`` header.
    batch_limit : int
        Most customer ids accepted by ``/score_batch``.

    Returns
    -------
    starlette.applications.Starlette

    Examples
    --------
    >>> app = build_app(lambda: None, api_key="secret")
    >>> sorted(r.path for r in app.routes)
    ['/audience', '/score', '/score_batch']
    """
    expected = api_key.encode() if api_key else None

    def check(request: Request) -> Any:
        if expected is not None:
            given = request.headers.get(API_KEY_HEADER, "").encode()
            if not hmac.compare_digest(given, expected):
                raise _HTTPError(401, "missing or invalid API key (header X-API-Key)")
        current = runtime()
        if current is None or current.scorer is None:
            raise _HTTPError(503, "models are not loaded yet; see /readyz")
        return current

    async def score(request: Request) -> Response:
        try:
            current = check(request)
            body = _parse(ScoreRequest, await request.body())
            started = time.perf_counter()
            result = current.scorer.score([body.customer_id])[0]
            if result is None:
                raise _HTTPError(
                    404, f"unknown customer {body.customer_id!r}: no online features", "customer_id"
                )
            return _json(result, started=started)
        except _HTTPError as exc:
            return _error(exc)

    async def score_batch(request: Request) -> Response:
        try:
            current = check(request)
            body = _parse(BatchRequest, await request.body())
            if len(body.customer_ids) > batch_limit:
                raise _HTTPError(
                    413,
                    f"customer_ids holds {len(body.customer_ids)} ids; the limit is {batch_limit}",
                    "customer_ids",
                )
            scorer = current.scorer  # one scorer for the whole batch, even across a reload
            started = time.perf_counter()
            results = await run_in_threadpool(scorer.score, body.customer_ids, body.reasons)
            known = [r for r in results if r is not None]
            unknown = [c for c, r in zip(body.customer_ids, results, strict=True) if r is None]
            return _json({"results": known, "unknown": unknown}, started=started)
        except _HTTPError as exc:
            return _error(exc)

    async def audience(request: Request) -> Response:
        try:
            current = check(request)
            body = _parse(AudienceRequest, await request.body())
            try:
                result = await run_in_threadpool(current.audience, body)
            except LookupError as exc:
                raise _HTTPError(404, str(exc)) from None
            except ValueError as exc:
                raise _HTTPError(422, str(exc), "filters") from None
            return _json(result)
        except _HTTPError as exc:
            return _error(exc)

    routes = [
        Route("/score", score, methods=["POST"]),
        Route("/score_batch", score_batch, methods=["POST"]),
        Route("/audience", audience, methods=["POST"]),
    ]
    return Starlette(routes=routes)
