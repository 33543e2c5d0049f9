"""The quota ledger's Redis Lua scripts (each one runs atomically; loaded once, called by EVALSHA).

Key layout under ``P = <settings.redis_prefix>quota:`` (built inside the scripts from ARGV[1], so
this targets a standalone Redis or one shard, which is what the platform runs):

  P..'built'                 marker: the counters were built from the Postgres ledger (no TTL)
  P..'rebuild-lock'          SET NX lock held while one process rebuilds (renewed while it runs; every write of
                             the rebuild checks that it still holds it: the FENCED scripts)
  P..'ledger-snapshot'       the last rebuild's Postgres snapshot (quota.store.LedgerSnapshot), kept as long as
                             a committed record lives: while it exists, a request without a record may have been
                             charged before Redis lost its data, and RESERVE and COMMIT answer VERIFY (the caller
                             asks the ledger, then ADOPT_COMMITTED records the charge, or it calls again, verified)
  P..'rq:'..request_id       hash: the request's claim and reservation (docs/bus.md, "Request identity"):
                             s=state (admitted|claimed|reserved|committed|released|refused), u=owner (user),
                             x=a cancel was asked for while it was reserved (CANCEL),
                             ev=claiming event_id, dg=content digest (events.request_rules.request_digest;
                             absent on records rebuilt from the ledger), t=reserved tokens, e=reservation
                             expiry (ms), c=charged tokens, l=refused limit or reason, o=the outcome event
                             (encoded, bounded) of a committed or released request
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

The claim: the first message that names a request id owns it. The gateway's admission claims its
request before publishing it (state ``admitted``); the worker's reservation claims a bus request.
A later message naming the same id is the same request only when it comes from the same owner with
the same event_id and the same content digest (a redelivery); anything else is a CONFLICT, answered
to its publisher alone. A claim lives as long as a committed record (the caller's claim TTL), in
every state, so a request that ended never runs again within that time: a committed or released one
answers DONE with the outcome it ended with (republished as it was), a refused one REFUSED again.
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

-- The requests-per-minute sliding window (the gateway's admission and the worker's bus requests share it):
-- true when one more request fits, which is then logged; else false and the ms until the oldest leaves.
local function rpm_take(user, now_ms, limit)
  local now = tonumber(now_ms)
  local r = P .. 'rpm:' .. user
  redis.call('ZREMRANGEBYSCORE', r, '-inf', now - 60000)
  local count = redis.call('ZCARD', r)
  if count >= limit then
    local oldest = redis.call('ZRANGE', r, 0, 0, 'WITHSCORES')
    local wait = 60000
    if oldest[2] then wait = tonumber(oldest[2]) + 60000 - now end
    return false, wait, count
  end
  local seq_key = P .. 'rpmseq:' .. user
  local seq = redis.call('INCR', seq_key)
  redis.call('PEXPIRE', seq_key, 61000)
  redis.call('ZADD', r, now_ms, now_ms .. '-' .. seq)
  redis.call('PEXPIRE', r, 61000)
  return true, 0, count
end

-- A rebuild's snapshot is kept: a request without a record may have been charged before the rebuild
-- (the ledger knows, not Redis): the caller asks it first (VERIFY), then calls again, verified.
local function unverified()
  local snap = redis.call('GET', P .. 'ledger-snapshot')
  if snap then return {'VERIFY', snap} end
  return nil
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

# The claim check every script that answers for a request makes first. HMGET's fields:
# 1 s, 2 u, 3 ev, 4 dg, 5 l, 6 o, 7 t, 8 c. Returns the answer to give back at once, or nil when the
# caller may go on (no claim yet, the gateway's admitted claim of this very request, or this request's
# own reservation), and the record's fields.
_CLAIM_FUNCTIONS: Final = r"""
local function claim_check(rec, user, ev, dg, status_key)
  local st = redis.call('HMGET', rec, 's', 'u', 'ev', 'dg', 'l', 'o', 't', 'c')
  local owner = st[2]
  if not owner and status_key ~= '' then
    -- no claim record (expired, or lost with a rebuild): the status cache still knows whose request it is
    owner = redis.call('HGET', status_key, 'user_id')
  end
  if owner and owner ~= user then return {'CONFLICT'}, st end
  if st[1] then
    -- dg is absent on records rebuilt from the ledger (and '' from callers without a claim): the owner's
    -- message is then taken for the request itself
    if st[4] and st[4] ~= '' and (st[3] ~= ev or st[4] ~= dg) then return {'CONFLICT'}, st end
    if st[1] == 'committed' or st[1] == 'released' then
      return {'DONE', st[1], st[8] or '0', st[6] or ''}, st
    end
    if st[1] == 'refused' then return {'REFUSED', st[5] or 'quota', 0}, st end
  end
  if status_key ~= '' and status_is_terminal(status_key) then return {'FINISHED'}, st end
  return nil, st
