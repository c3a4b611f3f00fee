"""The Lua scripts of :class:`~flymy_receiver.stores.RedisStore`: one per step of a delivery.

Each step is one script call, so a step is atomic on the server and costs one round trip:
the claim with its journal entry, its indexes and a bounded purge of expired entries; the
completion (or release) with the outcomes, the state's index, the history and the waiters'
wake-up (``PUBLISH``).

Keys of one event (all under one hash tag, the event's key): ``KEYS[1]`` its claim
(``"claim:<token>"`` or ``"done"``), ``KEYS[2]`` the set of its handlers that succeeded,
``KEYS[3]`` its journal entry (a hash without the body; outcomes in ``h:<handler>`` fields),
``KEYS[4]`` the tokens whose claim their client gave up on before it ran, ``KEYS[5]`` its body
(a key of its own: bodies are the only part that may be dropped), ``KEYS[6]`` its history
(a list of attempts, the newest 50), and ``KEYS[7]`` the journal's root ``<prefix>journal``.
A deferred handler's lease is ``KEYS[1] .. ":l:" .. handler``.

The journal's indexes hang off the root: ``<root>`` (every entry by arrival), ``:state:<s>``,
``:event:<sha1>``, ``:agent:<sha1>``, ``:run:<sha1>`` (sorted sets by arrival; digests keep long
sender-chosen values out of key names), ``:expiry`` (by end of retention), ``:meta`` (per
entry, what unindexing it needs once its hash has expired) and ``:bytes`` (the bodies' total).
On Redis Cluster they share a slot with the events only when the prefix carries a hash tag
(``prefix="{flymy}:"``), which the store's documentation asks for.

ARGV[1] is always the client's clock (epoch seconds) and ARGV[2] the channel that waiters
subscribe to ("" for none).
"""

from __future__ import annotations

from .records import HISTORY_LIMIT

__all__ = [
    "CLAIM",
    "CLAIM_HANDLER",
    "COMPLETE",
    "FINISH_HANDLER",
    "FORGET",
    "GIVE_UP",
    "IGNORE",
    "MARK",
    "RELEASE",
    "RESOLVE",
]

#: Expired entries unindexed per journal write, at most.
PURGE_LIMIT = 20

# Unindexing, shared by the event scripts and FORGET (J is the journal's root).
_INDEX = """
local function meta_of(key)
  local m = redis.call('HGET', J .. ':meta', key)
  if m then return cjson.decode(m) end
  return nil
end
local function unindex(key, m)
  redis.call('ZREM', J, key)
  redis.call('ZREM', J .. ':expiry', key)
  redis.call('HDEL', J .. ':meta', key)
  if not m then return end
  redis.call('ZREM', J .. ':state:' .. m.s, key)
  redis.call('ZREM', J .. ':event:' .. m.e, key)
  if m.a then redis.call('ZREM', J .. ':agent:' .. m.a, key) end
  if m.r then redis.call('ZREM', J .. ':run:' .. m.r, key) end
  if m.n and m.n > 0 and redis.call('DECRBY', J .. ':bytes', m.n) <= 0 then
    redis.call('DEL', J .. ':bytes')
  end
end
local PREFIX = string.sub(J, 1, #J - 7)  -- J is PREFIX .. 'journal'
local function entry_key(key) return PREFIX .. '{' .. key .. '}:j' end
"""

