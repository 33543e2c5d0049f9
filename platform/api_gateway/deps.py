"""What the gateway's routes depend on, typed: ``Annotated[..., Depends(...)]`` aliases over the lifespan's objects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api_gateway.submit import SubmitService
from mlp.settings import Settings


@dataclass(frozen=True, slots=True)
class GatewayDeps:
    settings: Settings
    submit: SubmitService
    api_keys: Mapping[str, str]


def get_deps(request: Request) -> GatewayDeps:
    deps: GatewayDeps = request.app.state.deps
    return deps


def settings_of(request: Request) -> Settings:
    return get_deps(request).settings


def submit_of(request: Request) -> SubmitService:
    return get_deps(request).submit


def api_keys_of(request: Request) -> Mapping[str, str]:
    return get_deps(request).api_keys


SettingsDep = Annotated[Settings, Depends(settings_of)]
SubmitDep = Annotated[SubmitService, Depends(submit_of)]
ApiKeysDep = Annotated[Mapping[str, str], Depends(api_keys_of)]
