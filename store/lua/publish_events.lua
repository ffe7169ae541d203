-- publish_events: append a producer's events for one partition, all or none: Redis
-- refuses a script (out of memory, read-only replica) only at its first write, so either
-- every event of the partition is published, in order, or none is.
-- KEYS[1] ingest   ingest:{p}
-- KEYS[2] pcount   the count the partition belongs to (absent until the count is first
--                  changed; 'moving' while it changes)
-- ARGV[1]          the backlog bound: refuse when the stream would hold more entries
--                  (0: no bound)
-- ARGV[2]          the partition count the producer routed with ('0': not checked, the
--                  lifecycle stream)
-- ARGV[3..n]       the events' JSON texts, in publish order
-- Returns the entry ids, in order, or (nothing published) {'backlog', <entries held>},
-- or {'count', <the partition's count>} when the producer routed with another count.
local ingest, pcount = KEYS[1], KEYS[2]
local bound, count = tonumber(ARGV[1]), ARGV[2]
if count ~= '0' then
  local belongs = rcall('GET', pcount)
  if belongs and belongs ~= count then
    return {'count', belongs}
  end
end
if bound > 0 then
  local held = rcall('XLEN', ingest)
  if held + #ARGV - 2 > bound then
    return {'backlog', held}
  end
end
local ids = {}
for i = 3, #ARGV do
  ids[i - 2] = rcall('XADD', ingest, '*', 'event', ARGV[i])
end
return ids
