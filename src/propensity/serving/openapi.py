"""The OpenAPI document of the scoring service (served at ``/docs.json``).

Every route is listed with its request and response schemas, error bodies
included, so a client generator or a conformance tool (the test suite runs
schemathesis against the live server) sees the API as it really answers.
The schemas come from the pydantic models of :mod:`propensity.serving.schemas`,
the same models that validate the requests: one definition of each shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from propensity.activation.spec import NAME_PATTERN
from propensity.serving.events import EventsRequest, EventsResponse
from propensity.serving.schemas import (
    AudienceRequest,
    AudienceResponse,
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    ScoreRequest,
    ScoreResponse,
)
from propensity.serving.segments import MAX_PAGE, CustomerSegments, SegmentPage

__all__ = ["openapi_document", "ERROR_STATUSES"]

_REF = "#/components/schemas/{model}"
#: What each error status means, as the routes answer it.
ERROR_STATUSES = {
    400: "Malformed JSON.",
    401: "Missing or invalid API key (header X-API-Key).",
    404: "Unknown customer, or no offline snapshot to select an audience from.",
    408: "The request body was not received within the body timeout.",
    413: "The request body, or the batch, is over its limit.",
    415: "The request body is not application/json.",
    422: "A field is missing, extra, of the wrong type or out of range; `field` names it.",
    503: "The models are not loaded yet (see /readyz).",
}
_LOOKUP_STATUSES = {
    404: "No triggers file (so no live segments), or a segment it does not declare.",
    503: "The live segments are not available in this process.",
}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_HTML = {"text/html": {"schema": {"type": "string"}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json_content(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _scoring(
    operation_id: str,
    summary: str,
    request: type[BaseModel],
    response: type[BaseModel],
    errors: tuple[int, ...],
    auth: bool,
    timed: bool,
) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "Success.", "content": _json_content(response)}
    if timed:
        ok["headers"] = {
            "Server-Timing": {
                "description": "Milliseconds spent scoring, e.g. score;dur=1.27.",
                "required": True,
                "schema": {"type": "string", "pattern": r"^score;dur=\d+\.\d{2}$"},
            }
        }
    statuses = sorted({*errors, 400, 408, 413, 415, 422, 503, *((401,) if auth else ())})
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "requestBody": {"required": True, "content": _json_content(request)},
        "responses": {
            "200": ok,
            **{
                str(status): {
                    "description": ERROR_STATUSES[status],
                    "content": _json_content(ErrorResponse),
                }
                for status in statuses
            },
        },
    }
    if auth:
        operation["security"] = [{"ApiKey": []}]
    return {"post": operation}


def _probe(summary: str, statuses: dict[str, str], media: dict[str, Any]) -> dict[str, Any]:
    responses = {code: {"description": text, "content": media} for code, text in statuses.items()}
    return {"get": {"summary": summary, "responses": responses}}


def _readiness() -> dict[str, Any]:
    probe = _probe("Readiness", {"200": "Models loaded, online store materialized."}, _TEXT)
    probe["get"]["responses"]["503"] = {
        "description": "Not ready: models not loaded, or no materialized online rows for a "
        "served feature view; the body says which.",
        "content": _TEXT,
    }
    return probe


def _lookup(
    operation_id: str,
    summary: str,
    parameters: list[dict[str, Any]],
    response: type[BaseModel],
    auth: bool,
) -> dict[str, Any]:
    """A GET route answering JSON (the live segments)."""
    statuses = [404, 422, 503, *((401,) if auth else ())]
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "parameters": parameters,
        "responses": {
            "200": {"description": "Success.", "content": _json_content(response)},
            **{
                str(status): {
                    "description": _LOOKUP_STATUSES.get(status, ERROR_STATUSES[status]),
                    "content": _json_content(ErrorResponse),
                }
                for status in sorted(statuses)
            },
        },
    }
    if auth:
        operation["security"] = [{"ApiKey": []}]
    return {"get": operation}


#: A path segment the server routes: BentoML mounts the routes under a catch-all
#: ``/{path:path}`` whose ``.*`` stops at a line break, so such a path never arrives.
_ROUTABLE = "^[^\n]+$"


def _path_parameter(name: str, description: str, pattern: str = _ROUTABLE) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1, "pattern": pattern},
    }


def openapi_document(*, batch_limit: int, auth: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the service as configured.

    Parameters
    ----------
    batch_limit : int
        Most ids of one ``/score_batch`` call (the schema's ``maxItems``).
    auth : bool
        Whether the scoring routes require the ``X-API-Key`` header.

    Examples
    --------
    >>> doc = openapi_document(batch_limit=1000, auth=True)
    >>> sorted(doc["paths"])[:3]
    ['/audience', '/customers/{customer_id}/segments', '/docs.json']
    """
    requests: list[type[BaseModel]] = [ScoreRequest, BatchRequest, AudienceRequest, EventsRequest]
    responses: list[type[BaseModel]] = [
        ScoreResponse,
        BatchResponse,
        AudienceResponse,
        EventsResponse,
        SegmentPage,
        CustomerSegments,
        ErrorResponse,
    ]
    _, schemas = models_json_schema(
        [(m, "validation") for m in requests] + [(m, "serialization") for m in responses],
        ref_template=_REF,
    )
    components: dict[str, Any] = {"schemas": schemas.get("$defs", {})}
    batch = components["schemas"][BatchRequest.__name__]
    batch["properties"]["customer_ids"]["maxItems"] = batch_limit
    components["schemas"][EventsRequest.__name__]["properties"]["events"]["maxItems"] = batch_limit
    audience = _scoring(
        "audience", "Select an audience", AudienceRequest, AudienceResponse, (404,), auth, False
    )
    audience["post"]["responses"]["200"]["headers"] = {
        "Deprecation": {
            "description": "Present when the request used a deprecated field name "
            "(churn, expected_value, action): deprecated since this date (RFC 9745).",
            "required": False,
            "schema": {"type": "string", "pattern": r"^@\d+$"},
        }
    }
    if auth:
        components["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
    paths = {
        "/score": _scoring(
            "score", "Score one customer", ScoreRequest, ScoreResponse, (404,), auth, timed=True
        ),
        "/score_batch": _scoring(
            "score_batch", "Score many customers", BatchRequest, BatchResponse, (), auth, timed=True
        ),
        "/audience": audience,
        "/events": _scoring(
            "events", "Post live events", EventsRequest, EventsResponse, (), auth, timed=False
        ),
        "/segments/{name}": _lookup(
            "segment_members",
            "A page of a live segment's members",
            [
                _path_parameter("name", "A segment of the triggers file.", f"^{NAME_PATTERN}$"),
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "description": "The next_after of the page before.",
                    "schema": {"type": "string"},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "description": "Most members of the page.",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                },
            ],
            SegmentPage,
            auth,
        ),
        "/customers/{customer_id}/segments": _lookup(
            "customer_segments",
            "The live segments of one customer",
            [_path_parameter("customer_id", "The customer.")],
            CustomerSegments,
            auth,
        ),
        "/healthz": _probe("Liveness", {"200": "The process is up."}, _TEXT),
        "/livez": _probe("Liveness", {"200": "The process is up."}, _TEXT),
        "/readyz": _readiness(),
        "/metrics": _probe("Prometheus metrics", {"200": "Text exposition format."}, _TEXT),
        # BentoML's own pages: the API explorer and its service schema.
        "/": _probe(
            "API explorer", {"200": "Swagger UI."}, {"text/html": {"schema": {"type": "string"}}}
        ),
        "/schema.json": _probe(
            "BentoML service schema",
            {"200": "The schema."},
            {"application/json": {"schema": {"type": "object"}}},
        ),
        "/docs.json": _probe(
            "This OpenAPI document",
            {"200": "The document."},
            {"application/json": {"schema": {"type": "object"}}},
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "propensity scoring API",
            "version": "1",
            "description": "Churn, purchase propensity and next-best-action from online features.",
        },
        "paths": paths,
        "components": components,
    }
