"""Pipelined scripts against the real Redis: concurrent calls share one pipeline, each keeps its own reply,
and a flushed script cache is loaded again (ScriptPipeline, evalsha_pipelined, the status cache)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as redis
from redis.exceptions import ResponseError

from mlp.redis_scripts import evalsha_pipelined
from mlp.settings import Settings
from projections.status_cache import StatusCache, StatusKeys
from quota.script_pipeline import ScriptPipeline

pytestmark = pytest.mark.integration

KEYED = """
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return redis.call('INCRBY', KEYS[1], tonumber(ARGV[1]))
"""

# Increments a counter under the prefix; fails when asked to.
SCRIPT = """
if ARGV[2] == 'fail' then return redis.error_reply('asked to fail') end
return redis.call('INCRBY', ARGV[1] .. 'pipeline-counter', tonumber(ARGV[2]))
"""


class CountingPipelines:
    """Counts the pipelines a real client opens (the thing under test is how many there are)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.opened = 0
        self._pipeline = client.pipeline

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.opened += 1
        return self._pipeline(*args, **kwargs)


async def test_concurrent_calls_share_one_pipeline_and_get_their_own_replies(
    client: redis.Redis, migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"{migrated.redis_prefix}sp1:"
    counting = CountingPipelines(client)
    monkeypatch.setattr(client, "pipeline", counting)
    script = client.register_script(SCRIPT)
    await client.script_load(SCRIPT)  # else the first pipeline meets NOSCRIPT and a second one retries
    pipeline = ScriptPipeline(client)

    replies = await asyncio.gather(
        *(pipeline.run(script, [prefix, "fail" if i == 7 else 1]) for i in range(50)), return_exceptions=True
    )

    assert counting.opened == 1
    assert isinstance(replies[7], ResponseError)
    assert "asked to fail" in str(replies[7])
    counts = sorted(r for r in replies if isinstance(r, int))
    assert counts == list(range(1, 50))  # every other call ran, once, atomically
    assert await client.get(f"{prefix}pipeline-counter") == "49"


async def test_scripts_flushed_from_redis_are_loaded_again(client: redis.Redis, migrated: Settings) -> None:
    prefix = f"{migrated.redis_prefix}sp2:"
    script = client.register_script(SCRIPT)
    pipeline = ScriptPipeline(client)
    assert await pipeline.run(script, [prefix, 2]) == 2
    await client.script_flush()  # what a restarted Redis looks like to a client
    assert list(await asyncio.gather(pipeline.run(script, [prefix, 3]), pipeline.run(script, [prefix, 4]))) == [5, 9]


async def test_pipelined_scripts_take_keys_raise_the_first_error_and_survive_a_flush(
    client: redis.Redis, migrated: Settings
) -> None:
    script = client.register_script(KEYED)
    key = f"{migrated.redis_prefix}sp3:counter"
    await client.script_flush()
    assert await evalsha_pipelined(client, [(script, (key,), (2,)), (script, (key,), (3,))]) == [2, 5]
    with pytest.raises(ResponseError, match="asked to fail"):
        await evalsha_pipelined(client, [(script, (key,), (1,)), (script, (key,), ("fail",))])
    assert await client.get(key) == "6"  # the call before the failing one ran


async def test_the_status_cache_writes_batches_after_its_scripts_were_flushed(
    client: redis.Redis, migrated: Settings
) -> None:
    cache = StatusCache(client, StatusKeys(f"{migrated.redis_prefix}sp4:"))
    await client.script_flush()  # what a restarted Redis looks like to the collector
    await cache.advance_many([("r-1", "queued", {"user_id": "u"}), ("r-2", "completed", {"user_id": "u"})])
    assert (await cache.get("r-1") or {}).get("status") == "queued"
    assert (await cache.get("r-2") or {}).get("status") == "completed"
