"""The quota scripts' way to Redis: calls made while a pipeline is on its way go out as the next one.

A gateway admitting 64 requests at once, or a worker reserving for 64 deliveries, would otherwise
make 64 round trips (64 socket writes, 64 reads); pipelined, they are one each. One pipeline is in
flight at a time (group commit, see ``mlp.coalesce``): an idle service's call goes out at once; a
busy service's calls wait for the pipeline ahead of them, about one Redis round trip. Each call still runs
its own script atomically, and gets its own reply or error (``raise_on_error=False``).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.commands.core import AsyncScript

from mlp.coalesce import Coalescer
from mlp.redis_scripts import ScriptCall, evalsha_pipelined

# Calls per pipeline; more wait for the next one (a consumer has at most its prefetch, 200, in hand).
MAX_PIPELINE = 256


class ScriptPipeline:
    def __init__(self, client: redis.Redis, *, max_batch: int = MAX_PIPELINE, max_in_flight: int = 1) -> None:
        self._client = client
        self._coalescer: Coalescer[None, ScriptCall, Any] = Coalescer(
            self._send, max_batch=max_batch, max_in_flight=max_in_flight, name="redis-script-pipeline"
        )

    async def run(self, script: AsyncScript, args: list[Any]) -> Any:
        """EVALSHA ``script`` with ``args`` (no keys: the scripts build theirs from a prefix argument)."""
        return await self._coalescer.call(None, (script, (), args))

    async def _send(self, _: None, calls: list[ScriptCall]) -> list[Any]:
        return await evalsha_pipelined(self._client, calls, raise_on_error=False)