_EVENT = (
    """
local J = KEYS[7]
local NOW = ARGV[1]
local now = tonumber(NOW)
local CHANNEL = ARGV[2]
local KEY = string.sub(KEYS[1], #J - 7 + 2, -2)  -- KEYS[1] is PREFIX .. '{' .. key .. '}'
"""
    + _INDEX
    + f"""
local HISTORY = {HISTORY_LIMIT}
local PURGE = {PURGE_LIMIT}
"""
    + """
-- The state a reader is shown: a pending entry whose claim's lease has ended is stalled.
local function shown(state, lease_until)
  if state == 'pending' and tonumber(lease_until or '0') < now then return 'stalled' end
  return state or ''
end
local function add_indexes(m, received)
  redis.call('ZADD', J, received, KEY)
  redis.call('ZADD', J .. ':state:' .. m.s, received, KEY)
  redis.call('ZADD', J .. ':event:' .. m.e, received, KEY)
  if m.a then redis.call('ZADD', J .. ':agent:' .. m.a, received, KEY) end
  if m.r then redis.call('ZADD', J .. ':run:' .. m.r, received, KEY) end
end
-- The entry's index record; an entry written before the indexes existed, or whose indexing
-- was lost, is indexed now.
local function load_meta()
  local m = meta_of(KEY)
  if m then return m end
  local f = redis.call('HMGET', KEYS[3], 'state', 'event', 'agent_id', 'run_id', 'received_at')
  m = {s = f[1] or 'pending', e = redis.sha1hex(f[2] or ''), n = 0}
  if f[3] then m.a = redis.sha1hex(f[3]) end
  if f[4] then m.r = redis.sha1hex(f[4]) end
  add_indexes(m, f[5] or NOW)
  return m
end
local function set_state(m, state)
  redis.call('HSET', KEYS[3], 'state', state)
  if m.s ~= state then
    local received = redis.call('HGET', KEYS[3], 'received_at') or NOW
    redis.call('ZREM', J .. ':state:' .. m.s, KEY)
    redis.call('ZADD', J .. ':state:' .. state, received, KEY)
    m.s = state
  end
end
-- After every change: the entry, its body and history live retention ms from now.
local function touch(m)
  local retention = redis.call('HGET', KEYS[3], 'retention')
  redis.call('HSET', KEYS[3], 'updated_at', NOW)
  redis.call('PEXPIRE', KEYS[3], retention)
  redis.call('PEXPIRE', KEYS[5], retention)
  redis.call('PEXPIRE', KEYS[6], retention)
  redis.call('ZADD', J .. ':expiry', now + tonumber(retention) / 1000, KEY)
  redis.call('HSET', J .. ':meta', KEY, cjson.encode(m))
end
-- The body, unless the bodies' total would pass the budget (then the entry says so).
local function put_body(m, body, budget)
  local old = m.n or 0
  local total = tonumber(redis.call('GET', J .. ':bytes') or '0') - old
  local size = 0
  if budget > 0 and total + #body > budget then
    redis.call('DEL', KEYS[5])
    redis.call('HSET', KEYS[3], 'body_size', #body, 'body_dropped', '1')
  else
    redis.call('SET', KEYS[5], body)
    redis.call('HSET', KEYS[3], 'body_size', #body, 'body_dropped', '0')
    size = #body
  end
  m.n = size
  if size ~= old then redis.call('INCRBY', J .. ':bytes', size - old) end
end
local function add_attempt(attempt)
  if attempt and attempt ~= '' then
    redis.call('RPUSH', KEYS[6], attempt)
    redis.call('LTRIM', KEYS[6], -HISTORY, -1)
  end
end
local function attempt_of(source, status, outcome)
  return '{"at":' .. NOW .. ',"source":"' .. source .. '","status":' .. status
    .. ',"outcome":"' .. outcome .. '","duration":0.0}'
end
-- Tell the run's waiters in other processes that its delivery ended.
local function announce(state)
  if CHANNEL ~= '' and (state == 'handled' or state == 'failed' or state == 'ignored') then
    local run = redis.call('HGET', KEYS[3], 'run_id')
    if run then redis.call('PUBLISH', CHANNEL, run) end
  end
end
-- A new entry from ARGV[b..]: retention ms, byte budget, body, headers, event, then
-- (name, value) pairs of run_id, agent_id, agent_name.
local function create(state, b, lease_until)
  local stale = meta_of(KEY)  -- an expired entry of this key, not purged yet
  if stale then unindex(KEY, stale) end
  redis.call('DEL', KEYS[3], KEYS[5], KEYS[6])
  redis.call('HSET', KEYS[3], 'state', state, 'attempts', 1, 'received_at', NOW,
    'updated_at', NOW, 'retention', ARGV[b], 'headers', ARGV[b + 3], 'event', ARGV[b + 4],
    'lease_until', lease_until)
  local m = {s = state, e = redis.sha1hex(ARGV[b + 4]), n = 0}
  for i = b + 5, #ARGV, 2 do
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    if ARGV[i] == 'run_id' then m.r = redis.sha1hex(ARGV[i + 1]) end
    if ARGV[i] == 'agent_id' then m.a = redis.sha1hex(ARGV[i + 1]) end
  end
  put_body(m, ARGV[b + 2], tonumber(ARGV[b + 1]))
  add_indexes(m, NOW)
  return m
end
-- Drop from the indexes a bounded number of entries whose retention has ended.
local function purge()
  local expired = redis.call('ZRANGEBYSCORE', J .. ':expiry', '-inf', NOW, 'LIMIT', 0, PURGE)
  for _, key in ipairs(expired) do
    local ttl = redis.call('PTTL', entry_key(key))
    if ttl > 0 then
      redis.call('ZADD', J .. ':expiry', now + ttl / 1000, key)
    else
      unindex(key, meta_of(key))
    end
  end
end
local function outcomes_from(first)
  for i = first, #ARGV, 2 do redis.call('HSET', KEYS[3], 'h:' .. ARGV[i], ARGV[i + 1]) end
end
local function exists() return redis.call('EXISTS', KEYS[3]) == 1 end
"""
)

