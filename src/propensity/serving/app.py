"""The hot HTTP routes as a small Starlette app (mounted inside the BentoML service).

A Starlette app mounted with ``@bentoml.asgi_app`` answers about a
millisecond faster than a ``@bentoml.api`` method, which is most of the
latency budget of ``/score``; BentoML still runs the server, the probes and
``/metrics`` around it. The app also serves ``/docs.json``, the OpenAPI
document of every route (BentoML's own lists only its probes).

Errors are JSON ``{"error": ..., "field": ...}``: 400 malformed JSON, 401 a
missing or wrong API key, 404 an unknown customer, 408 a request body not
received within the body timeout, 413 a body over the size limit or a batch
over the batch limit, 415 a body that is not ``application/json``, 422 a
field missing, of the wrong type or out of range (the message names the
field, and the index in a list), 503 models not loaded yet. ``/audience``
still accepts the names it used before it spoke ``/score``'s vocabulary; such
an answer carries a ``Deprecation`` header. The API key is
compared in constant time and never logged or echoed. A client that hangs up
before its body arrived is logged at DEBUG, without a traceback: it is not a
server fault.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from propensity.serving.encoding import batch_json
from propensity.serving.events import EventsRequest, post_events
from propensity.serving.openapi import openapi_document
from propensity.serving.schemas import (
    DEPRECATED_FIELDS,
    AudienceRequest,
    BatchRequest,
    ScoreRequest,
)
from propensity.serving.segments import MAX_PAGE

__all__ = ["build_app", "API_KEY_HEADER", "JSON_MEDIA_TYPE"]

API_KEY_HEADER = "x-api-key"
JSON_MEDIA_TYPE = "application/json"
_log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=BaseModel)
#: ``Deprecation`` header (RFC 9745) of answers to requests using a deprecated
#: ``/audience`` name: deprecated since 2026-12-02.
DEPRECATION = "@1796169600"
_warned: set[str] = set()  # deprecated names already logged by this process


def _warn_deprecated(names: list[str]) -> None:
    """Log each deprecated name once per process: callers are found, logs not flooded."""
    for name in names:
        if name not in _warned:
            _warned.add(name)
            _log.warning(
                "/audience: field name %r is deprecated and goes in the next release; use %r",
                name,
                DEPRECATED_FIELDS[name],
            )


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _json(payload: Any, status: int = 200, started: float | None = None) -> Response:
    # pydantic-core is several times faster than json.dumps; NaN and infinities become
    # null (its default writes the bare NaN token, which is not JSON).
    return _json_body(to_json(payload, inf_nan_mode="null"), status, started)


def _json_body(body: bytes, status: int = 200, started: float | None = None) -> Response:
    response = Response(body, status_code=status, media_type=JSON_MEDIA_TYPE)
    if started is not None:
        # Time spent scoring, apart from the network and HTTP parsing (a standard header
        # that browsers' and curl's timing views read).
        elapsed = (time.perf_counter() - started) * 1e3
        response.headers["server-timing"] = f"score;dur={elapsed:.2f}"
    return response


def _batch_body(scorer: Any, customer_ids: list[str], reasons: bool) -> bytes:
    # Encoded from the scored arrays, without a dict per customer (serving/encoding.py).
    scored = scorer.score_columns(customer_ids, reasons)
    return batch_json(scored, scorer.fields)


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


async def _read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The request body, refused early when it is not JSON, too large or too slow."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        shown = media_type or "none"
        raise _HTTPError(415, f"Content-Type must be {JSON_MEDIA_TYPE}, got {shown}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        # Answered before a byte of the body is read.
        raise _HTTPError(413, f"request body of {declared} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        # One deadline for the whole body: a client trickling bytes cannot hold a
        # connection (and its buffers) open indefinitely.
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:  # a chunked body carries no Content-Length
                    raise _HTTPError(413, f"request body over the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _HTTPError(408, f"request body not received within {timeout:g} s") from None
    return b"".join(chunks)


def _route(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except _HTTPError as exc:
            return _error(exc)
        except ClientDisconnect:
            # Nobody is left to answer; an ERROR with a traceback would page someone
            # for a client's dropped connection.
            _log.debug("client disconnected before sending its request body (%s)", request.url.path)
            return Response(status_code=400)

    return endpoint


#: Paths and methods of the routes :func:`build_app` serves. ``/docs.json`` comes
#: ahead of BentoML's own (the mounted app's routes match first).
ROUTES: dict[str, tuple[str, ...]] = {
    "/score": ("POST",),
    "/score_batch": ("POST",),
    "/audience": ("POST",),
    "/events": ("POST",),
    "/segments/{name}": ("GET",),
    "/customers/{customer_id}/segments": ("GET",),
    "/docs.json": ("GET",),
}


def build_app(
    runtime: Callable[[], Any],
    *,
    api_key: str | None = None,
    batch_limit: int = 1000,
    max_body_bytes: int = 1 << 20,
    body_timeout_seconds: float = 10.0,
    events: Callable[[], Any] | None = None,
    segments: Callable[[], Any] | None = None,
) -> Starlette:
    """Build the ``/score``, ``/score_batch``, ``/audience`` and ``/docs.json`` routes.

    Parameters
    ----------
    runtime : callable
        Returns the current :class:`propensity.serving.runtime.Runtime`
        (or ``None`` before the service starts).
    api_key : str, optional
        When set, every scoring route requires it in the ``X-API-Key`` header.
        An empty or blank key is refused (it would turn authentication off).
    batch_limit : int
        Most customer ids accepted by ``/score_batch``.
    max_body_bytes : int
        Largest request body; larger ones are a 413 before they are read.
    body_timeout_seconds : float
        Deadline for receiving a whole request body (else 408).
    events : callable, optional
        Returns the event processor (:class:`~propensity.streaming.worker.EventWorker`) of
        ``/events`` (``None``, or no callable: the route answers 503).
    segments : callable, optional
        Returns the :class:`~propensity.serving.segments.LiveSegments` of the
        segment routes (raises ``LookupError`` without a triggers file: 404).

    Returns
    -------
    starlette.applications.Starlette

    Examples
    --------
    >>> app = build_app(lambda: None, api_key="secret")
    >>> sorted(r.path for r in app.routes)  # doctest: +NORMALIZE_WHITESPACE
    ['/audience', '/customers/{customer_id}/segments', '/docs.json', '/events', '/score',
     '/score_batch', '/segments/{name}']
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty or blank; pass None to serve without authentication")
    expected = api_key.encode() if api_key else None
    document = to_json(openapi_document(batch_limit=batch_limit, auth=expected is not None))

    def authorize(request: Request) -> None:
        if expected is not None:
            given = request.headers.get(API_KEY_HEADER, "").encode()
            if not hmac.compare_digest(given, expected):
                raise _HTTPError(401, "missing or invalid API key (header X-API-Key)")

    async def body_of(request: Request, model: type[_M]) -> tuple[Any, _M]:
        # Order of refusals: the cheapest and least revealing first, the body last.
        authorize(request)
        current = runtime()
        if current is None or current.scorer is None:
            raise _HTTPError(503, "models are not loaded yet; see /readyz")
        raw = await _read_body(request, max_body_bytes, body_timeout_seconds)
        return current, _parse(model, raw)

    @_route
    async def score(request: Request) -> Response:
        current, body = await body_of(request, ScoreRequest)
        started = time.perf_counter()
        result = current.scorer.score([body.customer_id])[0]
        if result is None:
            raise _HTTPError(
                404, f"unknown customer {body.customer_id!r}: no online features", "customer_id"
            )
        return _json(result, started=started)

    @_route
    async def score_batch(request: Request) -> Response:
        current, body = await body_of(request, BatchRequest)
        if len(body.customer_ids) > batch_limit:
            raise _HTTPError(
                413,
                f"customer_ids holds {len(body.customer_ids)} ids; the limit is {batch_limit}",
                "customer_ids",
            )
        scorer = current.scorer  # one scorer for the whole batch, even across a reload
        started = time.perf_counter()
        encoded = await run_in_threadpool(_batch_body, scorer, body.customer_ids, body.reasons)
        return _json_body(encoded, started=started)

    @_route
    async def audience(request: Request) -> Response:
        current, body = await body_of(request, AudienceRequest)
        try:
            result = await run_in_threadpool(current.audience, body)
        except LookupError as exc:
            raise _HTTPError(404, str(exc)) from None
        except ValueError as exc:
            raise _HTTPError(422, str(exc), "filters") from None
        response = _json(result)
        deprecated = body.deprecated_names()
        if deprecated:
            _warn_deprecated(deprecated)
            response.headers["deprecation"] = DEPRECATION
        return response

    @_route
    async def post_events_route(request: Request) -> Response:
        authorize(request)
        processor = events() if events is not None else None
        if processor is None:
            raise _HTTPError(503, "the event processor is not started yet; see /readyz")
        raw = await _read_body(request, max_body_bytes, body_timeout_seconds)
        body = _parse(EventsRequest, raw)
        if len(body.events) > batch_limit:
            raise _HTTPError(
                413, f"events holds {len(body.events)} events; the limit is {batch_limit}", "events"
            )
        try:
            return _json(await run_in_threadpool(post_events, processor, body))
        except ValueError as exc:
            # A batch that cannot be read as events at all (text that is not valid
            # Unicode, say): nothing of it was applied, the client may fix and resend.
            raise _HTTPError(422, f"events could not be read: {exc}", "events") from None

    async def live_segments() -> Any:
        try:
            return await run_in_threadpool(segments) if segments is not None else None
        except LookupError as exc:
            raise _HTTPError(404, str(exc)) from None

    @_route
    async def segment_page(request: Request) -> Response:
        authorize(request)
        limit_text = request.query_params.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE:
            raise _HTTPError(422, f"limit must be an integer from 1 to {MAX_PAGE}", "limit")
        live = await live_segments()
        if live is None:
            raise _HTTPError(503, "live segments are not available in this process")
        name, after = request.path_params["name"], request.query_params.get("after")
        try:
            page = await run_in_threadpool(live.page, name, after, int(limit_text))
        except KeyError as exc:
            raise _HTTPError(404, str(exc.args[0]), "name") from None
        return _json(page)

    @_route
    async def customer_segments(request: Request) -> Response:
        authorize(request)
        live = await live_segments()
        if live is None:
            raise _HTTPError(503, "live segments are not available in this process")
        answer = await run_in_threadpool(live.of_customer, request.path_params["customer_id"])
        return _json(answer)

    async def docs(request: Request) -> Response:
        return Response(document, media_type=JSON_MEDIA_TYPE)

    handlers = {
        "/score": score,
        "/score_batch": score_batch,
        "/audience": audience,
        "/events": post_events_route,
        "/segments/{name}": segment_page,
        "/customers/{customer_id}/segments": customer_segments,
        "/docs.json": docs,
    }
    return Starlette(routes=[Route(p, handlers[p], methods=list(m)) for p, m in ROUTES.items()])
