"""Lua scripts in Redis pipelines: EVALSHA per call, the script loaded again only after NOSCRIPT.

redis-py's own pipelined scripts send ``SCRIPT EXISTS`` before every pipeline, one more round
trip each time. Here a pipeline sends its EVALSHAs straight away; only the calls that meet NOSCRIPT
(Redis restarted, or its script cache was flushed) load their script and run once more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

# A script, its keys and its arguments.
ScriptCall = tuple[AsyncScript, Sequence[Any], Sequence[Any]]


async def evalsha_pipelined(
    client: redis.Redis, calls: Sequence[ScriptCall], *, raise_on_error: bool = True
) -> list[Any]:
    """Run every call in one pipeline; replies in order. With ``raise_on_error=False`` a failed
    call's place holds its error instead of raising."""
    results = await _execute(client, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
            await client.script_load(script.script)
        for i, result in zip(missing, await _execute(client, [calls[i] for i in missing]), strict=True):
            results[i] = result
    if raise_on_error:
        for result in results:
            if isinstance(result, Exception):
                raise result
    return results


async def _execute(client: redis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
