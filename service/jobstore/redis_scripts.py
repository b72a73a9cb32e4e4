"""The Lua scripts of the Redis job store: each operation that reads and then writes is one
script, which Redis runs atomically (no other command runs in between).

Keys, under the store's prefix P (ARGV[1] of every script):
    P job:<id>    hash: the record's fields as strings (record.to_fields; None = absent)
    P all         sorted set: every held job, scored by created_at
    P queue       sorted set: queued jobs, scored by created_at (the claim order)
    P leases      sorted set: running jobs, scored by lease_until
    P finished    sorted set: finished jobs, scored by finished_at (expiry)
    P idem        hash: idempotency key -> job id

A script's `now` argument is a number, or "" for the server's clock (TIME). Times are written
with microseconds ("%.6f"). The scripts name their keys through the prefix rather than KEYS:
a single Redis or Valkey (with replicas or Sentinel) runs them, Redis Cluster does not.
"""

from __future__ import annotations

PRELUDE = r"""
local P = ARGV[1]
local function job(id) return P .. 'job:' .. id end
local function fmt(x) return string.format('%.6f', x) end
local function clock(arg)
  local n = tonumber(arg)
  if n then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- ARGV[first..] as name, value pairs; an empty value removes the field (None)
local function set_pairs(key, first)
  for i = first, #ARGV, 2 do
    if ARGV[i + 1] == '' then
      redis.call('HDEL', key, ARGV[i])
    else
      redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    end
  end
end
local function finalize(id, state, now)
  local key = job(id)
  redis.call('HSET', key, 'state', state, 'finished_at', fmt(now))
  redis.call('HDEL', key, 'owner', 'lease_until', 'eta_s')
  redis.call('ZREM', P .. 'queue', id)
  redis.call('ZREM', P .. 'leases', id)
  redis.call('ZADD', P .. 'finished', now, id)
end
local function forget(id)
  local key = job(id)
  local ikey = redis.call('HGET', key, 'idempotency_key')
  redis.call('DEL', key)
  for _, set in ipairs({'all', 'queue', 'leases', 'finished'}) do
    redis.call('ZREM', P .. set, id)
  end
  if ikey and redis.call('HGET', P .. 'idem', ikey) == id then
    redis.call('HDEL', P .. 'idem', ikey)
  end
end
-- Expired leases: a job whose cancel was requested ends cancelled; the others are returned
-- as {id, created_at}, candidates for a takeover.
local function reap(now)
  local live = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now)) do
    local f = redis.call('HMGET', job(id), 'cancel_requested', 'created_at')
    if not f[2] then
      redis.call('ZREM', P .. 'leases', id)
    elseif f[1] == '1' then
      finalize(id, 'cancelled', now)
    else
      table.insert(live, {id, tonumber(f[2])})
    end
  end
  return live
end
local function holder(id, owner)
  local f = redis.call('HMGET', job(id), 'state', 'owner', 'cancel_requested')
  if not f[1] then return 'gone' end
  if f[1] ~= 'running' or f[2] ~= owner then return 'lost' end
  if f[3] == '1' then return 'cancelled' end
  return 'held'
end
local function earlier(id, created, best, best_created)
  return best == nil or created < best_created or (created == best_created and id < best)
end
"""

# ARGV: P, id, created_at, idempotency key or '', upload digest or '', max_jobs or '',
# then the record's field, value pairs.
CREATE = r"""
local id = ARGV[2]
if redis.call('EXISTS', job(id)) == 1 then
  return {'exists', redis.call('HGETALL', job(id))}
end
if ARGV[4] ~= '' then
  local other = redis.call('HGET', P .. 'idem', ARGV[4])
  if other and redis.call('EXISTS', job(other)) == 1 then
    local digest = redis.call('HGET', job(other), 'upload_digest') or ''
    local verdict = 'conflict'
    if digest == ARGV[5] then verdict = 'exists' end
    return {verdict, redis.call('HGETALL', job(other))}
  end
end
local limit = tonumber(ARGV[6])
if limit then
  local held = redis.call('ZCARD', P .. 'all')
  if held >= limit then
    local oldest = redis.call('ZRANGE', P .. 'finished', 0, 0, 'WITHSCORES')
    return {'full', {tostring(held), oldest[2] or ''}}
  end
end
redis.call('HSET', job(id), unpack(ARGV, 7))
redis.call('ZADD', P .. 'all', ARGV[3], id)
redis.call('ZADD', P .. 'queue', ARGV[3], id)
if ARGV[4] ~= '' then redis.call('HSET', P .. 'idem', ARGV[4], id) end
return {'created', {}}
"""

