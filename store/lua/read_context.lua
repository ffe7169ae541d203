-- read_context: a context window of one memory, in one consistent snapshot, read newest
-- first so that the cost follows the window, not the memory. What it reads:
--   1. the window: the newest messages, until their stored counts (a message not
--      counted yet as 0, which only makes the window longer) exceed the budget;
--   2. older messages not counted yet, while the meta's counters say some are left
--      (whether they are protected is for the reader to judge);
--   3. older messages of the protected index (tok 'prot:seqs', kept by apply_counts),
--      if it was built under the reader's rules (tok 'prot' = ARGV[2]).
-- Without such an index, every message is read. Whatever fits the budget is within
-- these: a newer message left out is never skipped past (memory.flush.fit_budget), and
-- the window alone exceeds the budget.
-- When every message is counted and the index is of the reader's rules, the script
-- chooses, by fit_budget's rule (protected messages first, newest first; then the
-- newest others, no gaps), and records the use of what it chose (with ARGV[3]: 'a:<seq>'
-- = now, 'f:<seq>' + 1 in tok, as touch_messages.lua). Otherwise it returns what it read
-- for the reader to choose from. The meta hash is what makes a memory: without it no
-- message is returned and nothing is recorded.
-- KEYS[1] log    zset: seq -> message JSON
-- KEYS[2] meta   hash: count, counted, tokens, ...
-- KEYS[3] tomb   hash
-- KEYS[4] tok    hash: seq -> token count; 'prot' (the fingerprint of the priority rules
--                the index was built under), 'prot:seqs' (its sequences, "s1,s2,...,")
-- ARGV[1] budget  tokens
-- ARGV[2] rules   the fingerprint of the reader's priority rules
-- ARGV[3] touch   '1': record the use of the messages chosen
-- Returns {meta (flat), tomb (flat), messages (JSON texts, oldest first), counts (false:
-- not counted yet), chosen (1: the messages are those chosen; 0: to choose from), over
-- (1: chosen, and the protected messages alone exceed the budget), first (to choose
-- from: the oldest sequence of the window, 0 when every message was read), read
-- (messages read from the log), bytes (their length)}.
local log, meta, tomb, tok = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local budget, rules, touch = tonumber(ARGV[1]), ARGV[2], ARGV[3] == '1'
local MAX_PAGE = 1000

local fields = rcall('HGETALL', meta)
if #fields == 0 then
  return {fields, rcall('HGETALL', tomb), {}, {}, 0, 0, 0, 0, 0}
end
local m = kv(fields)
local counted = tonumber(m.counted) or 0
local missing = (tonumber(m.count) or 0) - counted -- messages not counted yet
local all_counted = missing <= 0
local index = rcall('HMGET', tok, 'prot', 'prot:seqs')

-- What was read, newest first: sequences (as numbers, and as stored), texts, counts
-- (false: not counted yet).
local seqs, ids, texts, counts, taken = {}, {}, {}, {}, {}
local read, bytes = 0, 0
local function take(seq, id, text, count)
  if taken[seq] then return end
  taken[seq] = true
  local n = #seqs + 1
  seqs[n], ids[n], texts[n], counts[n] = seq, id, text, count
end

