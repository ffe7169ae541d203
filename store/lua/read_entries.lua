-- read_entries: fenced delivery of a partition's entries to its leaseholder.
-- Entries still pending for this consumer come first (XREADGROUP ... <id>, in id order);
-- only when none are left are new ones taken (XREADGROUP ... >). Entries are taken in
-- small chunks until `count` entries or `max_bytes` of entry data: a partition full of
-- large events never loads more than about that into memory at once. Entries delivered
-- past the budget stay pending for this consumer and come first in the next read.
-- KEYS[1] lease      the partition's lease for this group
-- KEYS[2] stream     the partition's stream
-- KEYS[3] attempts   hash: entry id -> counted attempts
-- ARGV[1] value      the lease value the caller holds
-- ARGV[2] group      the consumer group
-- ARGV[3] consumer   the caller's consumer name
-- ARGV[4] count      the most entries to return
-- ARGV[5] max_bytes  stop adding entries once their data reaches this size
-- ARGV[6..]          pending ids to pass over: entries the processor is still working
--                    on in the background (it settles them itself)
-- Returns {'stale'} when the lease is not the caller's (nothing is delivered), else
-- {'ok', source, entries, attempts, tail, more}: source is 'pending' or 'new'; entries are
-- {id, fields} ({id, false} for an entry deleted from the stream); attempts are the
-- counted attempts of each entry (false for none); tail is the id of the stream's last
-- entry ('0-0' when empty), from which a plain XREAD BLOCK waits for more; more is 1
-- when the byte budget cut the read short.
local lease, stream, attempts = KEYS[1], KEYS[2], KEYS[3]
local value, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local count, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local CHUNK = 10
local skip = {}
for i = 6, #ARGV do skip[ARGV[i]] = true end

if rcall('GET', lease) ~= value then
  return {'stale'}
end

local function entries_of(reply)
  if not reply or not reply[1] then return {} end
  return reply[1][2]
end

local function size(entry)
  local n = #entry[1]
  if entry[2] then
    for _, v in ipairs(entry[2]) do n = n + #v end
  end
  return n
end

-- Take entries from `start` ('0' and then the last id seen for pending ones, '>' for new).
local function take(start)
  local taken, bytes, cursor = {}, 0, start
  while #taken < count do
    local got = entries_of(rcall('XREADGROUP', 'GROUP', group, consumer,
      'COUNT', math.min(CHUNK, count - #taken), 'STREAMS', stream, cursor))
    if #got == 0 then return taken, 0 end
    for _, entry in ipairs(got) do
      if start == '>' or not skip[entry[1]] then
        taken[#taken + 1] = entry
        bytes = bytes + size(entry)
        if bytes >= max_bytes then return taken, 1 end
      end
    end
    if start ~= '>' then cursor = got[#got][1] end
  end
  return taken, 0
end

local source = 'pending'
local entries, more = take('0')
if #entries == 0 then
  source = 'new'
  entries, more = take('>')
end

local counted = {}
if #entries > 0 then
  local ids = {}
  for i, entry in ipairs(entries) do ids[i] = entry[1] end
  counted = rcall('HMGET', attempts, unpack(ids))
end

local tail = '0-0'
local last = rcall('XREVRANGE', stream, '+', '-', 'COUNT', 1)
if last[1] then tail = last[1][1] end

return {'ok', source, entries, counted, tail, more}