# ARGV: now, channel, token, lease ms, force ('1' or ''), journal ('entry', 'replay' or ''),
# then for 'entry' the new entry (see create). Returns {state, done handlers, pttl, prior}.
CLAIM = (
    _EVENT
    + """
local token, lease = ARGV[3], tonumber(ARGV[4])
local result
local again = false
if redis.call('SISMEMBER', KEYS[4], token) == 1 then
  redis.call('SREM', KEYS[4], token)  -- its client gave up on it: take nothing
  result = {'busy', {}, 0}
else
  local state = redis.call('GET', KEYS[1])
  if state == 'claim:' .. token then again = true end  -- the same call, sent twice
  if state == 'done' and ARGV[5] ~= '1' then
    result = {'done', {}, 0}
  elseif state and state ~= 'done' and not again then
    result = {'busy', {}, redis.call('PTTL', KEYS[1])}
  else
    redis.call('SET', KEYS[1], 'claim:' .. token, 'PX', lease)
    if ARGV[5] == '1' then
      redis.call('DEL', KEYS[2])
      result = {'acquired', {}, 0}
    else
      result = {'acquired', redis.call('SMEMBERS', KEYS[2]), 0}
    end
  end
end
local outcome = result[1]
local lease_until = now + lease / 1000
if outcome == 'busy' then lease_until = now + math.max(result[3], 0) / 1000 end
local prior = ''
local mode = ARGV[6]
if mode == 'entry' then
  purge()  -- first, so that the bytes of expired bodies are free for this one
  if not exists() then
    local state = 'pending'
    if outcome == 'done' then state = 'handled' end
    local m = create(state, 7, lease_until)
    if outcome == 'done' then add_attempt(attempt_of('sender', 200, 'duplicate')) end
    if outcome == 'busy' then add_attempt(attempt_of('sender', 409, 'in_flight')) end
    touch(m)
  else
    local f = redis.call('HMGET', KEYS[3], 'state', 'lease_until')
    prior = shown(f[1], f[2])
    if not again then
      local m = load_meta()
      redis.call('HINCRBY', KEYS[3], 'attempts', 1)
      redis.call('HSET', KEYS[3], 'retention', ARGV[7])
      if outcome == 'acquired' then
        redis.call('HSET', KEYS[3], 'lease_until', lease_until, 'headers', ARGV[10])
        set_state(m, 'pending')
        put_body(m, ARGV[9], tonumber(ARGV[8]))
      elseif outcome == 'done' then
        add_attempt(attempt_of('sender', 200, 'duplicate'))
      else
        add_attempt(attempt_of('sender', 409, 'in_flight'))
      end
      touch(m)
    end
  end
elseif mode == 'replay' and exists() then
  local f = redis.call('HMGET', KEYS[3], 'state', 'lease_until')
  prior = shown(f[1], f[2])
  if outcome == 'acquired' then
    local m = load_meta()
    redis.call('HSET', KEYS[3], 'lease_until', lease_until)
    set_state(m, 'pending')
    touch(m)
  elseif outcome == 'busy' then
    add_attempt(attempt_of('replay', 409, 'in_flight'))
    touch(load_meta())
  end
end
result[4] = prior
return result
"""
)

