"""The OpenAPI document: every endpoint and the error shape, and a property-based run against it
(schemathesis) that finds no server error (5xx) with a valid key."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.api.conftest import ApiServer, Key

pytestmark = pytest.mark.services

ENDPOINTS = {
    "/health": {"get"},
    "/ready": {"get"},
    "/metrics": {"get"},
    "/v1/files": {"get", "post"},
    "/v1/files/{file_id}": {"get", "delete"},
    "/v1/files/{file_id}/content": {"get"},
    "/v1/batches": {"get", "post"},
    "/v1/models": {"get"},
    "/v1/models/{model_id}": {"get"},
    "/v1/batches/{batch_id}": {"get"},
    "/v1/batches/{batch_id}/cancel": {"post"},
    "/api/v1/batches": {"get", "post"},
    "/api/v1/batches/upload": {"post"},
    "/api/v1/batches/{batch_id}": {"get"},
    "/api/v1/batches/{batch_id}/results": {"get"},
    "/api/v1/batches/{batch_id}/cancel": {"post"},
}
OPEN = ("/health", "/ready", "/metrics")  # no key needed


def test_openapi_document_lists_every_endpoint_and_the_error_shape(api: ApiServer) -> None:
    document = httpx.get(f"{api.url}/openapi.json").json()
    assert {path: set(ops) for path, ops in document["paths"].items()} == ENDPOINTS
    error = document["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            expected = {"/health": set(), "/metrics": set(), "/ready": {"503"}}.get(path, {"401"})
            if operation.get("parameters") or operation.get("requestBody"):
                expected.add("422")
            assert expected <= set(operation["responses"]), (method, path, sorted(operation["responses"]))
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
            if path not in OPEN:
                assert operation["security"] == [{"HTTPBearer": []}], (method, path)


@pytest.fixture(scope="module")
def api_schema(api: ApiServer):
    return schemathesis.openapi.from_url(f"{api.url}/openapi.json")


OPERATIONS = [
    pytest.param(path, method, mode, id=f"{method.upper()} {path} {mode.value}")
    for path, methods in sorted(ENDPOINTS.items())
    for method in sorted(methods)
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if path not in OPEN or mode.is_positive  # they take nothing that could be made invalid
]


@pytest.mark.parametrize(("path", "method", "mode"), OPERATIONS)
def test_no_server_errors(api_schema, key: Key, path: str, method: str, mode: GenerationMode) -> None:
    """Requests generated from the schema (valid ones, and ones that break it) never get a 5xx."""
    operation = api_schema[path][method.upper()]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    def run(case) -> None:
        case.call_and_validate(headers=key.headers, checks=[not_a_server_error], timeout=30)

    run()
