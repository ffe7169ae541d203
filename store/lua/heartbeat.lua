-- heartbeat: record a worker as alive in its group's membership, drop members whose
-- last heartbeat is older than the member TTL, and return the live members. Times are
-- the Redis server's, so workers on machines with skewed clocks still agree.
-- KEYS[1] members  zset: worker id -> last heartbeat (ms)
-- ARGV[1] worker   the worker's id ('' to only read the membership)
-- ARGV[2] ttl_ms   how long a member without heartbeats counts as alive
-- ARGV[3] leave    '1' to remove the worker instead (graceful shutdown)
-- Returns the live members' ids, sorted.
local members = KEYS[1]
local worker, ttl_ms, leave = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local now = now_ms()
if leave == '1' then
  rcall('ZREM', members, worker)
elseif worker ~= '' then
  rcall('ZADD', members, now, worker)
end
rcall('ZREMRANGEBYSCORE', members, '-inf', now - ttl_ms)
local live = rcall('ZRANGE', members, 0, -1)
table.sort(live)
return live
