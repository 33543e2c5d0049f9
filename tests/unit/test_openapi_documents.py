"""The OpenAPI documents of both apps: one error body, the documented codes, the configured constraints,
and response models that match what the routes encode."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from api_gateway.main import create_app as create_gateway
from mlp.settings import Settings
from projections.listing import RequestPage
from projections.queries import RequestView
from read_api.main import create_app as create_read_api
from read_api.schemas import RequestOut, RequestPageOut

SETTINGS = Settings(environment="test", models=("basic-model", "slow-model"), max_prompt_chars=1000)
ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}
UNAUTHENTICATED = {("get", "/api/v1/metrics/token-rate")}  # KEDA's metrics-api scaler reads it


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in schema["paths"].items() for method, op in item.items()]


@pytest.fixture(scope="module", params=["gateway", "read-api"])
def schema(request: pytest.FixtureRequest) -> dict[str, Any]:
    app = create_gateway(SETTINGS) if request.param == "gateway" else create_read_api(SETTINGS)
    document: dict[str, Any] = app.openapi()
    return document


def test_every_error_answer_is_the_shared_body(schema: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for method, path, op in _operations(schema):
        errors = {code: r for code, r in op["responses"].items() if int(code) >= 400}
        assert "422" in errors, (method, path)
        for code, response in errors.items():
            assert response["content"]["application/json"]["schema"] == ERROR_BODY, (method, path, code)


def test_every_authenticated_route_documents_401_and_503(schema: dict[str, Any]) -> None:
    for method, path, op in _operations(schema):
        assert "503" in op["responses"], (method, path)
        if (method, path) not in UNAUTHENTICATED:
            assert "401" in op["responses"], (method, path)


def test_the_submit_schema_carries_the_configured_constraints() -> None:
    submit = create_gateway(SETTINGS).openapi()["components"]["schemas"]["InferenceSubmit"]["properties"]
    assert submit["model"]["enum"] == ["basic-model", "slow-model"]
    assert submit["prompt"]["maxLength"] == 1000
    integer = next(b for b in submit["max_tokens"]["anyOf"] if b.get("type") == "integer")
    assert integer["maximum"] == SETTINGS.max_tokens_limit


def test_ids_and_cursors_are_constrained_in_the_read_api_schema() -> None:
    paths = create_read_api(SETTINGS).openapi()["paths"]
    by_id = {p["name"]: p["schema"] for p in paths["/api/v1/inference/{request_id}"]["get"]["parameters"]}
    listing = {p["name"]: p["schema"] for p in paths["/api/v1/inference"]["get"]["parameters"]}
    assert by_id["request_id"]["pattern"]
    cursor = next(b for b in listing["cursor"]["anyOf"] if b.get("type") == "string")
    assert cursor["pattern"]
    status = next(b for b in listing["status"]["anyOf"] if "enum" in b)
    assert set(status["enum"]) >= {"queued", "running", "completed", "failed", "rejected"}
    limit = listing["limit"]
    assert (limit["minimum"], limit["maximum"]) == (1, 200)


def test_the_documented_request_is_the_encoded_view() -> None:
    assert list(RequestOut.model_fields) == [f.name for f in msgspec.structs.fields(RequestView)]
    assert list(RequestPageOut.model_fields) == [f.name for f in msgspec.structs.fields(RequestPage)]
    view = RequestView(request_id="r1", status="queued", user_id="u", model="basic-model")
    RequestOut.model_validate_json(msgspec.json.encode(view))  # what is sent validates against what is documented
