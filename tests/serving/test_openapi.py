"""The served OpenAPI document against the real server (schemathesis)."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import API_KEY, Server
from hypothesis import HealthCheck, Phase, given, settings
from project import Project

from propensity.serving.app import build_app
from propensity.serving.openapi import ERROR_STATUSES

pytestmark = pytest.mark.slow

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
]
#: BentoML's own routes, beside the app's.
BENTOML_ROUTES = {"/", "/schema.json", "/healthz", "/livez", "/readyz", "/metrics"}


@pytest.fixture(scope="module")
def document(server: Server) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/docs.json", timeout=10)
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def api_schema(server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/docs.json")


def test_document_lists_every_route_with_its_schemas(document: dict[str, Any]) -> None:
    app_routes = {route.path for route in build_app(lambda: None, api_key="k").routes}  # type: ignore[attr-defined]
    assert set(document["paths"]) == app_routes | BENTOML_ROUTES
    for path in ("/score", "/score_batch", "/audience"):
        operation = document["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].startswith("#/components/schemas/")
        responses = operation["responses"]
        assert "200" in responses
        for status in ERROR_STATUSES:
            if status == 404 and path == "/score_batch":
                continue  # unknown ids are listed in the answer
            error = responses[str(status)]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
        assert operation["security"] == [{"ApiKey": []}]  # the test server requires the key
    assert (
        document["components"]["schemas"]["BatchRequest"]["properties"]["customer_ids"]["maxItems"]
        == 50
    )


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


def test_api_conforms_to_its_document(api_schema: Any, server: Server) -> None:
    """0 server errors and 0 schema violations on every operation, with the key and without.

    (Each operation runs its own hypothesis loop here: schemathesis' pytest
    fixture loader relies on a pytest internal that pytest 9 removed.)
    """
    operations = _operations(api_schema)
    # Every documented route is exercised (schemathesis skips the document's own URL).
    documented = set(httpx.get(f"{server.url}/docs.json").json()["paths"])
    assert {op.path for op in operations} == documented - {"/docs.json"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def run(case: Any) -> None:
            with_key = case.call_and_validate(
                base_url=server.url, headers={"X-API-Key": API_KEY}, checks=CHECKS
            )
            without = case.call_and_validate(
                base_url=server.url, headers={"X-API-Key": ""}, checks=CHECKS
            )
            if case.path in ("/score", "/score_batch", "/audience"):
                assert without.status_code == 401
                assert with_key.status_code != 401

        run()


def test_a_response_outside_its_schema_fails_the_checks(
    document: dict[str, Any], server: Server, project: Project
) -> None:
    """The conformance check is live: a document that mistypes one answered field fails it."""
    changed = copy.deepcopy(document)
    changed["components"]["schemas"]["ScoreResponse"]["properties"]["stale"] = {"type": "string"}
    operation = schemathesis.openapi.from_dict(changed)["/score"]["POST"]
    case = operation.Case(body={"customer_id": project.customers[0]})
    with pytest.raises(BaseExceptionGroup) as failures:
        case.call_and_validate(base_url=server.url, headers={"X-API-Key": API_KEY}, checks=CHECKS)
    details = [str(e) for e in failures.value.exceptions]
    assert any("violates schema" in d and "/ScoreResponse/properties/stale" in d for d in details)
    # The same call passes against the document as served.
    served = schemathesis.openapi.from_dict(document)["/score"]["POST"]
    response = served.Case(body={"customer_id": project.customers[0]}).call_and_validate(
        base_url=server.url, headers={"X-API-Key": API_KEY}, checks=CHECKS
    )
    assert response.status_code == 200
