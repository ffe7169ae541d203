-- mark_held: record (or clear) that a partition is held back at an entry, fenced, so a
-- stale holder can neither set nor clear the current holder's marker. The marker has no
-- TTL: it lasts until a holder processes the partition past the entry (however long the
-- workers are away), so a takeover never charges the held entry an attempt.
-- KEYS[1] lease   the partition's lease for this group
-- KEYS[2] held    the marker: JSON {entry, reason, worker, at}
-- ARGV[1] value   the lease value the caller holds
-- ARGV[2] info    the marker's JSON, or '' to clear it
-- Returns {'stale'} or {'ok'}.
local lease, held = KEYS[1], KEYS[2]
local value, info = ARGV[1], ARGV[2]

if rcall('GET', lease) ~= value then
  return {'stale'}
end
if info == '' then
  rcall('DEL', held)
else
  rcall('SET', held, info)
end
return {'ok'}
