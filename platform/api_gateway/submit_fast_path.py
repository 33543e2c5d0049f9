"""``POST /api/v1/inference`` past FastAPI's request handling, for the submits that need none of it.

The route (api_gateway.routes.submit_inference) stays the contract: its OpenAPI entry, its 422s and every
other refusal of a malformed request. In front of it, this ASGI middleware answers a submit itself when
everything FastAPI would check holds: a JSON content type, one Idempotency-Key header at most and of the
route's pattern, a body the route's own model (``InferenceSubmit``) validates. Anything else goes to the
route, its body replayed, so an error answers exactly as before. The key is checked by the route's own
schemes and authenticator (``tenancy.http.caller_of``), and the answer is the route's (``answer_submit``).

Why: under load FastAPI's dependency solving, body parsing and route dispatch took about a third of the gateway's
CPU per submit, more than the submit itself (docs/benchmarks.md, round 8). Installed only with tracing off,
as the consumers' direct path (mlp.bus.subscribe): with it on, the route keeps its server span.
"""

from __future__ import annotations

import re
from typing import Final

import pydantic
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api_gateway.deps import GatewayDeps
from api_gateway.idempotency import IDEMPOTENCY_KEY_PATTERN
from api_gateway.routes import SUBMIT_PATH, answer_submit, refused_submit_auth
from api_gateway.schemas import InferenceSubmit
from mlp.http import read_body, replay_body
from mlp.http_errors import DATABASE_UNAVAILABLE, database_unavailable
from tenancy.http import AuthRefused, caller_of

_IDEMPOTENCY_KEY: Final = re.compile(IDEMPOTENCY_KEY_PATTERN)


class SubmitFastPath:
    """Serves the well-formed submits; passes every other request to ``app`` untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != SUBMIT_PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        headers = connection.headers
        content_types = headers.getlist("content-type")
        idempotency_keys = headers.getlist("idempotency-key")
        if (
            len(content_types) != 1
            or not _is_json(content_types[0])
            or len(idempotency_keys) > 1
            or (idempotency_keys and not _IDEMPOTENCY_KEY.fullmatch(idempotency_keys[0]))
        ):
            await self.app(scope, receive, send)
            return
        raw = await read_body(receive)  # within MLP_MAX_BODY_BYTES: mlp.http.BodySizeLimit is outside
        if raw is None:  # the client went away before its body was in
            return
        try:
            body = InferenceSubmit.model_validate_json(raw)
        except pydantic.ValidationError:  # the route names the field and the rule, in its 422
            await self.app(scope, replay_body(raw, receive), send)
            return
        deps: GatewayDeps = scope["app"].state.deps
        try:
            caller = await caller_of(connection)
            response = await answer_submit(deps, caller, body, idempotency_keys[0] if idempotency_keys else None)
        except AuthRefused as exc:
            response = refused_submit_auth(exc)
        except DATABASE_UNAVAILABLE as exc:  # as the app's handler answers it for the route
            response = await database_unavailable(Request(scope), exc)
        await response(scope, receive, send)


def _is_json(content_type: str) -> bool:
    # What FastAPI parses as JSON includes these; other JSON types (+json) take the route's way.
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json"
