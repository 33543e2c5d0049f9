"""The quota ledger's Redis Lua scripts (each one runs atomically; loaded once, called by EVALSHA).

Key layout under ``P = <settings.redis_prefix>quota:`` (built inside the scripts from ARGV[1], so
this targets a standalone Redis or one shard, which is what the platform runs):

  P..'built'                 marker: the counters were built from the Postgres ledger (no TTL)
  P..'rebuild-lock'          SET NX lock held while one process rebuilds
  P..'rq:'..request_id       hash: s=state (reserved|committed|refused|released), u=user, t=reserved
                             tokens, e=reservation expiry (ms), c=charged tokens, l=refused limit
  P..'rz:'..user             sorted set: request_id scored by reservation expiry (ms)
  P..'ra:'..user             hash: request_id -> reserved tokens
  P..'rs:'..user             the sum of the user's live reservations
  P..'ud:'..user..':'..day   tokens used in a UTC day window   (day = 2025-01-31)
  P..'um:'..user..':'..month tokens used in a UTC month window (month = 2025-01)
  P..'rpm:'..user            sorted set: admitted requests of the last 60 s (sliding window)

Reservations are per user, not per window: an open reservation will be charged to whichever window
it commits in, so it counts against both the day and the month budget until then. Every script
first purges the user's expired reservations (a dead worker's hold never leaks) and refuses to
run until the ``built`` marker exists (nothing is admitted before a rebuild after a Redis restart).

The clock comes from the caller (ARGV), never from Redis, so windows follow the injected clock;
TTLs are relative (PEXPIRE), so they stay right whatever the caller's clock says.
"""

from __future__ import annotations

from typing import Final

from projections.status_cache import STATUS_LUA_FUNCTIONS

_PRELUDE: Final = r"""
local P = ARGV[1]
local function num(v)
  if v then return tonumber(v) end
  return 0
end
local function get_num(key)
  return num(redis.call('GET', key))
end
local function built()
  return redis.call('EXISTS', P .. 'built') == 1
end

-- Drop the user's reservations whose expiry <= now; returns the user's live reserved sum.
local function purge(user, now)
  local z, a, s = P .. 'rz:' .. user, P .. 'ra:' .. user, P .. 'rs:' .. user
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  local n = #expired
  if n > 0 then
    local freed = 0
    for i = 1, n, 500 do
      local chunk = {}
      for j = i, math.min(i + 499, n) do chunk[#chunk + 1] = expired[j] end
      local amounts = redis.call('HMGET', a, unpack(chunk))
      for j = 1, #chunk do freed = freed + num(amounts[j]) end
      redis.call('HDEL', a, unpack(chunk))
      redis.call('ZREM', z, unpack(chunk))
    end
    if redis.call('DECRBY', s, freed) <= 0 then redis.call('DEL', s) end
  end
  return get_num(s)
end

-- Remove one live reservation; returns the tokens it held (0 when it was not live).
local function drop(user, rid)
  local z, a, s = P .. 'rz:' .. user, P .. 'ra:' .. user, P .. 'rs:' .. user
  if redis.call('ZREM', z, rid) == 0 then return 0 end
  local held = num(redis.call('HGET', a, rid))
  redis.call('HDEL', a, rid)
  if redis.call('DECRBY', s, held) <= 0 then redis.call('DEL', s) end
  return held
end

-- Add a live reservation; the user's three reservation keys expire after the latest one.
local function hold(user, rid, tokens, exp, now, grace)
  local z, a, s = P .. 'rz:' .. user, P .. 'ra:' .. user, P .. 'rs:' .. user
  redis.call('ZADD', z, exp, rid)
  redis.call('HSET', a, rid, tokens)
  redis.call('INCRBY', s, tokens)
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  local ttl = math.max(1, tonumber(last[2]) - now + grace)
  redis.call('PEXPIRE', z, ttl)
  redis.call('PEXPIRE', a, ttl)
  redis.call('PEXPIRE', s, ttl)
end

local function charge(user, tokens, day_id, month_id, day_ttl, month_ttl)
  local d = P .. 'ud:' .. user .. ':' .. day_id
  local m = P .. 'um:' .. user .. ':' .. month_id
  redis.call('INCRBY', d, tokens)
  redis.call('EXPIRE', d, day_ttl)
  redis.call('INCRBY', m, tokens)
  redis.call('EXPIRE', m, month_ttl)
end
"""

