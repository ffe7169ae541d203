-- touch_messages: record that messages were read into a context window, for the lru and
-- lfu flush strategies: 'a:<seq>' = now (ms), 'f:<seq>' + 1 in the memory's tok hash.
-- A use of a message removed meanwhile (by a flush, a clear) is dropped, and nothing is
-- written for a memory whose meta is gone or into a token hash that does not exist: this
-- only changes fields of a key that carries the memory's deadline (DESIGN rule 7).
-- KEYS[1] tok    hash: seq -> token count, and the use fields
-- KEYS[2] log    zset: seq -> message
-- KEYS[3] meta   hash: the memory's meta (what makes the memory exist)
-- ARGV           the sequences
-- Returns the number of messages whose use was recorded.
local tok, log, meta = KEYS[1], KEYS[2], KEYS[3]
if rcall('EXISTS', meta) == 0 or rcall('EXISTS', tok) == 0 then
  return 0
end
local now = now_ms()
local touched = 0
for _, seq in ipairs(ARGV) do
  if rcall('ZCOUNT', log, seq, seq) == 1 then
    rcall('HSET', tok, 'a:' .. seq, now)
    rcall('HINCRBY', tok, 'f:' .. seq, 1)
    touched = touched + 1
  end
end
return touched
