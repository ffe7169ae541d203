-- flush_snapshot: one memory as a flush plans over it, in one consistent read: its
-- meta, every message, its token hash (counts by sequence, and how readers used each
-- message: 'a:<seq>' last read into a context (ms), 'f:<seq>' how many times), and the
-- digest of each stored message, which the plan carries to finish_flush: the check that
-- a planned message is still the one planned compares whole messages, not one field.
-- KEYS[1] log    zset: seq -> message JSON
-- KEYS[2] meta   hash
-- KEYS[3] tok    hash
-- Returns {meta (flat), messages (JSON texts, oldest first), tok (flat), digests (the
-- SHA-1 hex of each message text, in the same order)}.
local meta = rcall('HGETALL', KEYS[2])
if #meta == 0 then
  return {meta, {}, {}, {}}
end
local messages = rcall('ZRANGE', KEYS[1], 0, -1)
local digests = {}
for i, text in ipairs(messages) do digests[i] = redis.sha1hex(text) end
return {meta, messages, rcall('HGETALL', KEYS[3]), digests}
