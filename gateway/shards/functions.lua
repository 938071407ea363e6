#!lua name=pg
--[[
Verified-write function library, loaded on every shard master by `presence-gateway shards init`.

Every state change the gateway makes goes through pg_apply, which checks before any effect that
the call was meant for this shard (uuid), under the current topology (epoch), and that each
operation's tag was computed for its exact key. The framing is described in docs/write-path.md.
]]

local LIB_VERSION = '2'
local IDENTITY = '__pg:shard'

-- Set by apply() from the shard identity before any op runs: this shard's own hash tag, under
-- which its shard-wide keys live (':chans' occupied channels, ':due' held webhooks).
local SHARD = nil

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function total(skey)
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', skey)) do sum = sum + tonumber(v) end
  return sum
end

-- Distinct users of a presence channel as a flat array: user, user_info, user, user_info...
local function roster(key)
  local seen, out = {}, {}
  local fields = redis.call('HGETALL', key .. ':p')
  for i = 1, #fields, 2 do
    local f = fields[i]
    local user = string.sub(f, string.find(f, '\0', 1, true) + 1)
    if not seen[user] then
      seen[user] = true
      out[#out + 1] = user
      out[#out + 1] = fields[i + 1]
    end
  end
  return out
end

-- Presence join of one user on one gateway node (owner). args: owner, user_id, user_info,
-- exclude socket id, max members, webhook hold ms. Reply: {added, webhook, roster} where
-- added = this is the user's first connection anywhere; webhook = a member_added webhook is
-- due (0 when it cancels a held member_removed); roster = the channel's members;
-- or {-1} when the channel is full.
local function pjoin(key, a, p)
  local owner, user, info, exclude = a[p], a[p + 1], a[p + 2], a[p + 3]
  local pkey, ukey = key .. ':p', key .. ':u'
  local field = owner .. '\0' .. user
  if redis.call('HEXISTS', pkey, field) == 1 then
    redis.call('HSET', pkey, field, info)
    return {0, 0, roster(key)}
  end
  if redis.call('HEXISTS', ukey, user) == 0 and redis.call('HLEN', ukey) >= tonumber(a[p + 4]) then
    return {-1}
  end
  redis.call('HSET', pkey, field, info)
  local added = redis.call('HINCRBY', ukey, user, 1) == 1
  local webhook = 0
  if added then
    redis.call('PUBLISH', key, 'A' .. exclude .. '\0' .. user .. '\0' .. info)
    if redis.call('ZREM', SHARD .. ':due', key .. '\0m\0' .. user) == 0 then webhook = 1 end
  end
  return {added and 1 or 0, webhook, roster(key)}
end

-- Presence leave of one user on one gateway node. args: owner, user_id, webhook hold ms.
-- Reply: 1 when this was the user's last connection anywhere (member_removed published and
-- its webhook held), else 0.
local function pleave(key, a, p)
  local owner, user = a[p], a[p + 1]
  local ukey = key .. ':u'
  if redis.call('HDEL', key .. ':p', owner .. '\0' .. user) == 0 then return 0 end
  if redis.call('HINCRBY', ukey, user, -1) > 0 then return 0 end
  redis.call('HDEL', ukey, user)
  redis.call('PUBLISH', key, 'R' .. user)
  redis.call('ZADD', SHARD .. ':due', now_ms() + tonumber(a[p + 2]), key .. '\0m\0' .. user)
  return 1
end

-- A node's absolute subscriber count of a channel. args: owner, count, webhook hold ms,
-- publish (1 = broadcast pusher_internal:subscription_count). Reply: {before, after,
-- occupied} with the channel's totals and whether a channel_occupied webhook is due.
local function subs(key, a, p)
  local owner, count = a[p], tonumber(a[p + 1])
  local skey = key .. ':s'
  local old = tonumber(redis.call('HGET', skey, owner) or '0')
  local before = total(skey)
  if count == old then return {before, before, 0} end
  if count > 0 then redis.call('HSET', skey, owner, count) else redis.call('HDEL', skey, owner) end
  local after = before - old + count
  local occupied = 0
  if before == 0 and after > 0 then
    redis.call('SADD', SHARD .. ':chans', key)
    if redis.call('ZREM', SHARD .. ':due', key .. '\0v\0') == 0 then occupied = 1 end
  elseif after == 0 and before > 0 then
    redis.call('SREM', SHARD .. ':chans', key)
    redis.call('ZADD', SHARD .. ':due', now_ms() + tonumber(a[p + 2]), key .. '\0v\0')
  end
  if a[p + 3] == '1' and after > 0 then
    -- Large channels announce their count at most every 5 s.
    if after <= 100 or redis.call('SET', key .. ':ct', '1', 'NX', 'PX', 5000) then
      redis.call('PUBLISH', key, 'C' .. after)
    end
  end
  return {before, after, occupied}
end

-- Held webhooks whose time has come, claimed by exactly one caller. args: limit.
local function claim(key, a, p)
  local due = key .. ':due'
  local items = redis.call('ZRANGEBYSCORE', due, '-inf', now_ms(), 'LIMIT', 0, tonumber(a[p]))
  if #items > 0 then redis.call('ZREM', due, unpack(items)) end
  return items
end

-- op name -> {argument count, apply(key, argv, first_arg_index)}
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
  pjoin = {6, pjoin},
  pleave = {3, pleave},
  subs = {4, subs},
  publish = {1, function(key, a, p) return redis.call('PUBLISH', key, a[p]) end},
  cache = {2, function(key, a, p)
    return redis.call('SET', key .. ':c', a[p], 'PX', a[p + 1])
  end},
  claim = {1, claim},
}

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
  return nil
end

local function apply(keys, argv)
  local err = check_identity(argv[1], argv[2])
  if err then return redis.error_reply(err) end
  local prefix = argv[1] .. ':' .. argv[2] .. ':'
  local n, nargs = #keys, #argv
  local out, starts = {}, {}
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
    if spec == nil or spec[1] ~= argc then
      out[i] = redis.error_reply('BADOP unknown operation or wrong argument count: ' .. op)
    elseif string.sub(redis.sha1hex(prefix .. keys[i]), 1, 16) ~= tag then
      out[i] = redis.error_reply('BADTAG tag does not match key ' .. keys[i])
    else
      starts[i] = first
    end
  end
  if p - 1 ~= nargs then
    return redis.error_reply('BADOP ' .. (nargs - p + 1) .. ' trailing arguments')
  end
  -- Second pass: apply the verified operations in order.
  for i = 1, n do
    local first = starts[i]
    if first then out[i] = OPS[argv[first - 3]][2](keys[i], argv, first) end
  end
  return out
end

-- Reads: no tag (they change nothing), served by the verified link of the shard.
local function read_roster(keys) return roster(keys[1]) end

-- {subscription count, user count} of a channel.
local function read_info(keys)
  return {total(keys[1] .. ':s'), redis.call('HLEN', keys[1] .. ':u')}
end

-- Occupied channels on this shard whose key starts with ARGV[1] ('{<app>:<prefix>'):
-- flat array of key, subscription count, user count.
local function read_channels(keys, argv)
  local prefix, out = argv[1], {}
  for _, key in ipairs(redis.call('SMEMBERS', keys[1] .. ':chans')) do
    if string.sub(key, 1, #prefix) == prefix then
      out[#out + 1] = key
      out[#out + 1] = total(key .. ':s')
      out[#out + 1] = redis.call('HLEN', key .. ':u')
    end
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
  function_name = 'pg_version',
  callback = function() return LIB_VERSION end,
  flags = {'no-writes'},
}