# ARGV: P, owner, now, lease_s. The record claimed, as HGETALL, or nil.
CLAIM = r"""
local now = clock(ARGV[3])
local best, best_created, takeover = nil, nil, false
for _, e in ipairs(reap(now)) do
  if earlier(e[1], e[2], best, best_created) then
    best, best_created, takeover = e[1], e[2], true
  end
end
while true do
  local head = redis.call('ZRANGE', P .. 'queue', 0, 0, 'WITHSCORES')
  if not head[1] then break end
  if redis.call('EXISTS', job(head[1])) == 0 then
    redis.call('ZREM', P .. 'queue', head[1])
  else
    if earlier(head[1], tonumber(head[2]), best, best_created) then
      best, takeover = head[1], false
    end
    break
  end
end
if best == nil then return false end
local key = job(best)
local lease_until = now + tonumber(ARGV[4])
redis.call('ZREM', P .. 'queue', best)
redis.call('HSET', key, 'state', 'running', 'owner', ARGV[2], 'lease_until', fmt(lease_until))
if redis.call('HEXISTS', key, 'started_at') == 0 then
  redis.call('HSET', key, 'started_at', fmt(now))
end
if takeover then redis.call('HINCRBY', key, 'takeovers', 1) end
redis.call('ZADD', P .. 'leases', lease_until, best)
return redis.call('HGETALL', key)
"""

# ARGV: P, id, owner, now, lease_s. The lease status.
RENEW = r"""
local st = holder(ARGV[2], ARGV[3])
if st == 'gone' or st == 'lost' then return st end
local lease_until = clock(ARGV[4]) + tonumber(ARGV[5])
redis.call('HSET', job(ARGV[2]), 'lease_until', fmt(lease_until))
redis.call('ZADD', P .. 'leases', lease_until, ARGV[2])
return st
"""

# ARGV: P, id, owner, then field, value pairs. The lease status.
PROGRESS = r"""
local st = holder(ARGV[2], ARGV[3])
if st == 'held' or st == 'cancelled' then set_pairs(job(ARGV[2]), 4) end
return st
"""

# ARGV: P, id, owner, final state, now, then field, value pairs. 1 if ended, 0 if not held.
FINISH = r"""
local st = holder(ARGV[2], ARGV[3])
if st == 'gone' or st == 'lost' then return 0 end
set_pairs(job(ARGV[2]), 6)
finalize(ARGV[2], ARGV[4], clock(ARGV[5]))
return 1
"""

# ARGV: P, id, owner, now. 1 if handed back (or ended cancelled), 0 if not held.
RELEASE = r"""
local id = ARGV[2]
local st = holder(id, ARGV[3])
if st == 'gone' or st == 'lost' then return 0 end
if st == 'cancelled' then
  finalize(id, 'cancelled', clock(ARGV[4]))
  return 1
end
local key = job(id)
redis.call('HSET', key, 'state', 'queued', 'fps', '0.0')
redis.call('HDEL', key, 'owner', 'lease_until', 'eta_s')
redis.call('ZREM', P .. 'leases', id)
redis.call('ZADD', P .. 'queue', redis.call('HGET', key, 'created_at'), id)
return 1
"""

# ARGV: P, id, now. The record after, as HGETALL, or nil.
CANCEL = r"""
local key = job(ARGV[2])
local state = redis.call('HGET', key, 'state')
if not state then return false end
if state == 'queued' then
  finalize(ARGV[2], 'cancelled', clock(ARGV[3]))
elseif state == 'running' then
  redis.call('HSET', key, 'cancel_requested', '1')
end
return redis.call('HGETALL', key)
"""

# ARGV: P, id. The record as it was, as HGETALL, or nil.
DELETE = r"""
local record = redis.call('HGETALL', job(ARGV[2]))
if #record == 0 then return false end
forget(ARGV[2])
return record
"""

# ARGV: P, retention_s, now. The ids removed.
EXPIRE = r"""
local now = clock(ARGV[3])
reap(now)
local ids = redis.call('ZRANGEBYSCORE', P .. 'finished', '-inf', now - tonumber(ARGV[2]))
for _, id in ipairs(ids) do forget(id) end
return ids
"""

# ARGV: P. Every held job, oldest first, each as HGETALL.
LIST = r"""
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'all', 0, -1)) do
  local record = redis.call('HGETALL', job(id))
  if #record > 0 then table.insert(out, record) end
end
return out
"""

SCRIPTS = {
    "create": CREATE,
    "claim": CLAIM,
    "renew": RENEW,
    "progress": PROGRESS,
    "finish": FINISH,
    "release": RELEASE,
    "cancel": CANCEL,
    "delete": DELETE,
    "expire": EXPIRE,
    "list": LIST,
}