# ARGV: P, request_id, user, tokens, now_ms, expires_ms, day_id, month_id, day_limit, month_limit,
#       grace_ms, refused_ttl_ms, status_key ('' = none)
# -> {'FINISHED'} | {'GRANTED', tokens} | {'ALREADY', tokens} | {'COMMITTED', charged}
#    | {'REFUSED', limit} | {'NOT_BUILT'}
# status_key: the request's status-cache hash; when it already holds a terminal status the request
# needs no work and no quota (FINISHED): the worker's redelivery check, in the round trip it makes anyway
# (the check is the status cache's own function, projections.status_cache.STATUS_LUA_FUNCTIONS).
RESERVE: Final = (
    _PRELUDE
    + STATUS_LUA_FUNCTIONS
    + r"""
if ARGV[13] and ARGV[13] ~= '' and status_is_terminal(ARGV[13]) then return {'FINISHED'} end
if not built() then return {'NOT_BUILT'} end
local rid, user, tokens = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now, exp, grace = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[11])
local rec = P .. 'rq:' .. rid
local st = redis.call('HMGET', rec, 's', 't', 'c', 'l', 'u')
if st[1] == 'committed' then return {'COMMITTED', st[3]} end
if st[1] == 'refused' then return {'REFUSED', st[4]} end
if st[1] == 'reserved' then
  -- the record keeps the user of the first reservation (the request's user never changes)
  purge(st[5], now)
  if redis.call('ZSCORE', P .. 'rz:' .. st[5], rid) then return {'ALREADY', st[2]} end
end
local reserved = purge(user, now)
local used_m = get_num(P .. 'um:' .. user .. ':' .. ARGV[8])
local used_d = get_num(P .. 'ud:' .. user .. ':' .. ARGV[7])
local limit = nil
-- the month first: when both are spent, the month's reset is the one worth waiting for
if used_m + reserved + tokens > tonumber(ARGV[10]) then
  limit = 'tokens_per_month'
elseif used_d + reserved + tokens > tonumber(ARGV[9]) then
  limit = 'tokens_per_day'
end
if limit then
  redis.call('HSET', rec, 's', 'refused', 'u', user, 'l', limit, 't', ARGV[4])
  redis.call('PEXPIRE', rec, ARGV[12])
  return {'REFUSED', limit}
end
hold(user, rid, ARGV[4], ARGV[6], now, grace)
redis.call('DEL', rec)
redis.call('HSET', rec, 's', 'reserved', 'u', user, 't', ARGV[4], 'e', ARGV[6])
redis.call('PEXPIRE', rec, math.max(1, exp - now + grace))
return {'GRANTED', ARGV[4]}
"""
)

# ARGV: P, request_id, actual_tokens, now_ms, day_id, month_id, day_ttl_s, month_ttl_s,
#       committed_ttl_ms, fallback_user ('' = none)
# -> {'COMMITTED', charged, released_hold} | {'ALREADY', charged} | {'UNKNOWN'} | {'NOT_BUILT'}
COMMIT: Final = (
    _PRELUDE
    + r"""
if not built() then return {'NOT_BUILT'} end
local rid, now = ARGV[2], tonumber(ARGV[4])
local rec = P .. 'rq:' .. rid
local st = redis.call('HMGET', rec, 's', 'u', 'c')
if st[1] == 'committed' then return {'ALREADY', st[3]} end
local user = st[2]
if not user then
  -- the reservation is gone (expired long ago, or never made): the tokens were still spent
  if ARGV[10] == '' then return {'UNKNOWN'} end
  user = ARGV[10]
end
purge(user, now)
local held = 0
if st[1] == 'reserved' then held = drop(user, rid) end
charge(user, ARGV[3], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
redis.call('DEL', rec)
redis.call('HSET', rec, 's', 'committed', 'u', user, 'c', ARGV[3])
redis.call('PEXPIRE', rec, ARGV[9])
return {'COMMITTED', ARGV[3], held}
"""
)

# ARGV: P, request_id, now_ms, released_ttl_ms
# -> {'RELEASED', freed} | {'COMMITTED'} | {'NONE'} | {'NOT_BUILT'}
RELEASE: Final = (
    _PRELUDE
    + r"""
if not built() then return {'NOT_BUILT'} end
local rid, now = ARGV[2], tonumber(ARGV[3])
local rec = P .. 'rq:' .. rid
local st = redis.call('HMGET', rec, 's', 'u')
if st[1] == 'committed' then return {'COMMITTED'} end
if st[1] ~= 'reserved' then return {'NONE'} end
purge(st[2], now)
local freed = drop(st[2], rid)
redis.call('HSET', rec, 's', 'released')
redis.call('PEXPIRE', rec, ARGV[4])
return {'RELEASED', freed}
"""
)

