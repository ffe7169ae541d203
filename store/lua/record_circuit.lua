-- record_circuit: record a worker's circuit breaker (its state, how often it opened) for
-- `memstream status`, and drop the records of workers not heard from for a while.
-- KEYS[1] circuits  hash: worker id -> '<server time ms> <state JSON>'
-- ARGV[1] worker    the worker's id
-- ARGV[2] state     the breaker's state as JSON ('' to remove the worker's record)
-- ARGV[3] keep_ms   records older than this (by the Redis clock) are dropped
-- Returns the number of records left.
local circuits = KEYS[1]
local worker, state, keep_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])

local now = now_ms()
if state == '' then
  rcall('HDEL', circuits, worker)
else
  rcall('HSET', circuits, worker, now .. ' ' .. state)
end
local flat = rcall('HGETALL', circuits)
local left = 0
for i = 1, #flat, 2 do
  local at = tonumber(string.match(flat[i + 1], '^(%d+) '))
  if at == nil or at < now - keep_ms then
    rcall('HDEL', circuits, flat[i])
  else
    left = left + 1
  end
end
return left
