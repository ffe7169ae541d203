-- acquire_lock: SET NX PX for a DistributedLock, with its fencing counter.
-- KEYS[1] lock    the lock key (string, with a TTL)
-- KEYS[2] fence   the lock's fencing counter: INCR on every acquisition; it expires
--                 after fence_ms unused, so locks on names that go away leave nothing
-- ARGV[1] owner   the acquiring owner's id
-- ARGV[2] nonce   a random token of this acquisition
-- ARGV[3] ttl_ms  the lock TTL in milliseconds
-- ARGV[4] fence_ms how long the fencing counter outlives its last acquisition
-- Returns {1, value} with value = "<fence>:<owner>:<nonce>" when acquired, or
-- {0, holder, pttl}.
local lock, fence = KEYS[1], KEYS[2]
local owner, nonce, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])

local holder = rcall('GET', lock)
if holder then
  return {0, holder, rcall('PTTL', lock)}
end
local counter = rcall('INCR', fence)
rcall('PEXPIRE', fence, math.max(tonumber(ARGV[4]), 2 * ttl_ms))
local value = counter .. ':' .. owner .. ':' .. nonce
rcall('SET', lock, value, 'PX', ttl_ms)
return {1, value}