# ARGV: P, user, now_ms, day_id, month_id -> {'OK', used_day, used_month, reserved} | {'NOT_BUILT'}
SNAPSHOT: Final = (
    _PRELUDE
    + r"""
if not built() then return {'NOT_BUILT'} end
local user = ARGV[2]
local reserved = purge(user, tonumber(ARGV[3]))
return {'OK', get_num(P .. 'ud:' .. user .. ':' .. ARGV[4]),
        get_num(P .. 'um:' .. user .. ':' .. ARGV[5]), reserved}
"""
)

# The gateway's check: could max_tokens still fit (used + reserved + max_tokens <= limit), and the
# requests-per-minute sliding window; a request is logged in the window only when admitted.
# ARGV: P, user, now_ms, day_id, month_id, day_limit, month_limit, want, rpm_limit,
#       status_key ('' = none), status_ttl_s, then the status hash's field/value pairs
# -> {'OK'} | {'REFUSED', limit, retry_ms, used, reserved} | {'NOT_BUILT'}
# status_key: on OK, the new request's status-cache entry is written as 'queued' in the same round trip
# (the gateway's first status, written by the status cache's own function, STATUS_LUA_FUNCTIONS).
ADMIT: Final = (
    _PRELUDE
    + STATUS_LUA_FUNCTIONS
    + r"""
if not built() then return {'NOT_BUILT'} end
local user, now, want = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[8])
local reserved = purge(user, now)
local used_m = get_num(P .. 'um:' .. user .. ':' .. ARGV[5])
if used_m + reserved + want > tonumber(ARGV[7]) then
  return {'REFUSED', 'tokens_per_month', 0, used_m, reserved}
end
local used_d = get_num(P .. 'ud:' .. user .. ':' .. ARGV[4])
if used_d + reserved + want > tonumber(ARGV[6]) then
  return {'REFUSED', 'tokens_per_day', 0, used_d, reserved}
end
local r = P .. 'rpm:' .. user
redis.call('ZREMRANGEBYSCORE', r, '-inf', now - 60000)
local count = redis.call('ZCARD', r)
if count >= tonumber(ARGV[9]) then
  local oldest = redis.call('ZRANGE', r, 0, 0, 'WITHSCORES')
  local wait = 60000
  if oldest[2] then wait = tonumber(oldest[2]) + 60000 - now end
  return {'REFUSED', 'requests_per_minute', wait, count, 0}
end
local seq_key = P .. 'rpmseq:' .. user
local seq = redis.call('INCR', seq_key)
redis.call('PEXPIRE', seq_key, 61000)
redis.call('ZADD', r, ARGV[3], ARGV[3] .. '-' .. seq)
redis.call('PEXPIRE', r, 61000)
if ARGV[10] and ARGV[10] ~= '' then status_put_queued(ARGV[10], tonumber(ARGV[11]), 12) end
return {'OK'}
"""
)

# Sets the marker only while the caller still holds the rebuild lock. ARGV: P, lock_token, built_value
# Rebuild: the committed records of many requests in one call (per request ARGV: request_id, user,
# charged tokens, remaining TTL in ms). One command per 1,000 requests instead of two each: a day's
# records are restored in seconds, not minutes. ARGV: P, then the groups of four.
RESTORE_COMMITTED: Final = r"""
local P = ARGV[1]
for i = 2, #ARGV - 3, 4 do
  local rec = P .. 'rq:' .. ARGV[i]
  redis.call('HSET', rec, 's', 'committed', 'u', ARGV[i + 1], 'c', ARGV[i + 2])
  redis.call('PEXPIRE', rec, ARGV[i + 3])
end
return (#ARGV - 1) / 4
"""

FINISH_REBUILD: Final = r"""
local P = ARGV[1]
if redis.call('GET', P .. 'rebuild-lock') ~= ARGV[2] then return 0 end
redis.call('SET', P .. 'built', ARGV[3])
redis.call('DEL', P .. 'rebuild-lock')
return 1
"""

# Compare-and-delete of the rebuild lock (never delete a lock another process took over). ARGV: P, token
RELEASE_LOCK: Final = r"""
if redis.call('GET', ARGV[1] .. 'rebuild-lock') == ARGV[2] then
  return redis.call('DEL', ARGV[1] .. 'rebuild-lock')
end
return 0
"""
