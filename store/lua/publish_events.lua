-- publish_events: append a producer's events for one partition, all or none: Redis
-- refuses a script (out of memory, read-only replica) only at its first write, so either
-- every event of the partition is published, in order, or none is.
-- KEYS[1] ingest   ingest:{p}
-- ARGV[1]          the backlog bound: refuse when the stream would hold more entries
--                  (0: no bound)
-- ARGV[2..n]       the events' JSON texts, in publish order
-- Returns the entry ids, in order, or {'backlog', <entries held>} (nothing published).
local ingest = KEYS[1]
local bound = tonumber(ARGV[1])
if bound > 0 then
  local held = rcall('XLEN', ingest)
  if held + #ARGV - 1 > bound then
    return {'backlog', held}
  end
end
local ids = {}
for i = 2, #ARGV do
  ids[i - 1] = rcall('XADD', ingest, '*', 'event', ARGV[i])
end
return ids
