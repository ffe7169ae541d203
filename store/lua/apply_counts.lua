-- apply_counts: the accountant's one fenced step per batch of change events. Sets each
-- message's token count once, only if that message still exists in that generation,
-- adds it to the memory's exact total, and trips the flush threshold (level-triggered:
-- at or over it and no mark for this generation -> set the mark, write one flush
-- request). Changes only keys that exist; never sets or extends a deadline.
-- KEYS[1] lease     the partition's accountant lease
-- KEYS[2] changes   changes:{p}
-- KEYS[3] attempts  hash: entry id -> counted attempts (accountant)
-- KEYS[4] flush     flush:{p}
-- KEYS[5..]         three keys per memory, in the order of ARGV[3]: log, meta, tok
-- ARGV[1] value     the lease value the caller holds
-- ARGV[2] group     the accountant's consumer group
-- ARGV[3] memories  JSON list of {id (memory id), gen, counts: [[seq, tokens], ...],
--                   tokens? (token limit), messages? (message limit), threshold,
--                   request (id of the flush request to write if it trips),
--                   mark_ms? (how old a mark may grow before it is set again)}
-- ARGV[4] entries   JSON list of the change entry ids to acknowledge
-- Returns {'stale'} or {'ok', counted, flush_requests}.
local lease, changes, attempts, flush = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, group = ARGV[1], ARGV[2]
local memories, entries = cjson.decode(ARGV[3]), cjson.decode(ARGV[4])

if rcall('GET', lease) ~= value then
  return {'stale'}
end

local now = now_ms()
local counted, requests = 0, 0
for i, mem in ipairs(memories) do
  local log, meta, tok = KEYS[4 + (i - 1) * 3 + 1], KEYS[4 + (i - 1) * 3 + 2], KEYS[4 + (i - 1) * 3 + 3]
  local gen = rcall('HGET', meta, 'gen')
  if gen and tonumber(gen) == tonumber(mem.gen) and rcall('EXISTS', tok) == 1 then
    local added, n = 0, 0
    for _, pair in ipairs(mem.counts) do
      local seq, tokens = pair[1], pair[2]
      if rcall('ZCOUNT', log, seq, seq) == 1 and rcall('HSETNX', tok, seq, tokens) == 1 then
        added, n = added + tokens, n + 1
      end
    end
    if n > 0 then  -- the total moves by exactly the counts just set, in this script
      rcall('HINCRBY', meta, 'tokens', added)
      rcall('HINCRBY', meta, 'counted', n)
      counted = counted + n
    end
    local state = rcall('HMGET', meta, 'tokens', 'count', 'flush_gen', 'flush_at')
    local total, count = tonumber(state[1]) or 0, tonumber(state[2]) or 0
    local over = (mem.tokens and total >= mem.threshold * mem.tokens)
      or (mem.messages and count >= mem.threshold * mem.messages)
    -- A mark older than mark_ms is one whose flush never ended (its request was lost
    -- with a Redis failover, say): it counts as no mark, so a mark can never stick.
    local marked = tonumber(state[3] or -1) == tonumber(mem.gen)
      and (not mem.mark_ms or now - (tonumber(state[4]) or 0) < mem.mark_ms)
    if over and not marked then
      rcall('HSET', meta, 'flush_gen', mem.gen, 'flush_request', mem.request, 'flush_at', now)
      rcall('XADD', flush, '*', 'memory', mem.id, 'gen', mem.gen, 'request', mem.request,
        'reason', 'budget', 'tokens', total, 'messages', count)
      requests = requests + 1
    end
  end
end

if #entries > 0 then
  rcall('XACK', changes, group, unpack(entries))
  rcall('HDEL', attempts, unpack(entries))
end
return {'ok', counted, requests}
