-- settle_entries: acknowledge entries with their outcomes, dead-lettering those that
-- carry a reason, in one fenced step. Used by the runtime for entries that are gone
-- from the stream, that used up their attempts, or that a processor refuses outright.
-- KEYS[1] lease     the partition's lease for this group
-- KEYS[2] stream    the partition's stream
-- KEYS[3] attempts  hash: entry id -> counted attempts
-- KEYS[4] dlq       the partition's dead letter stream
-- KEYS[5..]         outcome buckets (hash per minute of entry ids)
-- ARGV[1] value       the lease value the caller holds
-- ARGV[2] group       the consumer group
-- ARGV[3] outcome_ms  how long outcomes are kept
-- ARGV[4] settles     JSON list of {id, o (1-based bucket index), status, reason?,
--                     detail?, tenant? (whose data the detail names), letter? (flat
--                     list of dead letter fields)}
-- Returns {'stale'} or {'ok', dead_letter_ids (false where none)}.
local lease, stream, attempts, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, group = ARGV[1], ARGV[2]
local outcome_ms = tonumber(ARGV[3])
local settles = cjson.decode(ARGV[4])

if rcall('GET', lease) ~= value then
  return {'stale'}
end

local letters = {}
local touched = {}
for i, s in ipairs(settles) do
  local outcome = {status = s.status, reason = s.reason, detail = s.detail, tenant = s.tenant}
  letters[i] = false
  -- Not pending any more: settled before (a retried call); never dead-letter twice.
  if s.letter and pending(stream, group, s.id) then
    local id = rcall('XADD', dlq, '*', unpack(s.letter))
    letters[i] = id
    outcome.dead_letter = id
  end
  local bucket = KEYS[4 + s.o]
  rcall('HSETNX', bucket, s.id, cjson.encode(outcome))
  touched[bucket] = true
  rcall('XACK', stream, group, s.id)
  rcall('HDEL', attempts, s.id)
end
for bucket in pairs(touched) do
  rcall('PEXPIRE', bucket, outcome_ms)
end
return {'ok', letters}
