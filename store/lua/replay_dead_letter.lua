-- replay_dead_letter: re-publish a dead letter's event to its partition's ingest stream
-- and remove the dead letter, in one step (DESIGN rule 10). The new entry carries
-- replay_of (the original entry id, kept through any number of replays) and replay_key
-- (the key of an earlier replay, else the event's idempotency key, else the fallback
-- "dlq:<p>:<dead letter id>"), so the appender can refuse a replay that precedes the
-- memory's last clear, replace or delete, and applies it once.
-- KEYS[1] dlq       dlq:{p}
-- KEYS[2] ingest    ingest:{p}
-- ARGV[1] letter    the dead letter's id
-- ARGV[2] fallback  the idempotency key to use when the event has none
-- Returns {'ok', new_entry_id} or {'missing'}.
local dlq, ingest = KEYS[1], KEYS[2]
local letter_id, fallback = ARGV[1], ARGV[2]

local found = rcall('XRANGE', dlq, letter_id, letter_id)[1]
if not found then
  return {'missing'}
end
local fields = kv(found[2])
-- Memories remember idempotency keys as SHA-1 hex digests (no free text in Redis).
local key = fields['replay_key']
if not key then
  local ok, event = pcall(cjson.decode, fields['event'] or '')
  if ok and type(event) == 'table' and type(event['idempotency_key']) == 'string' then
    key = redis.sha1hex(event['idempotency_key'])
  end
end
key = key or fallback
local original = fields['replay_of'] or fields['entry'] or letter_id
local id = rcall('XADD', ingest, '*', 'event', fields['event'] or '',
  'replay_of', original, 'replay_key', key)
rcall('XDEL', dlq, found[1])
return {'ok', id}
