#!lua name=pg
--[[
Verified-write function library, loaded on every shard master by `presence-gateway shards init`.

Every state change the gateway makes goes through pg_apply, which checks before any effect that
the call was meant for this shard (uuid), under the current topology (epoch), and that each
operation's tag was computed for its exact key. The framing is described in docs/write-path.md.
]]

local LIB_VERSION = '1'
local IDENTITY = '__pg:shard'

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
}

-- Returns an error message when this server must not apply a write for (uuid, epoch).
local function check_identity(uuid, epoch)
  local id = redis.call('HMGET', IDENTITY, 'uuid', 'epoch', 'name')
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

redis.register_function('pg_apply', apply)
redis.register_function{
  function_name = 'pg_version',
  callback = function() return LIB_VERSION end,
  flags = {'no-writes'},
}
