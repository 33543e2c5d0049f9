"""The Redis projection: the request status cache (one hash per request, under the settings' key prefix).

Written by the gateway ("queued", in the admission's round trip; removed again when the publish
fails), by the results collector (every newly stored event) and by replay; read by the read API
first, with Postgres as the fallback and the truth, and by the worker's reservation (is the outcome
already there?). This module owns the cache's keys (:class:`StatusKeys`) and all of its Lua: its
own scripts, and the functions the quota scripts compose (:data:`STATUS_LUA_FUNCTIONS`) so that
the gateway's and the worker's status work rides in the quota round trip they make anyway.

Every live write goes through ONE Lua script that applies the same convergence rules as the
Postgres projection, so redelivery, reordering and replay are harmless:

- ``status`` only advances by rank (``events.status.STATUS_RANK``); a terminal status is final;
- the outcome fields are written only by the write that makes the status terminal;
- ``created_at``/``started_at`` keep the earliest value, ``updated_at`` the latest;
- any other field is filled once (a late ``InferenceRequested`` still fills in ``created_at``).

Hash fields (strings; timestamps ISO-8601 UTC, microsecond precision): user_id, model, status,
created_at, started_at, finished_at, updated_at, completion, embedding (an embed model's answer, a JSON
array), prompt_tokens, completion_tokens, total_tokens, latency_ms, error_code, error_message, reason,
trace_id; and for a request the gateway admitted, queue and queue_ticket (projections.queue_position).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, cast

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from events.model import (
    Event,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
)
from events.status import STATUS_RANK, TERMINAL_STATUSES, status_of
from mlp.redis_scripts import evalsha_pipelined
from projections.queue_position import QUEUE_LUA_FUNCTIONS, QueueKeys

_json = msgspec.json.Encoder()
# How long a request's entry lives (Postgres answers after that).
STATUS_TTL_S: Final = 86_400
TIMESTAMP_FIELDS: Final = ("created_at", "started_at", "finished_at", "updated_at")
EARLIEST_FIELDS: Final = ("created_at", "started_at")
LATEST_FIELDS: Final = ("updated_at",)
OUTCOME_FIELDS: Final = (
    "finished_at",
    "completion",
    "embedding",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "latency_ms",
    "error_code",
    "error_message",
    "reason",
)


class StatusKeys:
    """The status cache's Redis names, under the platform's key prefix."""

    def __init__(self, redis_prefix: str) -> None:
        self.prefix = redis_prefix
        self._status = f"{redis_prefix}status:"

    def status(self, request_id: str) -> str:
        """The request's hash."""
        return self._status + request_id

    def request_id_of(self, status_key: str) -> str:
        return status_key.removeprefix(self._status)

    def pattern(self) -> str:
        """Every request's hash (for SCAN)."""
        return self._status + "*"

    @property
    def terminal_channel(self) -> str:
        """Pub/sub channel: the status key of each request the moment it becomes terminal."""
        return self.prefix + "status-terminal"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: the request id of each running request a cancel was asked for (its worker,
        subscribed, cancels the Triton call; quota.scripts.CANCEL publishes it)."""
        return self.prefix + "cancel-running"


@dataclass(frozen=True, slots=True)
class QueuedStatus:
    """A new request's first entry, for ``status_put_queued``: its hash key, TTL and flat field/value pairs."""

    key: str
    ttl_s: int
    fields: Sequence[str]


