-- touch_messages: record that messages were read into a context window, for the lru and
-- lfu flush strategies: 'a:<seq>' = now (ms), 'f:<seq>' + 1 in the memory's tok hash.
-- A use of a message removed meanwhile (by a flush, a clear) is dropped.
-- KEYS[1] tok    hash: seq -> token count, and the use fields
-- KEYS[2] log    zset: seq -> message
-- ARGV           the sequences
local tok, log = KEYS[1], KEYS[2]
if rcall('EXISTS', tok) == 0 then
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
