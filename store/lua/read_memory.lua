-- read_memory: a consistent snapshot of one memory: its meta, its tombstone, a window of
-- its messages and their token counts (false where not counted yet). The meta hash is
-- what makes a memory: without it (the memory expired or was deleted) no message is
-- returned and nothing is recorded, whatever other key of it is left.
-- KEYS[1] log    zset: seq -> message JSON
-- KEYS[2] meta   hash
-- KEYS[3] tomb   hash
-- KEYS[4] tok    hash: seq -> token count
-- ARGV[1] mode   'last' (the newest N), 'after' (N after a sequence) or 'all'
-- ARGV[2] n      how many messages (for 'last' and 'after')
-- ARGV[3] after  the sequence to read after (for 'after')
-- ARGV[4] touch  '1': the messages are read into a context window; record it for the
--                lru / lfu flush strategies ('a:<seq>' = now, 'f:<seq>' + 1 in tok)
-- Returns {meta (flat), tomb (flat), messages (JSON texts, oldest first), counts}.
local log, meta, tomb, tok = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, n = ARGV[1], tonumber(ARGV[2])

local fields = rcall('HGETALL', meta)
if #fields == 0 then
  return {fields, rcall('HGETALL', tomb), {}, {}}
end
local messages
if mode == 'last' then
  local newest = rcall('ZREVRANGE', log, 0, n - 1)
  messages = {}
  for i = #newest, 1, -1 do messages[#messages + 1] = newest[i] end
elseif mode == 'after' then
  messages = rcall('ZRANGEBYSCORE', log, '(' .. ARGV[3], '+inf', 'LIMIT', 0, n)
else
  messages = rcall('ZRANGE', log, 0, -1)
end
local counts = {}
if #messages > 0 then
  local seqs = {}
  for i, text in ipairs(messages) do seqs[i] = string.match(text, '^{"seq":(%d+)') end
  -- In chunks: Lua's unpack() fails past a few thousand values.
  for i = 1, #seqs, 500 do
    local part = {}
    for j = i, math.min(i + 499, #seqs) do part[#part + 1] = seqs[j] end
    for _, c in ipairs(rcall('HMGET', tok, unpack(part))) do counts[#counts + 1] = c end
  end
  -- Only fields of a token hash that exists (it carries the memory's deadline).
  if ARGV[4] == '1' and rcall('EXISTS', tok) == 1 then
    local now = now_ms()
    for _, seq in ipairs(seqs) do
      rcall('HSET', tok, 'a:' .. seq, now)
      rcall('HINCRBY', tok, 'f:' .. seq, 1)
    end
  end
end
return {fields, rcall('HGETALL', tomb), messages, counts}