def format_ts(value: datetime) -> str:
    """ISO-8601 in UTC with a fixed width, so that string order is time order (the script compares strings)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def parse_ts(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def cache_update(event: Event) -> tuple[str, str, dict[str, str]]:
    """(request_id, status, fields) an event writes to the status cache. Pure."""
    fields = {"user_id": event.user_id, "model": event.model, "updated_at": format_ts(event.occurred_at)}
    match event:
        case InferenceRequested():
            fields["created_at"] = format_ts(event.occurred_at)
            if event.trace_id:
                fields["trace_id"] = event.trace_id
        case InferenceStarted():
            fields["started_at"] = format_ts(event.occurred_at)
        case InferenceCompleted():
            fields["finished_at"] = format_ts(event.occurred_at)
            fields["completion"] = event.completion
            if event.embedding is not None:
                fields["embedding"] = _json.encode(event.embedding).decode()
            fields["prompt_tokens"] = str(event.prompt_tokens)
            fields["completion_tokens"] = str(event.completion_tokens)
            fields["total_tokens"] = str(event.total_tokens)
            fields["latency_ms"] = repr(event.latency_ms)
        case InferenceFailed():
            fields["finished_at"] = format_ts(event.occurred_at)
            fields["error_code"] = event.error_code
            fields["error_message"] = event.error_message
        case InferenceRejected():
            fields["finished_at"] = format_ts(event.occurred_at)
            fields["reason"] = event.reason
            fields["error_message"] = event.detail
        case InferenceCancelled() | InferenceExpired():
            fields["finished_at"] = format_ts(event.occurred_at)
            fields["error_code"] = status_of(event)
            fields["error_message"] = event.detail
            if event.started_at is not None:
                fields["started_at"] = format_ts(event.started_at)
    return event.request_id, status_of(event), fields


def _lua_set(names: Sequence[str]) -> str:
    return "{" + ", ".join(f"[{n!r}] = true" for n in names) + "}"


def _lua_ranks() -> str:
    return "{" + ", ".join(f"[{s!r}] = {r}" for s, r in STATUS_RANK.items()) + "}"


# The rule tables are generated from the Python constants: one source of truth for the ranks.
_PRELUDE = f"""
local rank = {_lua_ranks()}
local terminal = {_lua_set(sorted(TERMINAL_STATUSES))}
"""

# Functions the quota scripts (quota.scripts) put in front of theirs: the worker's redelivery check and
# the gateway's first entry run inside the quota script's own round trip. Keys come in ARGV there.
STATUS_LUA_FUNCTIONS: Final = (
    QUEUE_LUA_FUNCTIONS
    + f"""
local status_terminal = {_lua_set(sorted(TERMINAL_STATUSES))}
-- true when the request's hash holds a terminal status
local function status_is_terminal(key)
  local status = redis.call('HGET', key, 'status')
  return status ~= false and status_terminal[status] == true
end
-- a new request's first entry: 'queued', then the field/value pairs ARGV[first..]; never over an
-- existing entry (a fresh request id, so there is no rank to respect yet). With a 'queue' field, the
-- request takes its model's next admission ticket (projections.queue_position).
local function status_put_queued(key, ttl_s, first)
  if redis.call('EXISTS', key) == 1 then return end
  redis.call('HSET', key, 'status', 'queued')
  for i = first, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
  queue_take_ticket(key, ttl_s)
  redis.call('EXPIRE', key, ttl_s)
end
"""
)

# KEYS[1] = the hash, KEYS[2] = the channel announcing terminal states (long-polls wait on it);
# ARGV = status, ttl_s, then field/value pairs. Returns 1 when anything changed.
_ADVANCE = (
    _PRELUDE
    + f"""
local earliest = {_lua_set(EARLIEST_FIELDS)}
local latest = {_lua_set(LATEST_FIELDS)}
local outcome = {_lua_set(OUTCOME_FIELDS)}
local key, status = KEYS[1], ARGV[1]
if rank[status] == nil then return redis.error_reply('unknown status ' .. status) end
local current = redis.call('HGET', key, 'status')
local moves = (not current) or (not terminal[current] and rank[status] > rank[current])
local changed = 0
if moves then
  redis.call('HSET', key, 'status', status)
  changed = 1
end
for i = 3, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if outcome[field] then
    if moves then redis.call('HSET', key, field, value); changed = 1 end
  elseif earliest[field] or latest[field] then
    local old = redis.call('HGET', key, field)
    if (not old) or (earliest[field] and value < old) or (latest[field] and value > old) then
      redis.call('HSET', key, field, value)
      changed = 1
    end
  else
    changed = math.max(changed, redis.call('HSETNX', key, field, value))
  end
end
if changed == 1 then redis.call('EXPIRE', key, tonumber(ARGV[2])) end
if moves and terminal[status] then redis.call('PUBLISH', KEYS[2], key) end
return changed
"""
)

# Replay's write: replace the whole hash with the rebuilt state, unless a live writer has meanwhile
# moved the request to a higher rank. KEYS[1] = the hash; ARGV = status, ttl_s, field/value pairs.
_RESTORE = (
    _PRELUDE
    + """
