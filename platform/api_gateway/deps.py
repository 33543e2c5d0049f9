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


def get_deps(request: Request) -> GatewayDeps:
    deps: GatewayDeps = request.app.state.deps
    return deps


def settings_of(request: Request) -> Settings:
    return get_deps(request).settings


def submit_of(request: Request) -> SubmitService:
    return get_deps(request).submit


def cancel_of(request: Request) -> CancelService:
    return get_deps(request).cancel


def keys_of(request: Request) -> KeyStore:
    return get_deps(request).keys


def authenticator_of(request: Request) -> Authenticator:
    return get_deps(request).authenticator


def webhooks_of(request: Request) -> WebhookDeps:
    return get_deps(request).webhooks


SettingsDep = Annotated[Settings, Depends(settings_of)]
SubmitDep = Annotated[SubmitService, Depends(submit_of)]
CancelDep = Annotated[CancelService, Depends(cancel_of)]
KeyStoreDep = Annotated[KeyStore, Depends(keys_of)]
AuthenticatorDep = Annotated[Authenticator, Depends(authenticator_of)]
WebhooksDep = Annotated[WebhookDeps, Depends(webhooks_of)]