-- {texts, seqs, counts} of the log's members at ranks start .. stop (newest first when
-- rev), their counts in chunks (unpack() takes a few thousand values at most). A stored
-- message starts with its sequence (cheaper to match than to ask for the scores).
local function page(start, stop, rev)
  local found = rcall(rev and 'ZREVRANGE' or 'ZRANGE', log, start, stop)
  local found_ids, found_counts = {}, {}
  for i, text in ipairs(found) do
    found_ids[i] = string.match(text, '^{"seq":(%d+)')
    bytes = bytes + #text
  end
  read = read + #found
  for i = 1, #found_ids, 500 do
    local part = {}
    for j = i, math.min(i + 499, #found_ids) do part[#part + 1] = found_ids[j] end
    for _, c in ipairs(rcall('HMGET', tok, unpack(part))) do
      found_counts[#found_counts + 1] = c
    end
  end
  return found, found_ids, found_counts
end

-- The reply: what was read (to choose from), oldest first.
local function unchosen(first)
  local order = {}
  for i = 1, #seqs do order[i] = i end
  table.sort(order, function(a, b) return seqs[a] < seqs[b] end)
  local t, c = {}, {}
  for i, j in ipairs(order) do t[i], c[i] = texts[j], counts[j] end
  return {fields, rcall('HGETALL', tomb), t, c, 0, 0, first, read, bytes}
end

if index[1] ~= rules then
  -- No index under these rules: every message (pages of MAX_PAGE).
  local start = 0
  repeat
    local found, found_ids, found_counts = page(start, start + MAX_PAGE - 1, false)
    for i = 1, #found do
      take(tonumber(found_ids[i]), found_ids[i], found[i], found_counts[i])
    end
    start = start + MAX_PAGE
  until #found < MAX_PAGE
  return unchosen(0)
end

-- Pages sized to what the window still needs, by the mean count of what was read (at
-- first, of the memory); twice as large each, once the window is complete, while
-- messages not counted yet are left.
local mean = 16
local tokens = tonumber(m.tokens) or 0
if counted > 0 and tokens > 0 then mean = tokens / counted end
local function needed(room)
  return math.max(8, math.min(math.ceil(room / mean) + 2, MAX_PAGE))
end
local first = nil -- the oldest sequence of the window, once the window is complete
local start, sum, seen, size = 0, 0, 0, needed(budget)
while first == nil or missing > 0 do
  local found, found_ids, found_counts = page(start, start + size - 1, true)
  for i = 1, #found do
    local id, count = found_ids[i], found_counts[i]
    local seq = tonumber(id)
    if not count then
      missing = missing - 1
      all_counted = false
    end
    if first == nil then
      take(seq, id, found[i], count)
      if count then
        sum, seen = sum + tonumber(count), seen + 1
        if sum > budget then first = seq end
      end
    elseif not count then
      take(seq, id, found[i], count)
    end
    if first ~= nil and missing <= 0 then break end
  end
  if #found < size then break end
  start = start + size
  if first == nil then
    if sum > 0 then mean = sum / seen end
    size = math.max(size, needed(budget - sum))
  else
    size = math.min(size * 2, MAX_PAGE)
  end
end

-- The index: protected messages older than the window are read (newest first); every
-- listed message that is still there and not a summary (a summary may have taken over
-- the sequence of a message it folded) is protected.
local protected, older, older_ids = {}, {}, {}
for id in string.gmatch(index[2] or '', '%d+') do
  local seq = tonumber(id)
  protected[seq] = true
  if first ~= nil and seq < first and not taken[seq] and not older_ids[seq] then
    older[#older + 1] = seq
    older_ids[seq] = id
  end
end
table.sort(older)
for i = #older, 1, -1 do
  local seq, id = older[i], older_ids[older[i]]
  local text = rcall('ZRANGEBYSCORE', log, id, id)[1]
  if text then
    read, bytes = read + 1, bytes + #text
    take(seq, id, text, rcall('HGET', tok, id))
  end
end

for i = 1, #seqs do
  if not tonumber(counts[i]) then all_counted = false end
end
if not all_counted then return unchosen(first or 0) end

-- Every message is counted: choose, as memory.flush.fit_budget does (newest first).
local flags, total = {}, 0
for i = 1, #seqs do
  counts[i] = tonumber(counts[i])
  local p = protected[seqs[i]] == true
  if p and string.find(texts[i], '"covers":', 1, true) then
    local ok, decoded = pcall(cjson.decode, texts[i])
    if ok and type(decoded) == 'table' and decoded.covers ~= nil
        and decoded.covers ~= cjson.null then
      p = false
    end
  end
  flags[i] = p
  if p then total = total + counts[i] end
end
local over = total > budget
local room = budget
local chosen = {}
for i = 1, #seqs do
  if flags[i] and counts[i] <= room then
    chosen[i] = true
    room = room - counts[i]
  end
end
if not over then
  for i = 1, #seqs do
    if not flags[i] then
      if counts[i] > room then break end -- no gaps: never skip past a newer message left out
      chosen[i] = true
      room = room - counts[i]
    end
  end
end
local out_texts, out_counts, out_ids = {}, {}, {}
for i = #seqs, 1, -1 do
  if chosen[i] then
    local n = #out_ids + 1
    out_ids[n], out_texts[n], out_counts[n] = ids[i], texts[i], counts[i]
  end
end
if touch and #out_ids > 0 then
  -- Two calls per 500 messages: their uses read, then every field written (strings
  -- throughout: a number Lua formats costs more than the write).
  local now = tostring(now_ms())
  for i = 1, #out_ids, 500 do
    local names = {}
    for j = i, math.min(i + 499, #out_ids) do names[#names + 1] = 'f:' .. out_ids[j] end
    local uses = rcall('HMGET', tok, unpack(names))
    local set = {}
    for j, name in ipairs(names) do
      set[#set + 1] = 'a:' .. out_ids[i + j - 1]
      set[#set + 1] = now
      set[#set + 1] = name
      set[#set + 1] = tostring((tonumber(uses[j]) or 0) + 1)
    end
    rcall('HSET', tok, unpack(set))
  end
end
return {fields, rcall('HGETALL', tomb), out_texts, out_counts, 1, over and 1 or 0, 0,
  read, bytes}
