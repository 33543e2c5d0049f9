"""A queued request's place in its model's queue (``queue_position``, 1 = next) and ``eta_s``, from two counters.

Keys, per model, under ``Q = <redis_prefix>queue:<model>:``:

  Q..'tickets'   the model's admission tickets: the gateway's admission takes the next one (INCR) when it
                 writes a request's first status entry, which keeps it (fields ``queue``: Q, ``queue_ticket``)
  Q..'started'   the highest ticket a worker has taken: the worker's reservation moves it up (never down)
  Q..'rate'      hash: ``at`` (ms) of the last move, ``iv`` the EWMA of the milliseconds between starts per
                 ticket, ``idle`` = 1 when that move left no ticket waiting (the next interval then holds
                 idle time, not service time, and is not sampled)

position = ticket - started (at least 1 while the request is queued); eta_s = position * iv, the time
until it starts at the pace the model's workers were measured at. Both are one Redis round trip to read,
and nothing more to write: the ticket rides in the admission's round trip and the watermark in the
reservation's (``STATUS``-side Lua below, composed into ``quota.scripts`` through the status cache's
functions).

How exact: the position counts the model's requests admitted before this one that no worker has taken
yet. Under several gateways the ticket order is the admission order, which can differ a little from the
queue's order; a request a worker holds in its prefetch buffer counts as taken (it is also ``running``
already); a request that leaves the queue without a reservation (cancelled while queued, or dropped)
still counts until a later ticket starts. Bus requests (no gateway admission) take no ticket: their
position and ETA are null, as after a Redis restart (the counters are not rebuilt) or once the status
cache entry is gone (Postgres answers, without a ticket). The ETA is null until two starts were measured
back to back.
"""

from __future__ import annotations

from typing import Final, cast

import redis.asyncio as redis
from redis.exceptions import RedisError

# The counters live as long as a status entry (projections.status_cache.STATUS_TTL_S), refreshed on use.
QUEUE_TTL_S: Final = 86_400
# Weight of the newest interval in the EWMA: about the last ten starts count.
RATE_ALPHA: Final = 0.2

# Lua functions the status cache's functions (and through them the quota scripts) are built with.
QUEUE_LUA_FUNCTIONS: Final = f"""
-- the model's next admission ticket for a new request's status hash, whose field 'queue' names the keys
local function queue_take_ticket(status_key, ttl_s)
  local q = redis.call('HGET', status_key, 'queue')
  if not q then return end
  local ticket = redis.call('INCR', q .. 'tickets')
  -- a fresh sequence (first use, or the counters expired): an old watermark would hide every new ticket
  if ticket == 1 then redis.call('DEL', q .. 'started', q .. 'rate') end
  redis.call('EXPIRE', q .. 'tickets', ttl_s)
  redis.call('HSET', status_key, 'queue_ticket', ticket)
end
-- a worker takes the request: the watermark moves up to its ticket, and the interval since the last move
-- is sampled (per ticket passed) unless the queue was empty in between
local function queue_started(status_key, now_ms)
  if status_key == '' then return end
  local f = redis.call('HMGET', status_key, 'queue', 'queue_ticket')
  if not f[1] or not f[2] then return end
  local q, ticket = f[1], tonumber(f[2])
  local started = tonumber(redis.call('GET', q .. 'started') or '0')
  if ticket <= started then return end
  local now = tonumber(now_ms)
  local r = redis.call('HMGET', q .. 'rate', 'at', 'iv', 'idle')
  if r[1] and r[3] ~= '1' then
    local sample = (now - tonumber(r[1])) / (ticket - started)
    if sample >= 0 then
      if r[2] then sample = {RATE_ALPHA} * sample + {1 - RATE_ALPHA} * tonumber(r[2]) end
      redis.call('HSET', q .. 'rate', 'iv', tostring(sample))
    end
  end
  local idle = '0'
  if ticket >= tonumber(redis.call('GET', q .. 'tickets') or '0') then idle = '1' end
  redis.call('HSET', q .. 'rate', 'at', tostring(now), 'idle', idle)
  redis.call('SET', q .. 'started', ticket, 'EX', {QUEUE_TTL_S})
  redis.call('EXPIRE', q .. 'rate', {QUEUE_TTL_S})
end
"""

# KEYS[1] = the request's status hash -> {ticket, started, iv or false} | nil (no ticket). Strings: Redis
# would truncate a Lua number in a reply to an integer.
_STANDING: Final = """
local f = redis.call('HMGET', KEYS[1], 'queue', 'queue_ticket')
if not f[1] or not f[2] then return nil end
return {f[2], redis.call('GET', f[1] .. 'started') or '0', redis.call('HGET', f[1] .. 'rate', 'iv')}
"""


class QueueKeys:
    def __init__(self, redis_prefix: str) -> None:
        self._prefix = f"{redis_prefix}queue:"

    def of(self, model: str) -> str:
        """The model's queue keys' common prefix (``Q`` above)."""
        return f"{self._prefix}{model}:"


def queue_position(ticket: int, started: int) -> int:
    """1 = next. A ticket at or below the watermark is being taken now (its status not projected yet): 1. Pure."""
    return max(1, ticket - started)


def eta_seconds(position: int, interval_ms: float | None) -> float | None:
    """Seconds until the request starts at the measured pace; None while unmeasured. Pure."""
    if interval_ms is None:
        return None
    return round(position * max(interval_ms, 0.0) / 1000.0, 3)


class QueuePositions:
    """Reads a queued request's standing in one round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self._standing = client.register_script(_STANDING)

    async def standing(self, status_key: str) -> tuple[int, float | None] | None:
        """(queue_position, eta_s) of the request whose status hash is ``status_key``; None without a ticket
        (a bus request, an entry rebuilt by replay) or when Redis cannot answer (the view goes without)."""
        try:
            reply = cast(list[str | None] | None, await self._standing(keys=[status_key]))
        except RedisError:
            return None
        if not reply or reply[0] is None:
            return None
        position = queue_position(int(reply[0]), int(reply[1] or 0))
        interval = float(reply[2]) if reply[2] is not None else None
        return position, eta_seconds(position, interval)
