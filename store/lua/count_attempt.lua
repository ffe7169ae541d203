-- count_attempt: count one failed attempt at processing an entry (DESIGN rule 5).
-- KEYS[1] lease     the partition's lease for this group
-- KEYS[2] attempts  hash: entry id -> counted attempts
-- ARGV[1] value     the lease value the caller holds
-- ARGV[2] entry_id  the entry whose processing failed
-- Returns {'stale'} or {'ok', attempts_now}.
local lease, attempts = KEYS[1], KEYS[2]
local value, entry_id = ARGV[1], ARGV[2]

if rcall('GET', lease) ~= value then
  return {'stale'}
end
return {'ok', rcall('HINCRBY', attempts, entry_id, 1)}
