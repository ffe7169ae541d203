-- acquire_lease: take a partition's lease if nobody holds it.
-- KEYS[1] lease   the lease key (string, with a TTL)
-- KEYS[2] fence   the fencing counter (never expires; INCR on every acquisition)
-- ARGV[1] worker  the acquiring worker's id
-- ARGV[2] nonce   a random token of this acquisition
-- ARGV[3] ttl_ms  the lease TTL in milliseconds
-- Returns {1, value} with value = "<fence>:<worker>:<nonce>" when acquired,
-- or {0, holder, pttl} with the current holder's value and remaining TTL.
local lease, fence = KEYS[1], KEYS[2]
local worker, nonce, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])

local holder = rcall('GET', lease)
if holder then
  -- The same acquisition run twice (a retried call): it is ours.
  local suffix = ':' .. worker .. ':' .. nonce
  if string.sub(holder, -#suffix) == suffix then
    return {1, holder}
  end
  return {0, holder, rcall('PTTL', lease)}
end
local counter = rcall('INCR', fence)
local value = counter .. ':' .. worker .. ':' .. nonce
rcall('SET', lease, value, 'PX', ttl_ms)
return {1, value}
