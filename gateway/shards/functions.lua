#!lua name=pg
--[[
Verified-write function library, loaded on every shard master by `presence-gateway shards init`.

Every state change the gateway makes goes through pg_apply, which checks before any effect that
the call was meant for this shard (uuid), under the current topology (epoch), and that each
operation's tag was computed for its exact key. The framing is described in docs/write-path.md.
]]

local LIB_VERSION = '5'
local IDENTITY = '__pg:shard'

-- Set by apply() from the shard identity before any op runs: this shard's own hash tag, under
-- which its shard-wide keys live (':chans' occupied channels, ':nodes' owner leases,
-- ':idx:<owner>' the channels an owner has entries in, ':reaper' the reap lock, and the
-- webhook outbox: ':due' entries by due time, ':inflight' claimed entries by lease deadline,
-- ':ev' their payloads, ':seq' the event counter).
local SHARD = nil
-- Per call: Redis time in ms, the shard's lease history (see beat()), and every owner's
-- liveness as seen at that time.
local NOW = nil
local BEAT = nil
local ALIVE = {}

local function now_ms()
  if NOW == nil then
    local t = redis.call('TIME')
    NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return NOW
end

-- Defaults for callers that send no gap threshold or grace (nodes of library version 3, during
-- a rolling upgrade): the version-4 node defaults.
local DEFAULT_GAP_MS, DEFAULT_GRACE_MS = 3000, 1000

-- The shard's lease history, kept by lease(). `last`: the last refresh by any node. `gap`,
-- `up`: the last period in which no node refreshed for longer than `gapms` (the shard was
-- unreachable or failing over) ended at `up`, and its last refresh before it was at `gap`.
-- `window`: how long after `up` owners that expired in that period still count as alive (the
-- larger of the reap grace and the gap threshold: time for every node to refresh).
local function beat()
  if BEAT == nil then
    local b = redis.call('HMGET', SHARD .. ':beat', 'last', 'gap', 'up', 'gapms', 'grace')
    local gapms, grace = tonumber(b[4]) or DEFAULT_GAP_MS, tonumber(b[5]) or 0
    BEAT = {last = tonumber(b[1]) or 0, gap = tonumber(b[2]) or 0, up = tonumber(b[3]) or 0,
            gapms = gapms, grace = grace, window = math.max(gapms, grace)}
  end
  return BEAT
end

-- Whether no node has refreshed a lease here for longer than the gap threshold: the shard is
-- unreachable for the nodes, or it is just back and they have not refreshed yet.
local function in_gap()
  local b = beat()
  return b.gapms > 0 and b.last > 0 and now_ms() - b.last > b.gapms
end

-- Whether an owner (node_id@incarnation) counts as alive on this shard: its lease has not
-- expired; or it expired while no node could refresh here (a late owner, not a dead one):
-- during such a period, and after it until the window has passed (see beat()), so that every
-- owner gets time to refresh before it counts as gone. A lease ended on purpose (score 0: an
-- earlier incarnation) is never excused. The reaper removes only owners that are not alive and
-- whose lease expired more than the grace ago, and nothing while the shard is in a gap (reap()).
local function alive(owner)
  local known = ALIVE[owner]
  if known == nil then
    local deadline = redis.call('ZSCORE', SHARD .. ':nodes', owner)
    if deadline == false then
      known = false
    else
      deadline = tonumber(deadline)
      known = deadline >= now_ms()
      if not known and deadline > 0 then
        local b = beat()
        if in_gap() then
          known = deadline >= b.last
        else
          known = b.up > 0 and deadline >= b.gap and now_ms() < b.up + b.window
        end
      end
    end
    ALIVE[owner] = known
  end
  return known
end

local function owner_of(field)
  local at = string.find(field, '\0', 1, true)
  return string.sub(field, 1, at - 1), string.sub(field, at + 1)
end

-- Sum of the counts of every owner (live=true: live owners only).
local function total(skey, live)
  local sum = 0
  local pairs_ = redis.call('HGETALL', skey)
  for i = 1, #pairs_, 2 do
    if not live or alive(pairs_[i]) then sum = sum + tonumber(pairs_[i + 1]) end
  end
  return sum
end