# ARGV: now, channel, handler, ttl ms, journal ('1' or ''), outcome.
MARK = (
    _EVENT
    + """
if ARGV[5] == '1' and exists() then
  local m = load_meta()
  redis.call('HSET', KEYS[3], 'h:' .. ARGV[3], ARGV[6])
  touch(m)
end
if redis.call('GET', KEYS[1]) == 'done' then return 0 end
redis.call('SADD', KEYS[2], ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return 1
"""
)

# ARGV: now, channel, token, ttl ms, journal ('1' or ''), state ('handled' or 'queued'),
# attempt ('' for none), then (handler, outcome) pairs.
COMPLETE = (
    _EVENT
    + """
if ARGV[5] == '1' and exists() then
  local m = load_meta()
  outcomes_from(8)
  set_state(m, ARGV[6])
  add_attempt(ARGV[7])
  touch(m)
  announce(ARGV[6])
end
local state = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[4])
redis.call('DEL', KEYS[2])
if state == 'claim:' .. ARGV[3] or state == 'done' then return 1 end
return 0
"""
)

# ARGV: now, channel, token, journal ('1' or ''), attempt, then (handler, outcome) pairs.
RELEASE = (
    _EVENT
    + """
if redis.call('GET', KEYS[1]) ~= 'claim:' .. ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' and exists() then
  local m = load_meta()
  outcomes_from(6)
  set_state(m, 'failed')
  add_attempt(ARGV[5])
  touch(m)
  announce('failed')
end
return 1
"""
)

# ARGV: now, channel, attempt, then the new entry (see create). A new entry is ignored; an
# existing one counts an attempt and keeps its state and body.
IGNORE = (
    _EVENT
    + """
purge()
if not exists() then
  local m = create('ignored', 4, 0)
  add_attempt(ARGV[3])
  touch(m)
  announce('ignored')
else
  local m = load_meta()
  redis.call('HINCRBY', KEYS[3], 'attempts', 1)
  redis.call('HSET', KEYS[3], 'retention', ARGV[4])
  add_attempt(ARGV[3])
  touch(m)
  announce(m.s)
end
return 1
"""
)

# ARGV: now, channel, note. Returns 1, or 0 when there is no such entry.
RESOLVE = (
    _EVENT
    + """
if not exists() then return 0 end
local m = load_meta()
redis.call('HSET', KEYS[3], 'note', ARGV[3])
set_state(m, 'resolved')
touch(m)
return 1
"""
)

