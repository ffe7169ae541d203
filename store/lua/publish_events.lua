-- publish_events: append a producer's events for one partition, all or none: Redis
-- refuses a script (out of memory, read-only replica) only at its first write, so either
-- every event of the partition is published, in order, or none is.
-- KEYS[1] ingest   ingest:{p}
-- ARGV[1..n]       the events' JSON texts, in publish order
-- Returns the entry ids, in order.
local ingest = KEYS[1]
local ids = {}
for i = 1, #ARGV do
  ids[i] = rcall('XADD', ingest, '*', 'event', ARGV[i])
end
return ids
