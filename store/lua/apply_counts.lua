-- apply_counts: the accountant's one fenced step per batch of change events. Sets each
-- message's token count once, only if that message still exists in that generation,
-- adds it to the memory's exact total, and trips the flush threshold (level-triggered:
-- at or over it and no mark for this generation -> set the mark, write one flush
-- request). Keeps each memory's index of protected messages (tok 'prot', 'prot:seqs':
-- see keep_index). Changes only keys that exist; never sets or extends a deadline.
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
--                   mark_ms? (how old a mark may grow before it is set again),
--                   rules? (the fingerprint of the resource's priority rules),
--                   protected? ([seq, ...] of counts: the messages those rules protect),
--                   rebuild? ([seq, ...]: every message of the memory those rules
--                   protect, read after its last count; given when its index is not
--                   of these rules)}
-- ARGV[4] entries   JSON list of the change entry ids to acknowledge
-- Returns {'stale'} or {'ok', counted, flush_requests}.
local lease, changes, attempts, flush = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, group = ARGV[1], ARGV[2]
local memories, entries = cjson.decode(ARGV[3]), cjson.decode(ARGV[4])

if rcall('GET', lease) ~= value then
  return {'stale'}
end

-- The memory's index of protected messages, for read_context.lua: under the rules
-- named in tok 'prot', 'prot:seqs' lists every counted message they protect (and maybe
-- messages removed since: readers skip those). `stored` is 'prot' before this call,
-- `before` how many messages were counted before it (nil when not needed), `added` the
-- protected messages this call counted.
local function keep_index(tok, mem, stored, before, added)
  local list
  if mem.rebuild then
    local listed = {}
    for _, s in ipairs(mem.rebuild) do listed[s] = true end
    local extra = {}
    for _, s in ipairs(added) do
      if not listed[s] then extra[#extra + 1] = s end
    end
    list, added = '', extra
    if #mem.rebuild > 0 then list = table.concat(mem.rebuild, ',') .. ',' end
  elseif stored == mem.rules then
    if #added == 0 then return end
    list = rcall('HGET', tok, 'prot:seqs') or ''
  elseif before == 0 then
    list = '' -- nothing was counted: an empty index is complete
  else
    -- Counted under other rules (or before indexes): the accountant rebuilds it.
    rcall('HDEL', tok, 'prot', 'prot:seqs')
    return
  end
  if #added > 0 then list = list .. table.concat(added, ',') .. ',' end
  rcall('HSET', tok, 'prot', mem.rules, 'prot:seqs', list)
end

local now = now_ms()
local counted, requests = 0, 0
for i, mem in ipairs(memories) do
  local log, meta, tok = KEYS[4 + (i - 1) * 3 + 1], KEYS[4 + (i - 1) * 3 + 2], KEYS[4 + (i - 1) * 3 + 3]
  local gen = rcall('HGET', meta, 'gen')
  if gen and tonumber(gen) == tonumber(mem.gen) and rcall('EXISTS', tok) == 1 then
    local stored, before
    local protect, added = {}, {}
    if mem.rules then
      stored = rcall('HGET', tok, 'prot')
      if stored ~= mem.rules and not mem.rebuild then
        before = tonumber(rcall('HGET', meta, 'counted')) or 0
      end
      for _, s in ipairs(mem.protected or {}) do protect[s] = true end
    end
    local sum, n = 0, 0
    for _, pair in ipairs(mem.counts) do
      local seq, tokens = pair[1], pair[2]
      if rcall('ZCOUNT', log, seq, seq) == 1 and rcall('HSETNX', tok, seq, tokens) == 1 then
        sum, n = sum + tokens, n + 1
        if protect[seq] then added[#added + 1] = seq end
      end
    end
    if n > 0 then  -- the total moves by exactly the counts just set, in this script
      rcall('HINCRBY', meta, 'tokens', sum)
      rcall('HINCRBY', meta, 'counted', n)
      counted = counted + n
    end
    if mem.rules then keep_index(tok, mem, stored, before, added) end
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