end

local function claim_refuse(rec, user, why, ev, dg, ttl)
  redis.call('DEL', rec)
  redis.call('HSET', rec, 's', 'refused', 'u', user, 'l', why, 'ev', ev, 'dg', dg)
  redis.call('PEXPIRE', rec, ttl)
end
"""

# ARGV: P, request_id, user, tokens, now_ms, expires_ms, day_id, month_id, day_limit, month_limit,
#       grace_ms, claim_ttl_ms, status_key ('' = none), event_id, digest, refusal ('' = none),
#       rpm_limit ('' = this caller does not count requests), verified ('' = not yet: see VERIFY)
# -> {'GRANTED', tokens} | {'ALREADY', tokens} | {'DONE', state, charged, outcome} | {'FINISHED'}
#    | {'REFUSED', limit_or_reason, retry_ms} | {'CONFLICT'} | {'VERIFY', snapshot} | {'CANCELLING', tokens}
#    | {'NOT_BUILT'}
# CANCELLING: the request holds a reservation and a cancel was asked for meanwhile (CANCEL's mark): the
# redelivery of a request whose worker was running it must end it cancelled, not run it again.
# The claim first (claim_check). status_key: the request's status-cache hash; a terminal status there
# means the request needs no work and no quota (FINISHED): the worker's redelivery check, in the round
# trip it makes anyway (the status cache's own function, projections.status_cache.STATUS_LUA_FUNCTIONS).
# refusal: the request breaks a request rule (the caller's check): the claim is recorded as refused.
# rpm_limit: a new claim (not one the gateway admitted, which counted it) takes a place in the
# requests-per-minute window, after the token limits, as the admission does.
RESERVE: Final = (
    _PRELUDE
    + STATUS_LUA_FUNCTIONS
    + _CLAIM_FUNCTIONS
    + r"""