local key, status = KEYS[1], ARGV[1]
local current = redis.call('HGET', key, 'status')
if current and rank[current] > rank[status] then return 0 end
redis.call('DEL', key)
redis.call('HSET', key, 'status', status)
for i = 3, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', key, tonumber(ARGV[2]))
return 1
"""
)


def _normalised(fields: Mapping[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        if name == "status":
            continue  # the status is an argument of its own, ruled by rank
        if name in TIMESTAMP_FIELDS:
            value = format_ts(parse_ts(value))
        flat += [name, value]
    return flat


class StatusCacheUnavailable(Exception):
    """Redis cannot answer now (down or restarting): readers fall back to Postgres, the truth."""


class StatusCache:
    """The request status cache. Every method is idempotent; ``advance`` never moves a status backwards."""

    def __init__(self, redis: redis.Redis, keys: StatusKeys, ttl_s: int = STATUS_TTL_S) -> None:
        self._redis = redis
        self._keys = keys
        self._queue_keys = QueueKeys(keys.prefix)
        self._ttl_s = ttl_s
        self._advance = redis.register_script(_ADVANCE)
        self._restore = redis.register_script(_RESTORE)

    async def advance(self, request_id: str, status: str, fields: Mapping[str, str]) -> bool:
        """Write status and fields if the status advances (fields fill in otherwise). True if anything changed."""
        changed = await self._advance(
            keys=[self._keys.status(request_id), self.terminal_channel],
            args=[status, self._ttl_s, *_normalised(fields)],
        )
        return bool(changed)

    @property
    def terminal_channel(self) -> str:
        """Pub/sub channel: the status key of each request the moment it becomes terminal."""
        return self._keys.terminal_channel

    def request_id_of(self, status_key: str) -> str:
        return self._keys.request_id_of(status_key)

    def status_key(self, request_id: str) -> str:
        """The request's hash."""
        return self._keys.status(request_id)

    def queued(self, event: InferenceRequested) -> QueuedStatus:
        """The request's first entry, for the admission to write (``status_put_queued``) when it admits. Pure."""
        _, _, fields = cache_update(event)
        fields["queue"] = self._queue_keys.of(event.model)  # the admission takes a ticket in this queue
        flat = [part for pair in fields.items() for part in pair]
        return QueuedStatus(self._keys.status(event.request_id), self._ttl_s, flat)

    async def forget(self, request_id: str) -> None:
        """Remove the request's entry (the gateway's, when the broker did not confirm the publish)."""
        await self._redis.delete(self._keys.status(request_id))

    async def get(self, request_id: str) -> dict[str, str] | None:
        """The request's entry, or None; ``StatusCacheUnavailable`` when Redis cannot answer."""
        try:
            # The client decodes responses (mlp.cache.create_redis): keys and values are str.
            found = cast(dict[str, str], await self._redis.hgetall(self._keys.status(request_id)))
        except RedisError as exc:
            raise StatusCacheUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        return found or None

    async def advance_many(self, items: Sequence[tuple[str, str, Mapping[str, str]]]) -> None:
        """``advance`` for many requests in one pipelined round trip (no ``SCRIPT EXISTS`` ahead of it)."""
        if not items:
            return
        channel = self.terminal_channel
        await evalsha_pipelined(
            self._redis,
            [
                (self._advance, (self._keys.status(request_id), channel), (status, self._ttl_s, *_normalised(fields)))
                for request_id, status, fields in items
            ],
        )

    async def restore_many(self, items: Sequence[tuple[str, Mapping[str, str]]]) -> int:
        """Replace entries with rebuilt state (replay; ``fields`` hold ``status``). Returns how many were written."""
        if not items:
            return 0
        written = await evalsha_pipelined(
            self._redis,
            [
                (self._restore, (self._keys.status(request_id),), (fields["status"], self._ttl_s, *_normalised(fields)))
                for request_id, fields in items
            ],
        )
        return sum(int(w) for w in written)