# ARGV: now, channel, handler, token, lease ms.
# Returns {'missing'}, {'done', '', prior}, {'busy', pttl, prior} or
# {'acquired', token, prior, body or nil}.
CLAIM_HANDLER = (
    _EVENT
    + """
if not exists() then return {'missing'} end
local handler = ARGV[3]
local f = redis.call('HMGET', KEYS[3], 'state', 'lease_until', 'h:' .. handler)
local prior = shown(f[1], f[2])
local o = {ok = false, deferred = true, attempts = 0, queued_at = 0, state = 'queued'}
if f[3] then o = cjson.decode(f[3]) end
if o.ok == true or o.state == 'ok' then return {'done', '', prior} end
local lease_key = KEYS[1] .. ':l:' .. handler
local held = redis.call('PTTL', lease_key)
if held > 0 then return {'busy', held, prior} end
redis.call('SET', lease_key, ARGV[4], 'PX', ARGV[5])
o.ok = false
o.deferred = true
o.state = 'running'
o.attempts = (tonumber(o.attempts) or 0) + 1
o.lease_until = now + tonumber(ARGV[5]) / 1000
redis.call('HSET', KEYS[3], 'h:' .. handler, cjson.encode(o))
touch(load_meta())
return {'acquired', ARGV[4], prior, redis.call('GET', KEYS[5])}
"""
)

# ARGV: now, channel, handler, token, outcome, ok ('1' or ''), attempt, final ('1' or ''),
# ttl ms. Returns 1, or 0 when there is no such entry.
FINISH_HANDLER = (
    _EVENT
    + """
if not exists() then return 0 end
local handler, ok = ARGV[3], ARGV[6] == '1'
local lease_key = KEYS[1] .. ':l:' .. handler
local holds = redis.call('GET', lease_key) == ARGV[4]
local m = load_meta()
add_attempt(ARGV[7])
local recorded = ok or holds
if recorded then
  -- The run's outcome, with the attempts counted by claim_handler and no live lease.
  local o = cjson.decode(ARGV[5])
  local before = redis.call('HGET', KEYS[3], 'h:' .. handler)
  local count = 0
  if before then count = tonumber(cjson.decode(before).attempts) or 0 end
  o.attempts = math.max(tonumber(o.attempts) or 0, count)
  o.deferred = true
  o.lease_until = 0
  redis.call('HSET', KEYS[3], 'h:' .. handler, cjson.encode(o))
end
if holds then redis.call('DEL', lease_key) end
if ok then
  redis.call('SADD', KEYS[2], handler)
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[9]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[9])
  end
end
local all_ok = true
local succeeded = {}
local fields = redis.call('HGETALL', KEYS[3])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'h:' then
    if cjson.decode(fields[i + 1]).ok == true then
      succeeded[#succeeded + 1] = string.sub(fields[i], 3)
    else
      all_ok = false
    end
  end
end
local state = nil
if all_ok then
  state = 'handled'
elseif recorded and not ok and ARGV[8] == '1' then
  state = 'failed'
  -- The queue will not retry: drop the done record so that a replay can claim the key,
  -- keeping a record of each handler that succeeded (complete had folded them into it).
  if redis.call('GET', KEYS[1]) == 'done' then redis.call('DEL', KEYS[1]) end
  if #succeeded > 0 then
    redis.call('SADD', KEYS[2], unpack(succeeded))
    if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[9]) then
      redis.call('PEXPIRE', KEYS[2], ARGV[9])
    end
  end
end
if state then set_state(m, state) end
touch(m)
if state then announce(state) end
return 1
"""
)

# A claim whose client timed out: release it if it ran, else make sure it takes nothing
# when it runs. ARGV: token, how long to remember it (ms).
GIVE_UP = """
if redis.call('GET', KEYS[1]) == 'claim:' .. ARGV[1] then return redis.call('DEL', KEYS[1]) end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return 0
"""

# Read repair: unindex the entries (ARGV) found gone while reading. KEYS[1]: the root.
FORGET = (
    """
local J = KEYS[1]
"""
    + _INDEX
    + """
local n = 0
for _, key in ipairs(ARGV) do
  if redis.call('EXISTS', entry_key(key)) == 0 then
    unindex(key, meta_of(key))
    n = n + 1
  end
end
return n
"""
)
