"""What the read API's routes depend on, typed: ``Annotated[..., Depends(...)]`` aliases over the lifespan's objects.

The lifespan builds one ``ReadApiDeps`` and stores it on ``app.state``; routes name the part they need
(``pool: PoolDep``) instead of reading untyped ``request.app.state`` attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from mlp.settings import Settings
from projections.queue_position import QueuePositions
from projections.status_cache import StatusCache
from quota.service import QuotaService
from read_api.event_feed import EventFeed
from read_api.terminal_waits import TerminalWaits
from tenancy.authenticator import Authenticator


@dataclass(frozen=True, slots=True)
class ReadApiDeps:
    settings: Settings
    pool: asyncpg.Pool
    status_cache: StatusCache
    terminal_waits: TerminalWaits
    event_feed: EventFeed  # the SSE streams' live feed and their per-caller places
    queue_positions: QueuePositions
    quota: QuotaService
    authenticator: Authenticator  # read by tenancy.http's CallerDep


# Coroutine functions, as the gateway's (api_gateway.deps): a plain ``def`` dependency costs a thread hop.


def get_deps(request: Request) -> ReadApiDeps:
    deps: ReadApiDeps = request.app.state.deps
    return deps


async def settings_of(request: Request) -> Settings:
    return get_deps(request).settings


async def pool_of(request: Request) -> asyncpg.Pool:
    return get_deps(request).pool


async def status_cache_of(request: Request) -> StatusCache:
    return get_deps(request).status_cache


async def terminal_waits_of(request: Request) -> TerminalWaits:
    return get_deps(request).terminal_waits


async def event_feed_of(request: Request) -> EventFeed:
    return get_deps(request).event_feed


async def queue_positions_of(request: Request) -> QueuePositions:
    return get_deps(request).queue_positions


async def quota_of(request: Request) -> QuotaService:
    return get_deps(request).quota


SettingsDep = Annotated[Settings, Depends(settings_of)]
PoolDep = Annotated[asyncpg.Pool, Depends(pool_of)]
StatusCacheDep = Annotated[StatusCache, Depends(status_cache_of)]
TerminalWaitsDep = Annotated[TerminalWaits, Depends(terminal_waits_of)]
EventFeedDep = Annotated[EventFeed, Depends(event_feed_of)]
QueuePositionsDep = Annotated[QueuePositions, Depends(queue_positions_of)]
QuotaDep = Annotated[QuotaService, Depends(quota_of)]
