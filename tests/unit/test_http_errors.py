"""The shared error body: FastAPI's and Starlette's own refusals answer {"error", "detail"} too."""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel

from mlp.http_errors import describe_validation_errors, error_responses, install_error_handlers


class Body(BaseModel):
    name: str


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/things", responses=error_responses(404, 422))
    async def create(body: Body, limit: Annotated[int, Query(ge=1)] = 1) -> dict[str, str]:
        if body.name == "missing":
            raise HTTPException(status_code=404, detail="no such thing")
        return {"name": body.name}

    return app


async def _post(app: FastAPI, *args: object, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.post(*args, **kwargs)  # type: ignore[arg-type]


def test_validation_errors_read_as_where_then_what() -> None:
    errors = [
        {"type": "missing", "loc": ("body", "user_id"), "msg": "Field required"},
        {"type": "greater_than_equal", "loc": ("query", "limit"), "msg": "Input should be greater than or equal to 1"},
        {"type": "string_pattern_mismatch", "loc": ("header", "idempotency-key"), "msg": "String should match"},
        {"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}},
    ]
    assert describe_validation_errors(errors) == (
        "body.user_id: Field required; query parameter 'limit': Input should be greater than or equal to 1; "
        "header parameter 'idempotency-key': String should match; body: JSON decode error: Expecting value"
    )


async def test_a_422_has_the_shared_shape() -> None:
    response = await _post(_app(), "/things", params={"limit": 0}, json={})
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid_request",
        "detail": "query parameter 'limit': Input should be greater than or equal to 1; body.name: Field required",
    }


async def test_http_exceptions_and_unknown_routes_have_the_shared_shape() -> None:
    app = _app()
    missing = await _post(app, "/things", json={"name": "missing"})
    no_route = await _post(app, "/nowhere", json={})
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "detail": "no such thing"}
    assert no_route.status_code == 404
    assert no_route.json() == {"error": "not_found", "detail": "Not Found"}


async def test_a_wrong_method_is_405_with_allow() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app()), base_url="http://test") as client:
        response = await client.delete("/things")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"] == "method_not_allowed"


def test_the_documented_422_is_the_shared_body_not_fastapis_validation_error() -> None:
    schema = _app().openapi()
    responses = schema["paths"]["/things"]["post"]["responses"]
    assert responses["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