-- Distinct users held by live owners, as a flat array: user, user_info, user, user_info...
local function roster(key)
  local seen, out = {}, {}
  local fields = redis.call('HGETALL', key .. ':p')
  for i = 1, #fields, 2 do
    local owner, user = owner_of(fields[i])
    if not seen[user] and alive(owner) then
      seen[user] = true
      out[#out + 1] = user
      out[#out + 1] = fields[i + 1]
    end
  end
  return out
end

local function user_count(key)
  return #roster(key) / 2
end

-- Everything of a channel expires unless its owners refresh it (anti-entropy does).
local function touch(key, ttl)
  if ttl > 0 then
    redis.call('PEXPIRE', key .. ':s', ttl)
    redis.call('PEXPIRE', key .. ':p', ttl)
    redis.call('PEXPIRE', key .. ':u', ttl)
  end
end

-- Whether an owner still has any entry in a channel (then it stays in the owner's index).
local function owner_present(key, owner)
  if redis.call('HEXISTS', key .. ':s', owner) == 1 then return true end
  local prefix = owner .. '\0'
  for _, f in ipairs(redis.call('HKEYS', key .. ':p')) do
    if string.sub(f, 1, #prefix) == prefix then return true end
  end
  return false
end

-- An owner's index expires too (refreshed by its anti-entropy checks; deleted when reaped).
local function add_to_index(key, owner)
  local idx = SHARD .. ':idx:' .. owner
  redis.call('SADD', idx, key)
  if redis.call('PTTL', idx) == -1 then redis.call('PEXPIRE', idx, 600000) end
end

local function index(key, owner)
  local idx = SHARD .. ':idx:' .. owner
  if owner_present(key, owner) then
    add_to_index(key, owner)
  else
    redis.call('SREM', idx, key)
  end
end

-- The webhook outbox. A transition records its webhook here in the same call that makes it,
-- so a node killed right after loses nothing: any node claims due entries, delivers them and
-- acknowledges them (claim, ack, defer below). An entry's payload (':ev'):
-- id \0 created ms \0 kind \0 channel key \0 rest. Kinds: a member_added, m member_removed,
-- o channel_occupied, v channel_vacated, c subscription_count, e client_event, x cache_miss;
-- rest: the user id (a, m), the count (c), the event JSON (e). The id is stable: a receiver
-- de-duplicates redeliveries by it. Ids of one millisecond sort in the order they were made
-- (a zero-padded counter), and so do entries due at the same time. `hooks` (from the node's
-- app settings): the kinds wanted on this channel; nil (a version-4 node) records only the
-- held kinds, as version 4 did.
-- The outbox keys expire 10 minutes after their last use (an event is given up 5 minutes after
-- its transition anyway); the counter a second after (ids hold the millisecond, so a counter
-- that starts again never repeats one).
local OUTBOX_TTL = 600000
-- At most this many entries wait in a shard's outbox (due and being delivered): an endpoint down
-- for long must not grow memory without bound. Beyond it a new webhook is dropped and counted
-- in <tag>:dropped, which the next claim reports (and resets).
local OUTBOX_MAX = 100000

local function wants(hooks, kind)
  if hooks == nil then return kind == 'm' or kind == 'v' end
  return string.find(hooks, kind, 1, true) ~= nil
end

local function new_id()
  local n = redis.call('INCR', SHARD .. ':seq')
  redis.call('PEXPIRE', SHARD .. ':seq', 1000)
  return SHARD .. ':' .. now_ms() .. ':' .. string.format('%012d', n)
end

-- An entry's payload, made now under a new id; and the id of a payload.
local function payload(kind, key, rest)
  local id = new_id()
  return id, id .. '\0' .. now_ms() .. '\0' .. kind .. '\0' .. key .. '\0' .. rest
end

local function id_of(val)
  return string.match(val, '^[^%z]*')
end

local function outbox(kind, key, rest, at, name)
  local ev, due = SHARD .. ':ev', SHARD .. ':due'
  if redis.call('HLEN', ev) >= OUTBOX_MAX then
    redis.call('INCR', SHARD .. ':dropped')
    redis.call('PEXPIRE', SHARD .. ':dropped', OUTBOX_TTL)
    return
  end
  local id, val = payload(kind, key, rest)
  redis.call('HSET', ev, name or id, val)
  redis.call('ZADD', due, at, name or id)
  redis.call('PEXPIRE', ev, OUTBOX_TTL)
  redis.call('PEXPIRE', due, OUTBOX_TTL)
end

-- Payload of a held entry recorded by a version-4 node (a name, no payload).
local function legacy_payload(name)
  local key, kind, user = string.match(name, '^(.-)%z(%a)%z(.*)$')
  if key == nil then return nil end
  local _, val = payload(kind, key, user)
  return val
end

-- A held entry (named `name`, cancellable) whose time has not come: cancel it and say so. One
-- whose time has come is due: it goes on under its own id (a new one of the same name may
-- follow), and is not cancelled.
local function cancel_held(name)
  local due = SHARD .. ':due'
  local score = redis.call('ZSCORE', due, name)
  if not score then return false end
  local ev = SHARD .. ':ev'
  local val = redis.call('HGET', ev, name)
  redis.call('ZREM', due, name)
  redis.call('HDEL', ev, name)
  if tonumber(score) > now_ms() then return true end
  val = val or legacy_payload(name)
  if val then
    local id = id_of(val)
    redis.call('HSET', ev, id, val)
    redis.call('ZADD', due, score, id)
  end
  return false
end

-- Adds an owner's presence of a user. Returns added (first owner of the user), webhook (a
-- member_added webhook was recorded, or would be if wanted: not when it cancels a held
-- member_removed).
local function add_member(key, owner, user, info, exclude, hooks)
  local pkey = key .. ':p'
  local field = owner .. '\0' .. user
  if redis.call('HSET', pkey, field, info) == 0 then return false, false end
  add_to_index(key, owner)
  if redis.call('HINCRBY', key .. ':u', user, 1) ~= 1 then return false, false end
  -- The user id is length-prefixed: it may hold any byte, NUL included (gateway/shards/contract.py).
  -- 'M', not version 3's 'A': nodes of version 3 ignore kinds they do not know.
  redis.call('PUBLISH', key, 'M' .. exclude .. '\0' .. #user .. ':' .. user .. info)
  if cancel_held(key .. '\0m\0' .. user) then return true, false end
  if wants(hooks, 'a') then outbox('a', key, user, now_ms()) end
  return true, true
end

-- Removes an owner's presence of a user; on the user's last owner: member_removed, published
-- now, its webhook held `hold` ms. Returns whether it was the last.
local function remove_member(key, owner, user, hold, hooks)
  if redis.call('HDEL', key .. ':p', owner .. '\0' .. user) == 0 then return false end
  local ukey = key .. ':u'
  if redis.call('HINCRBY', ukey, user, -1) > 0 then return false end
  redis.call('HDEL', ukey, user)
  redis.call('PUBLISH', key, 'R' .. user)
  if wants(hooks, 'm') then
    local name = key .. '\0m\0' .. user
    cancel_held(name)  -- an earlier one already due goes on under its own id
    outbox('m', key, user, now_ms() + hold, name)
  end
  return true
end

local function is_presence(key)
  return string.find(key, ':presence-', 1, true) ~= nil
end

-- Sets an owner's absolute subscriber count. Returns before, after (totals over all owners)
-- and whether a channel_occupied webhook is due.
local function set_count(key, owner, count, hold, publish, hooks)
  local skey = key .. ':s'
  local old = tonumber(redis.call('HGET', skey, owner) or '0')
  local before = total(skey, false)
  if count == old then return before, before, false end
  if count > 0 then
    redis.call('HSET', skey, owner, count)
    add_to_index(key, owner)
  else
    redis.call('HDEL', skey, owner)
  end
  local after = before - old + count
  local occupied = false
  if before == 0 and after > 0 then
    redis.call('SADD', SHARD .. ':chans', key)
    if redis.call('PTTL', SHARD .. ':chans') == -1 then
      redis.call('PEXPIRE', SHARD .. ':chans', 600000)
    end
    occupied = not cancel_held(key .. '\0v\0')
    if occupied and wants(hooks, 'o') then outbox('o', key, '', now_ms()) end
  elseif after == 0 and before > 0 then
    redis.call('SREM', SHARD .. ':chans', key)
    if wants(hooks, 'v') then
      cancel_held(key .. '\0v\0')
      outbox('v', key, '', now_ms() + hold, key .. '\0v\0')
    end
  end
  if after > 0 and after ~= before and hooks and not is_presence(key) and wants(hooks, 'c') then
    outbox('c', key, tostring(after), now_ms())
  end
  if publish and after > 0 and not is_presence(key) then
    -- Large channels announce their count at most every 5 s.
    if after <= 100 or redis.call('SET', key .. ':ct', '1', 'NX', 'PX', 5000) then
      redis.call('PUBLISH', key, 'C' .. after)
    end
  end
  return before, after, occupied
end

-- Presence join of one user on one gateway node (owner). args: owner, user_id, user_info,
-- exclude socket id, max members, webhook hold ms, ttl ms, hooks (left out by version-4
-- nodes). Reply: {added, webhook, roster}; {-1} when the channel is full.
local function pjoin(key, a, p, argc)
  local owner, user, info, exclude = a[p], a[p + 1], a[p + 2], a[p + 3]
  local hooks = argc == 8 and a[p + 7] or nil
  local ukey = key .. ':u'
  if redis.call('HEXISTS', ukey, user) == 0 and redis.call('HLEN', ukey) >= tonumber(a[p + 4]) then
    return {-1}
  end
  local added, webhook = add_member(key, owner, user, info, exclude, hooks)
  if not added then redis.call('HSET', key .. ':p', owner .. '\0' .. user, info) end
  touch(key, tonumber(a[p + 6]))
  return {added and 1 or 0, webhook and 1 or 0, roster(key)}
end

-- Presence leave. args: owner, user_id, webhook hold ms, hooks (may be left out). Reply: 1 if
-- it was the last owner.
local function pleave(key, a, p, argc)
  local hooks = argc == 4 and a[p + 3] or nil
  local last = remove_member(key, a[p], a[p + 1], tonumber(a[p + 2]), hooks)
  index(key, a[p])
  return last and 1 or 0
end

-- A node's absolute subscriber count. args: owner, count, hold ms, publish (1 = broadcast
-- pusher_internal:subscription_count), ttl ms, hooks (may be left out). Reply: {before, after,
-- occupied}.
local function subs(key, a, p, argc)
  local owner = a[p]
  local hooks = argc == 6 and a[p + 5] or nil
  local before, after, occupied = set_count(key, owner, tonumber(a[p + 1]), tonumber(a[p + 2]),
    a[p + 3] == '1', hooks)
  index(key, owner)
  touch(key, tonumber(a[p + 4]))
  return {before, after, occupied and 1 or 0}
end

-- Whether sync's arguments are version 5's (owner, count, hold, publish, ttl, hooks, n, pairs)
-- rather than version 4's (no hooks). Hooks are letters, never a number.
local function sync_v5(argc, a, first)
  local n = tonumber(a[first + 6])
  return tonumber(a[first + 5]) == nil and n ~= nil and argc >= 7 and argc == 7 + 2 * n
end

-- Re-assertion: make an owner's entries in a channel exactly what the node holds. args: owner,
-- count, hold, publish, ttl, hooks (left out by version-4 nodes), n, then n pairs user,
-- user_info. Reply: the webhooks due, as strings 'occupied' and 'added\0<user>'.
local function sync(key, a, p, argc)
  local owner, hold, ttl = a[p], tonumber(a[p + 2]), tonumber(a[p + 4])
  local hooks, base = nil, p + 5
  if sync_v5(argc, a, p) then hooks, base = a[p + 5], p + 6 end
  local n = tonumber(a[base])
  local want, out = {}, {}
  for i = 0, n - 1 do want[a[base + 1 + 2 * i]] = a[base + 2 + 2 * i] end
  local prefix = owner .. '\0'
  for _, f in ipairs(redis.call('HKEYS', key .. ':p')) do
    if string.sub(f, 1, #prefix) == prefix then
      local user = string.sub(f, #prefix + 1)
      if want[user] == nil then remove_member(key, owner, user, hold, hooks) end
    end
  end
  for i = 0, n - 1 do
    local user, info = a[base + 1 + 2 * i], a[base + 2 + 2 * i]
    local added, webhook = add_member(key, owner, user, info, '', hooks)
    if not added then redis.call('HSET', key .. ':p', owner .. '\0' .. user, info) end
    if webhook then out[#out + 1] = 'added\0' .. user end
  end
  local _, _, occupied = set_count(key, owner, tonumber(a[p + 1]), hold, a[p + 3] == '1', hooks)
  if occupied then out[#out + 1] = 'occupied' end
  index(key, owner)
  touch(key, ttl)
  return out
end

-- Owner lease on this shard (key: the shard tag). args: owner, lease ms, first (1 on a node's
-- first lease: earlier incarnations of the same node id are dead at once), gap ms (no refresh
-- from any node for longer than this is a period in which the shard was unreachable), grace
-- ms (the nodes' reap grace); the last two may be left out (version-3 nodes). Reply: deadline.
local function lease(key, a, p)
  local owner, nodes = a[p], key .. ':nodes'
  local now, ms = now_ms(), tonumber(a[p + 1])
  local deadline = now + ms
  if a[p + 2] == '1' then
    local node = string.sub(owner, 1, string.find(owner, '@', 1, true))
    for _, other in ipairs(redis.call('ZRANGE', nodes, 0, -1)) do
      if other ~= owner and string.sub(other, 1, #node) == node then
        redis.call('ZADD', nodes, 0, other)
      end
    end
  end
  redis.call('ZADD', nodes, deadline, owner)
  -- The lease table outlives any lease by far, but not a deployment that stopped entirely.
  redis.call('PEXPIRE', nodes, 100 * ms)
  local bkey = key .. ':beat'
  local gapms = tonumber(a[p + 3]) or DEFAULT_GAP_MS
  local grace = tonumber(a[p + 4]) or DEFAULT_GRACE_MS
  local last = tonumber(redis.call('HGET', bkey, 'last') or '0')
  -- No history yet (a new shard, or one silent for 100 leases): nothing to excuse. A gap
  -- threshold of 0 turns the rule off.
  if gapms > 0 and last > 0 and now - last > gapms then
    redis.call('HSET', bkey, 'gap', last, 'up', now)
  end
  redis.call('HSET', bkey, 'last', now, 'gapms', gapms, 'grace', grace)
  redis.call('PEXPIRE', bkey, 100 * ms)
  return deadline
end

-- One entry's contribution to an owner's digest: 32 bits of its sha1, summed (order-free).
local function entry_hash(text)
  return tonumber(string.sub(redis.sha1hex(text), 1, 8), 16)
end

-- Anti-entropy check (key: the shard tag). args: owner, ttl ms. Refreshes the expiry of every
-- channel the owner has entries in and returns {entries, digest} of what this shard holds for
-- the owner; the node compares it with the digest of what it really holds.
local function check(key, a, p)
  local owner, ttl = a[p], tonumber(a[p + 1])
  local idx = key .. ':idx:' .. owner
  local n, sum = 0, 0
  local prefix = owner .. '\0'
  for _, ck in ipairs(redis.call('SMEMBERS', idx)) do
    local count = redis.call('HGET', ck .. ':s', owner)
    if count then
      n = n + 1
      sum = (sum + entry_hash('s\0' .. ck .. '\0' .. count)) % 4294967296
    end
    local fields = redis.call('HGETALL', ck .. ':p')
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, #prefix) == prefix then
        n = n + 1
        local text = 'p\0' .. ck .. '\0' .. string.sub(fields[i], #prefix + 1) .. '\0' .. fields[i + 1]
        sum = (sum + entry_hash(text)) % 4294967296
      end
    end
    touch(ck, ttl)
  end
  if ttl > 0 then
    redis.call('PEXPIRE', idx, ttl)
    redis.call('PEXPIRE', key .. ':chans', ttl)
  end
  return {n, tostring(sum)}
end

-- Removes up to `limit` channels' entries of a dead owner through the normal transitions, and
-- the owner's lease once it has no entry left. Returns channels done, entries removed.
local function reap_owner(key, owner, limit, hold)
  local idx = key .. ':idx:' .. owner
  local prefix = owner .. '\0'
  local done, removed = 0, 0
  for _, ck in ipairs(redis.call('SRANDMEMBER', idx, limit)) do
    -- Held webhooks of every app's channels are recorded (the reaper does not know the apps;
    -- nodes drop what no endpoint wants), but none of internal '#' channels.
    local hooks = string.find(ck, ':#', 1, true) and '' or 'mv'
    for _, f in ipairs(redis.call('HKEYS', ck .. ':p')) do
      if string.sub(f, 1, #prefix) == prefix then
        remove_member(ck, owner, string.sub(f, #prefix + 1), hold, hooks)
        removed = removed + 1
      end
    end
    if redis.call('HEXISTS', ck .. ':s', owner) == 1 then
      set_count(ck, owner, 0, hold, true, hooks)
      removed = removed + 1
    end
    redis.call('SREM', idx, ck)
    done = done + 1
  end
  if redis.call('SCARD', idx) == 0 then
    redis.call('ZREM', key .. ':nodes', owner)
  end
  return done, removed
end

-- Reaper (key: the shard tag). args: token, lock ms, limit, hold ms, grace ms (may be left out:
-- version-3 nodes). Takes or renews
-- the shard's reap lock; under it, removes up to `limit` channels' entries of owners that are
-- not alive (see alive()) and whose lease expired more than `grace` ms ago, through the same
-- transitions as normal leaves (member_removed, channel_vacated). An owner that was late, not
-- dead, and refreshes within the grace comes back with no event at all. Reply: {-1} when
-- another node holds the lock, else {channels reaped, dead owners left, entries removed}.
local function reap(key, a, p)
  local token, lock = a[p], key .. ':reaper'
  local holder = redis.call('GET', lock)
  if holder and holder ~= token then return {-1} end
  redis.call('SET', lock, token, 'PX', tonumber(a[p + 1]))
  local limit, hold = tonumber(a[p + 2]), tonumber(a[p + 3])
  local cutoff = '(' .. (now_ms() - (tonumber(a[p + 4]) or DEFAULT_GRACE_MS))
  local nodes = key .. ':nodes'
  local done, removed = 0, 0
  -- Nobody has refreshed here lately: the nodes cannot reach the shard, or it is just back and
  -- they have not refreshed yet. Nobody is announced as gone now.
  if in_gap() then return {0, redis.call('ZCOUNT', nodes, '-inf', cutoff), 0} end
  for _, owner in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', cutoff, 'LIMIT', 0, 16)) do
    if done >= limit then break end
    if not alive(owner) then
      local d, r = reap_owner(key, owner, limit - done, hold)
      done, removed = done + d, removed + r
    end
  end
  return {done, redis.call('ZCOUNT', nodes, '-inf', cutoff), removed}
end

-- Audit repair of one channel's derived state (key: the channel). args: ttl ms. Rebuilds the
-- per-user owner counts from the presence entries, the shard's occupied-channel set and every
-- owner's index from the counts, and sets the expiry. Reply: number of corrections.
local function repair(key, a, p)
  local fixes = 0
  local want = {}
  local fields = redis.call('HGETALL', key .. ':p')
  local owners = {}
  for i = 1, #fields, 2 do
    local owner, user = owner_of(fields[i])
    want[user] = (want[user] or 0) + 1
    owners[owner] = true
  end
  local ukey = key .. ':u'
  local have = redis.call('HGETALL', ukey)
  for i = 1, #have, 2 do
    if want[have[i]] == nil then
      redis.call('HDEL', ukey, have[i])
      fixes = fixes + 1
    end
  end
  for user, n in pairs(want) do
    if tonumber(redis.call('HGET', ukey, user) or '0') ~= n then
      redis.call('HSET', ukey, user, n)
      fixes = fixes + 1
    end
  end
  local counts = redis.call('HGETALL', key .. ':s')
  for i = 1, #counts, 2 do owners[counts[i]] = true end
  local occupied = total(key .. ':s', false) > 0
  if (redis.call('SISMEMBER', SHARD .. ':chans', key) == 1) ~= occupied then
    fixes = fixes + 1
    if occupied then redis.call('SADD', SHARD .. ':chans', key)
    else redis.call('SREM', SHARD .. ':chans', key) end
  end
  for owner, _ in pairs(owners) do
    if redis.call('SISMEMBER', SHARD .. ':idx:' .. owner, key) == 0 then
      add_to_index(key, owner)
      fixes = fixes + 1
    end
  end
  touch(key, tonumber(a[p]))
  return fixes
end

-- Audit repair: silently remove the entries of an owner that never held a lease (nobody was
-- ever shown them, so no member_removed or channel_vacated is due). args: owner.
local function purge(key, a, p)
  local owner = a[p]
  local prefix = owner .. '\0'
  local removed = 0
  for _, f in ipairs(redis.call('HKEYS', key .. ':p')) do
    if string.sub(f, 1, #prefix) == prefix then
      redis.call('HDEL', key .. ':p', f)
      local user = string.sub(f, #prefix + 1)
      if redis.call('HINCRBY', key .. ':u', user, -1) <= 0 then redis.call('HDEL', key .. ':u', user) end
      removed = removed + 1
    end
  end
  if redis.call('HDEL', key .. ':s', owner) == 1 then
    removed = removed + 1
    if total(key .. ':s', false) == 0 then redis.call('SREM', SHARD .. ':chans', key) end
  end
  redis.call('SREM', SHARD .. ':idx:' .. owner, key)
  return removed
end

-- Audit repair of a shard-level problem (key: the shard tag). args: action, target key, ttl.
-- 'del' removes a key that does not belong on this shard; 'pexpire' gives a key an expiry.
local function admin(key, a, p)
  if a[p] == 'del' then return redis.call('DEL', a[p + 1]) end
  if a[p] == 'pexpire' then return redis.call('PEXPIRE', a[p + 1], tonumber(a[p + 2])) end
  return redis.error_reply('BADOP unknown admin action ' .. tostring(a[p]))
end

-- Outbox entries to deliver (key: the shard tag). args: limit, lease ms. Entries claimed
-- before whose lease ran out (the claiming node died or gave them back late) come first, then
-- due ones; each is leased to the caller for `lease` ms (it acks or defers them meanwhile, or
-- another node gets them after). Reply: the shard's time (ms), the webhooks dropped since the
-- last claim because the outbox was full, then the payloads (see outbox()).
-- Version-4 form (args: limit): removes and returns due held entries named the version-4 way.
local function claim(key, a, p, argc)
  local due, inflight, ev = key .. ':due', key .. ':inflight', key .. ':ev'
  local now, limit = now_ms(), tonumber(a[p])
  if argc == 1 then
    local out = {}
    for _, name in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit)) do
      if string.find(name, '^.-%z%a%z') then
        redis.call('ZREM', due, name)
        redis.call('HDEL', ev, name)
        out[#out + 1] = name
      end
    end
    return out
  end
  local lease = tonumber(a[p + 1])
  local out = {now, tonumber(redis.call('GETDEL', key .. ':dropped')) or 0}
  local head = #out
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', inflight, '-inf', now, 'LIMIT', 0, limit)) do
    local val = redis.call('HGET', ev, id)
    if val then
      redis.call('ZADD', inflight, now + lease, id)
      out[#out + 1] = val
    else
      redis.call('ZREM', inflight, id)
    end
  end
  if #out - head < limit then
    for _, name in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, limit - (#out - head))) do
      local val = redis.call('HGET', ev, name) or legacy_payload(name)
      redis.call('ZREM', due, name)
      redis.call('HDEL', ev, name)
      if val then
        local id = id_of(val)
        redis.call('HSET', ev, id, val)
        redis.call('ZADD', inflight, now + lease, id)
        out[#out + 1] = val
      end
    end
  end
  if #out > head then
    for _, k in ipairs({ev, inflight}) do redis.call('PEXPIRE', k, OUTBOX_TTL) end
  end
  return out
end

-- Delivered (or given up): outbox entries leave (key: the shard tag). args: ids, one per line.
-- Reply: entries removed.
local function ack(key, a, p)
  local n = 0
  for id in string.gmatch(a[p], '[^\n]+') do
    n = n + redis.call('ZREM', key .. ':inflight', id)
    redis.call('HDEL', key .. ':ev', id)
  end
  return n
end

-- Keep claimed entries for longer, or give them back later (key: the shard tag). args: ids
-- (one per line), delay ms: any node may claim them again that long from now. Reply: entries
-- still claimed.
local function defer(key, a, p)
  local n, at = 0, now_ms() + tonumber(a[p + 1])
  for id in string.gmatch(a[p], '[^\n]+') do
    if redis.call('ZSCORE', key .. ':inflight', id) then
      redis.call('ZADD', key .. ':inflight', at, id)
      n = n + 1
    end
  end
  return n
end

-- A webhook that goes with no write of state (key: the channel). args: kind (x cache_miss),
-- rest. Recorded in the outbox, due now.
local function hook(key, a, p)
  outbox(a[p], key, a[p + 1], now_ms())
  return 1
end

-- Publishes the payload (`E...` or `T`) on the channel key. args: payload, then the kind and
-- rest of the webhook recorded with it, in this same call (`e` client_event; '' for none).
-- Version-4 nodes send the payload only.
local function publish(key, a, p, argc)
  local r = redis.call('PUBLISH', key, a[p])
  if argc == 3 and a[p + 1] ~= '' then outbox(a[p + 1], key, a[p + 2], now_ms()) end
  return r
end

-- op name -> {argument count (a list: any of these; -1: variable, see arity_ok), apply(key,
-- argv, first)}
local OPS = {
  hset = {3, function(key, a, p)
    local r = redis.call('HSET', key, a[p], a[p + 1])
    local ttl = tonumber(a[p + 2])
    if ttl and ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    return r
  end},
  hdel = {1, function(key, a, p) return redis.call('HDEL', key, a[p]) end},
  del = {0, function(key) return redis.call('DEL', key) end},
  pexpire = {1, function(key, a, p) return redis.call('PEXPIRE', key, a[p]) end},
  pjoin = {{7, 8}, pjoin},
  pleave = {{3, 4}, pleave},
  subs = {{5, 6}, subs},
  sync = {-1, sync},
  publish = {{1, 3}, publish},
  cache = {2, function(key, a, p)
    return redis.call('SET', key .. ':c', a[p], 'PX', a[p + 1])
  end},
  claim = {{1, 2}, claim},
  ack = {1, ack},
  defer = {2, defer},
  hook = {2, hook},
  lease = {{3, 5}, lease},
  check = {2, check},
  reap = {{4, 5}, reap},
  repair = {1, repair},
  purge = {1, purge},
  admin = {3, admin},
}

-- Whether `argc` arguments fit an op's arity: a count, a list of counts, or -1 (sync: six
-- arguments then as many pairs as the sixth says).
local function arity_ok(arity, argc, argv, first)
  if type(arity) == 'table' then
    for _, n in ipairs(arity) do
      if n == argc then return true end
    end
    return false
  end
  if arity == -1 then
    return sync_v5(argc, argv, first)
      or (argc >= 6 and argc == 6 + 2 * (tonumber(argv[first + 5]) or -1))
  end
  return arity == argc
end

-- Returns an error message when this server must not apply a write for (uuid, epoch).
local function check_identity(uuid, epoch)
  local id = redis.call('HMGET', IDENTITY, 'uuid', 'epoch', 'name', 'tag')
  if not id[1] then
    return 'NOIDENTITY this server holds no shard identity; run presence-gateway shards init'
  end
  if id[1] ~= uuid then
    return 'WRONGSHARD this server is ' .. tostring(id[3]) .. ' (uuid ' .. id[1]
      .. '); the write was meant for uuid ' .. tostring(uuid)
  end
  if id[2] ~= epoch then
    return 'STALEEPOCH this server is at topology epoch ' .. tostring(id[2])
      .. '; the write was tagged for epoch ' .. tostring(epoch)
  end
  if not id[4] then
    return 'NOIDENTITY the shard identity predates this library; run presence-gateway shards init'
  end
  SHARD = id[4]
  NOW = nil
  BEAT = nil
  ALIVE = {}
  return nil
end

local function apply(keys, argv)
  local err = check_identity(argv[1], argv[2])
  if err then return redis.error_reply(err) end
  local prefix = argv[1] .. ':' .. argv[2] .. ':'
  local n, nargs = #keys, #argv
  local out, starts, argcs = {}, {}, {}
  local p = 3
  -- First pass: framing and tags, no effect yet.
  for i = 1, n do
    local op, tag, argc = argv[p], argv[p + 1], tonumber(argv[p + 2])
    if op == nil or tag == nil or argc == nil or argc < 0 or p + 2 + argc > nargs then
      return redis.error_reply('BADOP malformed batch at operation ' .. i)
    end
    local first = p + 3
    p = first + argc
    local spec = OPS[op]
    if spec == nil or not arity_ok(spec[1], argc, argv, first) then
      out[i] = redis.error_reply('BADOP unknown operation or wrong argument count: ' .. op)
    elseif string.sub(redis.sha1hex(prefix .. keys[i]), 1, 16) ~= tag then
      out[i] = redis.error_reply('BADTAG tag does not match key ' .. keys[i])
    else
      starts[i] = first
      argcs[i] = argc
    end
  end
  if p - 1 ~= nargs then
    return redis.error_reply('BADOP ' .. (nargs - p + 1) .. ' trailing arguments')
  end
  -- Second pass: apply the verified operations in order.
  for i = 1, n do
    local first = starts[i]
    if first then out[i] = OPS[argv[first - 3]][2](keys[i], argv, first, argcs[i]) end
  end
  return out
end

-- Reads: no tag (they change nothing), served by the verified link of the shard. They count
-- only entries of owners with a live lease, so a dead node's leftovers are never reported.
local function read_prepare()
  SHARD = redis.call('HGET', IDENTITY, 'tag')
  NOW = nil
  BEAT = nil
  ALIVE = {}
  return SHARD
end

local function read_roster(keys)
  if not read_prepare() then return redis.error_reply('NOIDENTITY run shards init') end
  return roster(keys[1])
end

-- {subscription count, user count} of a channel.
local function read_info(keys)
  if not read_prepare() then return redis.error_reply('NOIDENTITY run shards init') end
  return {total(keys[1] .. ':s', true), user_count(keys[1])}
end

-- Occupied channels on this shard whose key starts with ARGV[1] ('{<app>:<prefix>'):
-- flat array of key, subscription count, user count (live owners only; empty ones left out).
local function read_channels(keys, argv)
  if not read_prepare() then return redis.error_reply('NOIDENTITY run shards init') end
  local prefix, out = argv[1], {}
  for _, key in ipairs(redis.call('SMEMBERS', keys[1] .. ':chans')) do
    if string.sub(key, 1, #prefix) == prefix then
      local count = total(key .. ':s', true)
      if count > 0 then
        out[#out + 1] = key
        out[#out + 1] = count
        out[#out + 1] = user_count(key)
      end
    end
  end
  return out
end

-- Channels an owner has entries in on this shard (key: the shard tag; ARGV[1]: owner).
local function read_owned(keys, argv)
  return redis.call('SMEMBERS', keys[1] .. ':idx:' .. argv[1])
end

-- Every owner with a lease on this shard (key: the shard tag), as a flat array of owner,
-- deadline (ms, Redis clock), state: 'live' (counted by reads), 'late' (not counted, but
-- within the reap grace: it may still refresh) or 'dead' (the reaper removes its entries).
local function read_leases(keys)
  if not read_prepare() then return redis.error_reply('NOIDENTITY run shards init') end
  local out = {}
  local all = redis.call('ZRANGE', keys[1] .. ':nodes', 0, -1, 'WITHSCORES')
  local grace = beat().grace
  for i = 1, #all, 2 do
    local owner, deadline = all[i], tonumber(all[i + 1])
    local state = 'dead'
    if alive(owner) then state = 'live'
    elseif deadline >= now_ms() - grace then state = 'late' end
    out[#out + 1] = owner
    out[#out + 1] = all[i + 1]
    out[#out + 1] = state
  end
  return out
end

-- {cached event or false, remaining ms}
local function read_cache(keys)
  local ck = keys[1] .. ':c'
  return {redis.call('GET', ck), redis.call('PTTL', ck)}
end

redis.register_function('pg_apply', apply)
redis.register_function{function_name = 'pg_roster', callback = read_roster, flags = {'no-writes'}}
redis.register_function{function_name = 'pg_info', callback = read_info, flags = {'no-writes'}}
redis.register_function{
  function_name = 'pg_channels', callback = read_channels, flags = {'no-writes'}}
redis.register_function{function_name = 'pg_cache', callback = read_cache, flags = {'no-writes'}}
redis.register_function{
  function_name = 'pg_leases', callback = read_leases, flags = {'no-writes'}}
redis.register_function{function_name = 'pg_owned', callback = read_owned, flags = {'no-writes'}}
redis.register_function{
  function_name = 'pg_version',
  callback = function() return LIB_VERSION end,
  flags = {'no-writes'},
}
