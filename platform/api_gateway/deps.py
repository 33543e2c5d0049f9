"""What the gateway's routes depend on, typed: ``Annotated[..., Depends(...)]`` aliases over the lifespan's objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from api_gateway.cancel import CancelService
from api_gateway.submit import SubmitService
from mlp.settings import Settings
from tenancy.authenticator import Authenticator
from tenancy.key_store import KeyStore
from webhooks.ssrf import TargetGuard


@dataclass(frozen=True, slots=True)
class WebhookDeps:
    """What the webhook routes and a submit's ``webhook_url`` need: the store's pool and the SSRF guard."""

    pool: asyncpg.Pool
    guard: TargetGuard
    max_per_user: int


@dataclass(frozen=True, slots=True)
class GatewayDeps:
    settings: Settings
    submit: SubmitService
    authenticator: Authenticator  # read by tenancy.http's CallerDep
    cancel: CancelService
    webhooks: WebhookDeps

    @property
    def keys(self) -> KeyStore:
        return self.authenticator.store


# The providers are coroutine functions: FastAPI runs a plain ``def`` dependency in its thread pool, a
# thread hop each per request (12% of the gateway's CPU under load, docs/benchmarks.md).


def get_deps(request: Request) -> GatewayDeps:
    # The submit route reads its services here, not through dependencies: it is the hot path, and its
    # fast path (api_gateway.submit_fast_path) reads the same object from the ASGI scope.
    deps: GatewayDeps = request.app.state.deps
    return deps


async def cancel_of(request: Request) -> CancelService:
    return get_deps(request).cancel


async def authenticator_of(request: Request) -> Authenticator:
    return get_deps(request).authenticator


async def webhooks_of(request: Request) -> WebhookDeps:
    return get_deps(request).webhooks


CancelDep = Annotated[CancelService, Depends(cancel_of)]
AuthenticatorDep = Annotated[Authenticator, Depends(authenticator_of)]
WebhooksDep = Annotated[WebhookDeps, Depends(webhooks_of)]
