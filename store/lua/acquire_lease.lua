-- acquire_lease: take a partition's lease if nobody holds it, and only for a worker
-- that uses the partition count the partition belongs to.
-- KEYS[1] lease   the lease key (string, with a TTL)
-- KEYS[2] fence   the fencing counter (never expires; INCR on every acquisition)
-- KEYS[3] pcount  the partition's count ('moving' while it changes; absent before the
--                 count was ever changed)
-- ARGV[1] worker  the acquiring worker's id
-- ARGV[2] nonce   a random token of this acquisition
-- ARGV[3] ttl_ms  the lease TTL in milliseconds
-- ARGV[4] count   the partition count the worker routes with ('0': not checked, for a
--                 topic of one partition)
-- Returns {1, value} with value = "<fence>:<worker>:<nonce>" when acquired,
-- {0, holder, pttl} with the current holder's value and remaining TTL, or
-- {2, count} when the partition belongs to another count (or is 'moving').
local lease, fence, pcount = KEYS[1], KEYS[2], KEYS[3]
local worker, nonce, ttl_ms, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

if count ~= '0' then
  local belongs = rcall('GET', pcount)
  if belongs and belongs ~= count then
    return {2, belongs}
  end
end
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