if not built() then return {'NOT_BUILT'} end
local rid, user, tokens = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now, exp, grace = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[11])
local claim_ttl, ev, dg = ARGV[12], ARGV[14], ARGV[15]
local rec = P .. 'rq:' .. rid
local answer, st = claim_check(rec, user, ev, dg, ARGV[13])
if answer then return answer end
queue_started(ARGV[13], ARGV[5])  -- taken off its model's queue (projections.queue_position)
-- a cancel was asked for while it ran (CANCEL's mark): a redelivery ends it cancelled, never runs it again
if st[1] == 'reserved' and redis.call('HEXISTS', rec, 'x') == 1 then return {'CANCELLING', st[7] or '0'} end
if st[1] == 'reserved' then
  purge(user, now)
  if redis.call('ZSCORE', P .. 'rz:' .. user, rid) then return {'ALREADY', st[7] or '0'} end
end
if ARGV[18] == '' and (not st[1] or st[1] == 'claimed') then
  local answer = unverified()
  if answer then return answer end
end
-- already in the requests-per-minute window: admitted by the gateway, or reserved before (its hold expired)
local counted = st[1] == 'admitted' or st[1] == 'reserved'
if ARGV[16] ~= '' then
  claim_refuse(rec, user, ARGV[16], ev, dg, claim_ttl)
  return {'REFUSED', ARGV[16], 0}
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
  claim_refuse(rec, user, limit, ev, dg, claim_ttl)
  return {'REFUSED', limit, 0}
end
if ARGV[17] ~= '' and not counted then
  local fits, wait = rpm_take(user, ARGV[5], tonumber(ARGV[17]))
  if not fits then
    claim_refuse(rec, user, 'requests_per_minute', ev, dg, claim_ttl)
    return {'REFUSED', 'requests_per_minute', wait}
  end
end
hold(user, rid, ARGV[4], ARGV[6], now, grace)
redis.call('DEL', rec)
redis.call('HSET', rec, 's', 'reserved', 'u', user, 't', ARGV[4], 'e', ARGV[6], 'ev', ev, 'dg', dg)
redis.call('PEXPIRE', rec, claim_ttl)
return {'GRANTED', ARGV[4]}
"""
)

# ARGV: P, request_id, user, claim_ttl_ms, status_key ('' = none), event_id, digest
# -> {'MINE'} | {'CONFLICT'} | {'NOT_BUILT'}
# The collector's claim, before it stores an InferenceRequested: the same claim_check as RESERVE, so the
# stream's owner in Postgres is always the claim's owner (whichever of collector and worker sees the
# message first). A new claim is recorded as 'claimed': nothing reserved, not counted per minute.
CLAIM: Final = (
    _PRELUDE
    + STATUS_LUA_FUNCTIONS
    + _CLAIM_FUNCTIONS
    + r"""
if not built() then return {'NOT_BUILT'} end
local rec = P .. 'rq:' .. ARGV[2]
local answer, st = claim_check(rec, ARGV[3], ARGV[6], ARGV[7], ARGV[5])
if answer and answer[1] == 'CONFLICT' then return {'CONFLICT'} end
if not st[2] then
  redis.call('HSET', rec, 's', 'claimed', 'u', ARGV[3], 'ev', ARGV[6], 'dg', ARGV[7])
  redis.call('PEXPIRE', rec, ARGV[4])
end
return {'MINE'}
"""
)

# ARGV: P, request_id, actual_tokens, now_ms, day_id, month_id, day_ttl_s, month_ttl_s,
#       committed_ttl_ms, fallback_user ('' = none), outcome ('' = none), verified ('' = not yet)
# -> {'COMMITTED', charged, released_hold} | {'ALREADY', charged} | {'UNKNOWN'} | {'VERIFY', snapshot}
#    | {'NOT_BUILT'}
# outcome: the request's outcome event, kept with the committed record: a redelivery is answered with it
# (DONE) instead of running again. The claim (owner, event, digest) stays.
COMMIT: Final = (
    _PRELUDE
    + r"""
if not built() then return {'NOT_BUILT'} end
local rid, now, outcome = ARGV[2], tonumber(ARGV[4]), ARGV[11]
local rec = P .. 'rq:' .. rid
local st = redis.call('HMGET', rec, 's', 'u', 'c', 'ev', 'dg')
if st[1] == 'committed' then
  -- the first outcome stays; one is filled in when the first commit had none (rebuilt from the ledger)
  if outcome ~= '' then redis.call('HSETNX', rec, 'o', outcome) end
  return {'ALREADY', st[3]}
end
if st[1] ~= 'reserved' and ARGV[12] == '' then
  local answer = unverified()
  if answer then return answer end
end
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
if st[4] then redis.call('HSET', rec, 'ev', st[4]) end
if st[5] then redis.call('HSET', rec, 'dg', st[5]) end
if outcome ~= '' then redis.call('HSET', rec, 'o', outcome) end
redis.call('PEXPIRE', rec, ARGV[9])
return {'COMMITTED', ARGV[3], held}
"""
)

# ARGV: P, request_id, now_ms, claim_ttl_ms, outcome ('' = none), user ('' = unchecked), event_id, digest
# -> {'RELEASED', freed} | {'COMMITTED'} | {'NONE'} | {'CONFLICT'} | {'NOT_BUILT'}
# The request ended without a charge (failed): its hold is freed and the claim is kept as released, with
# the outcome event, so a redelivery is answered with it (DONE). With a user, the claim is checked like
# a reservation's (a message that does not own the request cannot end it: CONFLICT), and a request
# that held no claim yet (it failed before its reservation) is claimed as released.
RELEASE: Final = (
    _PRELUDE
    + r"""
if not built() then return {'NOT_BUILT'} end
local rid, now, ttl, outcome, user = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local rec = P .. 'rq:' .. rid
local st = redis.call('HMGET', rec, 's', 'u', 'ev', 'dg')
if user ~= '' then
  if (st[2] and st[2] ~= user) or (st[4] and st[4] ~= '' and (st[3] ~= ARGV[7] or st[4] ~= ARGV[8])) then
    return {'CONFLICT'}
  end
end
if st[1] == 'committed' then return {'COMMITTED'} end
if st[1] == 'released' or st[1] == 'refused' then return {'NONE'} end
local freed = 0
if st[1] == 'reserved' then
  purge(st[2], now)
  freed = drop(st[2], rid)
elseif user == '' then
  return {'NONE'}
else
  -- not reserved (admitted, or no claim yet): the failure claims the request
  redis.call('DEL', rec)
  redis.call('HSET', rec, 'u', user, 'ev', ARGV[7], 'dg', ARGV[8])
end
redis.call('HSET', rec, 's', 'released')
if outcome ~= '' then redis.call('HSET', rec, 'o', outcome) end
redis.call('PEXPIRE', rec, ttl)
return {'RELEASED', freed}
"""
)

# ARGV: P, request_id, user (the request's owner, as the caller authorized it), status_key ('' = none),
#       outcome (the InferenceCancelled to keep when the cancel wins), claim_ttl_ms, cancel channel,
#       cause ('http' | 'bus': published with the request id, '<cause> <request_id>')
# -> {'QUEUED'} | {'RUNNING'} | {'CANCELLED', kept_outcome} | {'ENDED', state} | {'UNKNOWN'} | {'NOT_BUILT'}
# A cancel, atomic with the worker's RESERVE on the request's claim record: whichever runs first decides.
# QUEUED: not reserved yet (admitted by the gateway, claimed by the collector, or no claim record while the
# status cache knows the request): the claim is ended as released with the caller's InferenceCancelled
# (a worker's RESERVE then answers DONE with it and never runs the request); the caller publishes it.
# RUNNING: a worker holds its reservation: the claim is marked ('x') and the request id is published on
# the cancel channel, for the worker running it to cancel its Triton call (and a redelivery answers
# CANCELLING). CANCELLED: it was cancelled before (idempotent; the kept InferenceCancelled, when kept).
# ENDED: it reached another terminal state. UNKNOWN: the claim or the status cache names another owner.
CANCEL: Final = (
    _PRELUDE
    + STATUS_LUA_FUNCTIONS
    + r"""
if not built() then return {'NOT_BUILT'} end
local rid, user, skey = ARGV[2], ARGV[3], ARGV[4]
local rec = P .. 'rq:' .. rid
local st = redis.call('HMGET', rec, 's', 'u', 'o')
if st[2] and st[2] ~= user then return {'UNKNOWN'} end
local cached_status = false
if skey ~= '' then
  local cached = redis.call('HMGET', skey, 'user_id', 'status')
  if cached[1] and cached[1] ~= user then return {'UNKNOWN'} end
  cached_status = cached[2]
end
local state = st[1]
if state == 'released' then
  local kept = st[3] or ''
  if string.find(kept, '"type":"InferenceCancelled"', 1, true) == 2 then return {'CANCELLED', kept} end
  return {'ENDED', state}
end
if state == 'committed' or state == 'refused' then return {'ENDED', state} end
if state == 'reserved' then
  redis.call('HSET', rec, 'x', '1')
  redis.call('PUBLISH', ARGV[7], ARGV[8] .. ' ' .. rid)
  return {'RUNNING'}
end
if cached_status == 'cancelled' then return {'CANCELLED', ''} end
if cached_status and status_terminal[cached_status] then return {'ENDED', cached_status} end
if not state and not cached_status then return {'UNKNOWN'} end
redis.call('HSET', rec, 's', 'released', 'u', user, 'o', ARGV[5])
redis.call('PEXPIRE', rec, ARGV[6])
return {'QUEUED'}
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
#       status_key ('' = none), status_ttl_s, request_id ('' = no claim), event_id, digest, claim_ttl_ms,
#       then the status hash's field/value pairs
# -> {'OK'} | {'REFUSED', limit, retry_ms, used, reserved} | {'NOT_BUILT'}
# status_key: on OK, the new request's status-cache entry is written as 'queued' in the same round trip
# (the gateway's first status, written by the status cache's own function, STATUS_LUA_FUNCTIONS).
# request_id: on OK, the request is claimed for the user (state 'admitted') before the gateway publishes
# it, so no bus message can claim it first; the worker's reservation then knows it was counted here.
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
local fits, wait, count = rpm_take(user, ARGV[3], tonumber(ARGV[9]))
if not fits then return {'REFUSED', 'requests_per_minute', wait, count, 0} end
if ARGV[12] ~= '' then
  local rec = P .. 'rq:' .. ARGV[12]
  if redis.call('EXISTS', rec) == 0 then
    redis.call('HSET', rec, 's', 'admitted', 'u', user, 'ev', ARGV[13], 'dg', ARGV[14])
    redis.call('PEXPIRE', rec, ARGV[15])
  end
end
if ARGV[10] ~= '' then status_put_queued(ARGV[10], tonumber(ARGV[11]), 16) end
return {'OK'}
"""
)

# After VERIFY: the ledger holds the request's charge. Its record becomes committed (the claim's event and
# digest stay); ``charge`` when the rebuild did not count the row (written after its snapshot): the tokens
# are charged to the windows of the row's time, once (the committed record is the guard).
# ARGV: P, request_id, user, tokens, charge ('1' | ''), day_id, month_id, day_ttl_s, month_ttl_s,
#       committed_ttl_ms, now_ms -> {'ADOPTED'} | {'ALREADY'} | {'NOT_BUILT'}
ADOPT_COMMITTED: Final = (
    _PRELUDE
    + r"""
if not built() then return {'NOT_BUILT'} end
local rid, user = ARGV[2], ARGV[3]
local rec = P .. 'rq:' .. rid
local st = redis.call('HMGET', rec, 's', 'u', 'ev', 'dg')
if st[1] == 'committed' then return {'ALREADY'} end
if st[1] == 'reserved' and st[2] then
  purge(st[2], tonumber(ARGV[11]))
  drop(st[2], rid)
end
if ARGV[5] ~= '' then charge(user, ARGV[4], ARGV[6], ARGV[7], ARGV[8], ARGV[9]) end
redis.call('DEL', rec)
redis.call('HSET', rec, 's', 'committed', 'u', user, 'c', ARGV[4])
if st[3] then redis.call('HSET', rec, 'ev', st[3]) end
if st[4] then redis.call('HSET', rec, 'dg', st[4]) end
redis.call('PEXPIRE', rec, ARGV[10])
return {'ADOPTED'}
"""
)

# --- the rebuild: every write is fenced by the lock's token (ARGV[2]); a rebuild whose lock expired or was
# taken over gets -1 and stops, so it can never write over the counters another rebuild made.
_FENCE: Final = r"""
if redis.call('GET', ARGV[1] .. 'rebuild-lock') ~= ARGV[2] then return -1 end
"""

# Clears leftovers (the caller SCANs them). ARGV: P, token, keys... -> how many were unlinked, or -1
FENCED_UNLINK: Final = (
    _FENCE
    + r"""
local lock, n = ARGV[1] .. 'rebuild-lock', 0
for i = 3, #ARGV do
  if ARGV[i] ~= lock then n = n + redis.call('UNLINK', ARGV[i]) end
end
return n
"""
)

# The per-window totals. ARGV: P, token, day_id, month_id, day_ttl_s, month_ttl_s, then per user:
# user, day_tokens, month_tokens -> how many users, or -1
FENCED_RESTORE_TOTALS: Final = (
    _FENCE
    + r"""
local P = ARGV[1]
local n = 0
for i = 7, #ARGV - 2, 3 do
  local user = ARGV[i]
  redis.call('SET', P .. 'um:' .. user .. ':' .. ARGV[4], ARGV[i + 2], 'EX', ARGV[6])
  if tonumber(ARGV[i + 1]) > 0 then
    redis.call('SET', P .. 'ud:' .. user .. ':' .. ARGV[3], ARGV[i + 1], 'EX', ARGV[5])
  end
  n = n + 1
end
return n
"""
)

# The open reservations (running requests not in the ledger yet). ARGV: P, token, now_ms, grace_ms, then per
# request: request_id, user, tokens, expires_ms -> how many, or -1
FENCED_RESTORE_OPEN: Final = (
    _FENCE
    + _PRELUDE
    + r"""
local now, grace = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = 0
for i = 5, #ARGV - 3, 4 do
  local rid, user, tokens, exp = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  hold(user, rid, tokens, exp, now, grace)
  local rec = P .. 'rq:' .. rid
  redis.call('HSET', rec, 's', 'reserved', 'u', user, 't', tokens, 'e', exp)
  redis.call('PEXPIRE', rec, math.max(1, tonumber(exp) - now + grace))
  n = n + 1
end
return n
"""
)

# Sets the marker and keeps the snapshot, only while the caller still holds the lock, and frees it.
# ARGV: P, token, built_value, snapshot, snapshot_ttl_ms -> 1, or 0 (the lock is not the caller's)
FINISH_REBUILD: Final = r"""
local P = ARGV[1]
if redis.call('GET', P .. 'rebuild-lock') ~= ARGV[2] then return 0 end
redis.call('SET', P .. 'built', ARGV[3])
redis.call('SET', P .. 'ledger-snapshot', ARGV[4], 'PX', ARGV[5])
redis.call('DEL', P .. 'rebuild-lock')
return 1
"""

# Extends the lock while its holder still runs. ARGV: P, token, ttl_ms -> 1, or 0 (not the caller's)
RENEW_LOCK: Final = r"""
if redis.call('GET', ARGV[1] .. 'rebuild-lock') == ARGV[2] then
  return redis.call('PEXPIRE', ARGV[1] .. 'rebuild-lock', ARGV[3])
end
return 0
"""

# Compare-and-delete of the rebuild lock (never delete a lock another process took over). ARGV: P, token
RELEASE_LOCK: Final = r"""
if redis.call('GET', ARGV[1] .. 'rebuild-lock') == ARGV[2] then
  return redis.call('DEL', ARGV[1] .. 'rebuild-lock')
end
return 0
"""
