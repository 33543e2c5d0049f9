"""The gateway's submit fast path (api_gateway.submit_fast_path) answers every request as the route does.

Each request goes to two gateways on the same real services: one as created (the fast path in front of the
route) and one with the fast path taken out. Their answers must match: status, body, and the headers a client
acts on. A counting override of the route's caller dependency shows which requests the fast path answered
itself (the well-formed ones, whatever their outcome) and which it left to the route (every other one).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from api_gateway.main import create_app
from api_gateway.submit_fast_path import SubmitFastPath
from mlp.settings import Settings
from tenancy.caller import Caller
from tenancy.http import caller_of, current_caller
from tests.support.apps import running
from tests.support.queues import drain_requests

pytestmark = pytest.mark.integration

SEED = {"prompt": "test prompt", "user_id": "fp-user", "model": "basic-model"}
KEY = {"Authorization": "Bearer k-fp"}
HEADERS_COMPARED = ("content-type", "retry-after", "www-authenticate")


@dataclass
class Gateway:
    client: httpx.AsyncClient
    route_calls: list[str] = field(default_factory=list)  # the requests the route itself answered


def counted_by_route(app: FastAPI, gateway_calls: list[str]) -> None:
    async def counting_caller(request: Request) -> Caller:
        gateway_calls.append(request.headers.get("x-case", ""))
        return await caller_of(request)  # the route's schemes and authenticator, as current_caller

    app.dependency_overrides[current_caller] = counting_caller


@pytest.fixture
async def gateways(module_settings: Settings) -> AsyncIterator[tuple[Gateway, Gateway]]:
    settings = module_settings.model_copy(update={"api_keys": "k-fp=fp-user"})
    fast_app, route_app = create_app(settings), create_app(settings)
    route_app.user_middleware = [m for m in route_app.user_middleware if m.cls is not SubmitFastPath]  # type: ignore[comparison-overlap]
    assert len(fast_app.user_middleware) == len(route_app.user_middleware) + 1  # telemetry is off in tests
    async with running(fast_app) as fast_client, running(route_app) as route_client:
        fast, route = Gateway(fast_client), Gateway(route_client)
        counted_by_route(fast_app, fast.route_calls)
        counted_by_route(route_app, route.route_calls)
        await drain_requests(settings)
        yield fast, route
        await drain_requests(settings)


def as_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


JSON = {"Content-Type": "application/json"}
# (case, body, headers, served by the fast path)
CASES: Sequence[tuple[str, bytes, list[tuple[str, str]], bool]] = [
    ("bearer", as_json(SEED), [*JSON.items(), *KEY.items()], True),
    ("x-api-key", as_json(SEED), [*JSON.items(), ("X-API-Key", "k-fp")], True),
    ("charset", as_json(SEED), [("Content-Type", "application/json; charset=utf-8"), *KEY.items()], True),
    ("all-fields", as_json({**SEED, "max_tokens": 8, "timeout_s": 30}), [*JSON.items(), *KEY.items()], True),
    ("spoofed-user", as_json({**SEED, "user_id": "someone-else"}), [*JSON.items(), *KEY.items()], True),
    ("no-key", as_json(SEED), list(JSON.items()), True),
    ("unknown-key", as_json(SEED), [*JSON.items(), ("Authorization", "Bearer k-nobody")], True),
    ("basic-scheme", as_json(SEED), [*JSON.items(), ("Authorization", "Basic k-fp")], True),
    ("unknown-model", as_json({**SEED, "model": "no-such-model"}), [*JSON.items(), *KEY.items()], True),
    ("max-tokens-over-plan", as_json({**SEED, "max_tokens": 10**6}), [*JSON.items(), *KEY.items()], True),
    ("not-json", b"{not json", [*JSON.items(), *KEY.items()], False),
    ("empty-body", b"", [*JSON.items(), *KEY.items()], False),
    ("extra-field", as_json({**SEED, "priority": 1}), [*JSON.items(), *KEY.items()], False),
    ("wrong-type", as_json({**SEED, "max_tokens": "many"}), [*JSON.items(), *KEY.items()], False),
    ("nul-in-prompt", as_json({**SEED, "prompt": "a\u0000b"}), [*JSON.items(), *KEY.items()], False),
    ("missing-field", as_json({"prompt": "x", "model": "basic-model"}), [*JSON.items(), *KEY.items()], False),
    ("text-plain", as_json(SEED), [("Content-Type", "text/plain"), *KEY.items()], False),
    ("no-content-type", as_json(SEED), list(KEY.items()), False),
    ("json-suffix", as_json(SEED), [("Content-Type", "application/vnd.mlp+json"), *KEY.items()], False),
    ("bad-idempotency-key", as_json(SEED), [*JSON.items(), *KEY.items(), ("Idempotency-Key", "no spaces")], False),
    (
        "two-idempotency-keys",
        as_json(SEED),
        [*JSON.items(), *KEY.items(), ("Idempotency-Key", "fp-a"), ("Idempotency-Key", "fp-b")],
        False,
    ),
]


@pytest.mark.parametrize(("case", "body", "headers", "fast"), CASES, ids=[c[0] for c in CASES])
async def test_the_fast_path_answers_as_the_route_and_serves_only_well_formed_submits(
    gateways: tuple[Gateway, Gateway], case: str, body: bytes, headers: list[tuple[str, str]], fast: bool
) -> None:
    fast_gw, route_gw = gateways
    answers = []
    for gateway in (fast_gw, route_gw):
        response = await gateway.client.post("/api/v1/inference", content=body, headers=[*headers, ("X-Case", case)])
        answers.append(response)
    a, b = answers
    assert a.status_code == b.status_code, (a.text, b.text)
    assert {h: a.headers.get(h) for h in HEADERS_COMPARED} == {h: b.headers.get(h) for h in HEADERS_COMPARED}
    if a.status_code == 202:  # two requests, two ids: the same answer otherwise
        assert a.json().keys() == b.json().keys() == {"request_id", "status", "status_url"}
        assert a.json()["status"] == b.json()["status"] == "queued"
    else:
        assert a.json() == b.json()
    if fast:  # answered without the route, which would have authenticated the caller
        assert (fast_gw.route_calls, route_gw.route_calls) == ([], [case])
    else:  # left to the route: as far as it got (a body that is not JSON fails before any dependency)
        assert fast_gw.route_calls == route_gw.route_calls


async def test_an_idempotent_retry_across_the_two_paths_names_the_first_request(
    gateways: tuple[Gateway, Gateway], module_settings: Settings
) -> None:
    fast_gw, route_gw = gateways
    headers = {**JSON, **KEY, "Idempotency-Key": "fp-retry-1"}
    first = await fast_gw.client.post("/api/v1/inference", content=as_json(SEED), headers=headers)
    retried = await route_gw.client.post("/api/v1/inference", content=as_json(SEED), headers=headers)
    assert (first.status_code, retried.status_code) == (202, 202)
    assert first.json() == retried.json()
    assert fast_gw.route_calls == []
    assert [e.request_id for e in await drain_requests(module_settings)] == [first.json()["request_id"]]


async def test_a_body_over_the_limit_is_refused_before_the_fast_path_reads_it(
    gateways: tuple[Gateway, Gateway], module_settings: Settings
) -> None:
    fast_gw, route_gw = gateways
    body = as_json({**SEED, "prompt": "x" * (module_settings.max_body_bytes + 1)})

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: the limit is found as the body is read
        yield body

    for gateway in (fast_gw, route_gw):
        response = await gateway.client.post("/api/v1/inference", content=streamed(), headers={**JSON, **KEY})
        assert response.status_code == 413, (gateway is fast_gw, response.text)
        assert response.json()["error"] == "payload_too_large"
    assert fast_gw.route_calls == route_gw.route_calls == []
