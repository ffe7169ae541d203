-- claim_pending: on takeover, claim one page of every pending entry of a partition,
-- from any consumer, for the new leaseholder (XAUTOCLAIM min-idle 0 JUSTID).
-- When the previous holder did not hand the partition over cleanly (it died or was cut
-- off), the lowest pending entry that still exists counts one attempt (DESIGN rule 5):
-- after a takeover the new holder processes what it claimed one entry at a time, in id
-- order, so an entry that kills its worker is the lowest pending one at the next
-- takeover and is caught after N of them, while the entries behind it are never
-- charged for it. A partition held back at that entry (a newer schema waiting for an
-- upgrade) is not charged either.
-- When the cursor comes back to 0-0, consumers other than the caller that have nothing
-- pending are removed.
-- KEYS[1] lease     the partition's lease for this group
-- KEYS[2] stream    the partition's stream
-- KEYS[3] attempts  hash: entry id -> counted attempts
-- KEYS[4] held      why the partition is held back (JSON with "entry"), if it is
-- KEYS[5] released  the fence of the last clean release
-- ARGV[1] value     the lease value the caller holds
-- ARGV[2] group     the consumer group
-- ARGV[3] consumer  the caller's consumer name
-- ARGV[4] cursor    where to continue ('0-0' to start)
-- ARGV[5] count     the most entries per page (at most ~1000)
-- Returns {'stale'}, or {'ok', next_cursor, claimed_ids, gone_ids, removed_consumers}:
-- gone_ids are pending ids whose entries no longer exist (Redis 7 reports and drops
-- them here; Redis 6.2 leaves them pending and read_entries returns them as deleted).
local lease, stream, attempts, held, released = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local value, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local cursor, count = ARGV[4], tonumber(ARGV[5])

if rcall('GET', lease) ~= value then
  return {'stale'}
end

local reply = rcall('XAUTOCLAIM', stream, group, consumer, 0, cursor, 'COUNT', count, 'JUSTID')
local next_cursor, claimed, gone = reply[1], reply[2], reply[3] or {}
local own_fence = tonumber(string.match(value, '^(%d+):'))
local clean = tonumber(rcall('GET', released) or '-1') == own_fence - 1
if cursor == '0-0' and claimed[1] and not clean then
  local held_entry = nil
  local marker = rcall('GET', held)
  if marker then
    local ok, info = pcall(cjson.decode, marker)
    if ok and type(info) == 'table' then held_entry = info['entry'] end
  end
  for _, id in ipairs(claimed) do
    -- Redis 6.2 claims deleted entries too: charge the first one that still exists.
    if #rcall('XRANGE', stream, id, id) > 0 then
      if id ~= held_entry then
        rcall('HINCRBY', attempts, id, 1)
      end
      break
    end
  end
end
for _, id in ipairs(gone) do
  rcall('HDEL', attempts, id)
end

local removed = {}
if next_cursor == '0-0' then
  for _, info in ipairs(rcall('XINFO', 'CONSUMERS', stream, group)) do
    local c = kv(info)
    if c['name'] ~= consumer and tonumber(c['pending']) == 0 then
      rcall('XGROUP', 'DELCONSUMER', stream, group, c['name'])
      removed[#removed + 1] = c['name']
    end
  end
end
return {'ok', next_cursor, claimed, gone, removed}
