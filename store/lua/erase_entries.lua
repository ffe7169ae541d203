-- erase_entries: remove entries of a partition's ingest stream (erase-tenant) and raise
-- the partition's sweep mark in the same step. An appender batch read before the
-- removal and applied after it sees the mark and settles its removed entries as erased
-- (apply_batch.lua), so it cannot bring back what the erasure removes.
-- KEYS[1] ingest    ingest:{p}
-- KEYS[2] counters  hash: seq, gen, swept (the newest entry id an erasure removed; it
--                   only ever grows)
-- ARGV[1..n]        the entry ids to remove (at least one)
-- Returns the number of entries removed.
local ingest, counters = KEYS[1], KEYS[2]

local newest = ARGV[1]
for i = 2, #ARGV do
  if idcmp(ARGV[i], newest) > 0 then newest = ARGV[i] end
end
local mark = rcall('HGET', counters, 'swept')
if not mark or idcmp(newest, mark) > 0 then
  rcall('HSET', counters, 'swept', newest)
end
return rcall('XDEL', ingest, unpack(ARGV))
