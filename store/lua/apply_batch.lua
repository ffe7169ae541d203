-- apply_batch: the appender's one fenced step per batch (DESIGN rule 4).
-- Checks the lease, decides every entry before the first write, then applies the
-- entries in order: appends, clears, replaces, deletes, flush requests (forwarded to
-- flush:{p}), dead letters; advances each memory's watermark, writes change events,
-- records outcomes and acknowledges every entry it was given.
--
-- KEYS[1] lease     the partition's appender lease
-- KEYS[2] ingest    ingest:{p}
-- KEYS[3] changes   changes:{p}
-- KEYS[4] dlq       dlq:{p}
-- KEYS[5] flush     flush:{p}
-- KEYS[6] counters  hash: seq, gen (never expire, never reused)
-- KEYS[7] attempts  hash: entry id -> counted attempts
-- KEYS[8 .. 7+B]    outcome buckets
-- then six keys per memory, in the order of ARGV[5]: log, meta, tomb, idem, tok, backup
-- (the messages of its last clear with a backup; erases and deletes reach it too)
--
-- ARGV[1] value       the lease value the caller holds
-- ARGV[2] group       the consumer group of ingest:{p}
-- ARGV[3] B           the number of outcome buckets
-- ARGV[4] ops         JSON list, in stream order, of
--                     {id, o (bucket), k, m (memory), ev (event id), idem?, replay?,
--                      msgs? (message JSON texts), fields? (flush request fields),
--                      reason?, detail?, letter? (dead letter fields),
--                      lev? (the event text a dead letter of this op keeps)}
--                     k: append | clear | replace | delete | flush | erase | dlq | drop |
--                     erased (erase: seq, the message to erase)
--                     (drop: refused by policy, acknowledged with its outcome, no letter)
-- ARGV[5] mems        JSON list of {id (memory id), ttl (data TTL, ms)}
-- ARGV[6] idem_ms     how long an idempotency key is remembered
-- ARGV[7] tomb_ms     how long a tombstone outlives its memory's data
-- ARGV[8] outcome_ms  how long outcomes are kept
-- ARGV[9] backup_ms   how long a clear's backup is kept (never past the memory's TTL)
--
-- Returns {'stale'} (nothing changed) or {'ok', statuses}: one of applied, duplicate,
-- skipped (settled before: at or below the watermark, or no longer pending), refused,
-- erased per op. Outcomes are written once (HSETNX): a later run never overwrites them.
local lease, ingest, changes, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local flush, counters, attempts = KEYS[5], KEYS[6], KEYS[7]
local value, group, nb = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ops, mems = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])
local idem_ms, tomb_ms, outcome_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local backup_ms = tonumber(ARGV[9])

if rcall('GET', lease) ~= value then
  return {'stale'}
end

local now = now_ms()
-- A replay is safe only while both its idempotency key and the memory's last reset are
-- still remembered.
local replay_ms = math.min(idem_ms, tomb_ms)
local mem_base = 7 + nb
local LOG, META, TOMB, IDEM, TOK, BACKUP = 1, 2, 3, 4, 5, 6
local function mkey(m, which)
  return KEYS[mem_base + (m - 1) * 6 + which]
end

-- Check pass: decide every entry from the stored state and the entries before it.
local state = {}
local function load(m)
  local s = state[m]
  if s then return s end
  local t = rcall('HMGET', mkey(m, TOMB), 'wm', 'gen', 'reset')
  s = {wm = t[1] or '0-0', gen = tonumber(t[2]) or 0, reset = t[3] or '0-0',
       exists = rcall('EXISTS', mkey(m, META)) == 1, keys = {}, touched = false}
  s.sim_exists = s.exists
  state[m] = s
  return s
end

local function key_seen(s, m, key)
  if s.keys[key] then return true end
  local expiry = rcall('ZSCORE', mkey(m, IDEM), key)
  return expiry ~= false and tonumber(expiry) > now
end

local decisions = {}
for i, op in ipairs(ops) do
  local d
  if op.k == 'dlq' then
    d = {'refused', op.reason, op.detail}
  elseif op.k == 'drop' then
    d = {'ignored', op.reason, op.detail}
  elseif op.k == 'erased' then
    d = {'erased'}
  else
    local s = load(op.m)
    if idcmp(op.id, s.wm) <= 0 then
      d = {'skipped'}
    elseif op.k == 'erase' and (type(op.seq) ~= 'number' or op.seq < 1
        or op.seq ~= math.floor(op.seq) or op.seq > 9007199254740991) then
      d = {'refused', 'invalid', 'seq must be a whole number from 1 to 2^53-1'}
    elseif op.replay and not is_id(op.replay) then
      d = {'refused', 'invalid', 'replay_of must be a stream id, got ' .. tostring(op.replay)}
    elseif op.replay and tonumber(string.match(op.replay, '^(%d+)')) < now - replay_ms then
      d = {'refused', 'replay_too_old',
           'the replayed event ' .. op.replay .. ' is older than the idempotency window ' ..
           '(or the tombstone TTL), so whether it was applied since, or ' .. mems[op.m].id ..
           ' was cleared or deleted since, is no longer known'}
    elseif op.replay and idcmp(op.replay, s.reset) < 0 then
      d = {'refused', 'replay_before_reset',
           'the replayed event ' .. op.replay .. ' precedes the last clear, replace or ' ..
           'delete of ' .. mems[op.m].id .. ' (' .. s.reset .. ')'}
    elseif op.idem and key_seen(s, op.m, op.idem) then
      d = {'duplicate'}
      s.wm = op.id
    elseif (op.k == 'flush' or op.k == 'erase') and not s.sim_exists then
      d = {'ignored', 'no_such_memory', 'there is no memory ' .. mems[op.m].id .. ' to ' .. op.k}
    else
      d = {'apply'}
      s.wm = op.id
      if op.idem then s.keys[op.idem] = true end
      if op.k == 'clear' or op.k == 'replace' or op.k == 'delete' then s.reset = op.id end
      if op.k == 'delete' then
        s.sim_exists = false
      elseif op.k == 'append' or op.k == 'replace' then
        s.sim_exists = true
      end
    end
  end
  decisions[i] = d
end

-- An entry that is not pending was settled already (a script run twice, say): it is
-- left alone rather than dead-lettered a second time.
for i, op in ipairs(ops) do
  if decisions[i][1] == 'refused' and not pending(ingest, group, op.id) then
    decisions[i] = {'skipped'}
  end
end

-- Write pass.
local buckets = {}
local function record(op, outcome)
  local bucket = KEYS[7 + op.o]
  outcome.event = op.ev
  rcall('HSETNX', bucket, op.id, cjson.encode(outcome))
  buckets[bucket] = true
end

local function new_generation(s, m)
  s.gen = rcall('HINCRBY', counters, 'gen', 1)
  local created = rcall('HGET', mkey(m, META), 'created') or now
  rcall('DEL', mkey(m, LOG), mkey(m, META), mkey(m, TOK))
  -- A generation starts with no messages and no tokens, no flush mark; the token hash
  -- is created here (only the appender creates a memory's keys) for the accountant.
  rcall('HSET', mkey(m, META), 'gen', s.gen, 'count', 0, 'tokens', 0, 'counted', 0,
    'updated', now, 'created', created)
  rcall('HSET', mkey(m, TOK), 'gen', s.gen)
  s.exists = true
end

local function add_message(op, s, m, text)
  local seq = rcall('HINCRBY', counters, 'seq', 1)
  local member = '{"seq":' .. seq .. ',"gen":' .. s.gen .. ',"at":' .. now ..
    ',"entry":"' .. op.id .. '",' .. string.sub(text, 2)
  rcall('ZADD', mkey(m, LOG), seq, member)
  rcall('HSET', mkey(m, META), 'last_seq', seq)
  return seq
end

local function dead_letter(op, reason, detail)
  local letter = op.letter
  if not letter then
    -- The event text comes redacted from the caller; only without it (never for a
    -- memory op of the appender) is the raw entry read back.
    local event = op.lev
    if not event then
      local raw = rcall('XRANGE', ingest, op.id, op.id)[1]
      event = (raw and kv(raw[2])['event']) or ''
    end
    letter = {'event', event, 'reason', reason, 'detail', detail or '',
              'entry', op.id, 'source', ingest}
    if op.m then
      letter[#letter + 1] = 'memory'
      letter[#letter + 1] = mems[op.m].id
    end
    -- A refused replay keeps what makes a later replay of it safe: the original
    -- entry (checked against the memory's last reset) and the idempotency key.
    if op.replay then
      letter[#letter + 1] = 'replay_of'
      letter[#letter + 1] = op.replay
    end
    if op.idem then
      letter[#letter + 1] = 'replay_key'
      letter[#letter + 1] = op.idem
    end
  end
  letter[#letter + 1] = 'at'
  letter[#letter + 1] = now
  return rcall('XADD', dlq, '*', unpack(letter))
end

-- The scores of the summaries in zset `key` that cover message `seq` (a summary sits at
-- or after the newest message it covers).
local function summaries_covering(key, seq)
  local scores = {}
  local found = rcall('ZRANGEBYSCORE', key, seq, '+inf', 'WITHSCORES')
  for i = 1, #found, 2 do
    if string.find(found[i], '"covers":', 1, true) then
      local ok, msg = pcall(cjson.decode, found[i])
      if ok and type(msg) == 'table' and type(msg.covers) == 'table' then
        for _, c in ipairs(msg.covers) do
          if tonumber(c) == tonumber(seq) then
            scores[#scores + 1] = found[i + 1]
            break
          end
        end
      end
    end
  end
  return scores
end

-- Remove a message and the summaries covering it from a backup (no counts there).
local function erase_from_backup(m, seq)
  local bkey = mkey(m, BACKUP)
  if rcall('EXISTS', bkey) == 0 then return end
  rcall('ZREMRANGEBYSCORE', bkey, seq, seq)
  for _, score in ipairs(summaries_covering(bkey, seq)) do
    rcall('ZREMRANGEBYSCORE', bkey, score, score)
  end
end

-- Remove one message, subtracting its stored count; 1 if it was there.
local function remove_message(m, seq)
  if rcall('ZCOUNT', mkey(m, LOG), seq, seq) == 0 then return 0 end
  local t = tonumber(rcall('HGET', mkey(m, TOK), seq))
  if t then
    if t > 0 then rcall('HINCRBY', mkey(m, META), 'tokens', 0 - t) end
    rcall('HINCRBY', mkey(m, META), 'counted', -1)
  end
  rcall('HDEL', mkey(m, TOK), seq, 'a:' .. seq, 'f:' .. seq)
  rcall('ZREMRANGEBYSCORE', mkey(m, LOG), seq, seq)
  rcall('HINCRBY', mkey(m, META), 'count', -1)
  return 1
end

-- Erase a message and every summary covering it, in the memory and in its backup.
local function erase_message(m, seq)
  local removed = remove_message(m, seq)
  for _, score in ipairs(summaries_covering(mkey(m, LOG), seq)) do
    removed = removed + remove_message(m, score)
  end
  erase_from_backup(m, seq)
  return removed
end

local statuses = {}
local ids = {}
for i, op in ipairs(ops) do
  local d = decisions[i]
  local status = d[1]
  ids[i] = op.id
  if status == 'apply' then
    status = 'applied'
    local m, s = op.m, state[op.m]
    local mid = mems[m].id
    s.touched = true
    if op.k == 'append' then
      if not s.exists then new_generation(s, m) end
      local seq = add_message(op, s, m, op.msgs[1])
      rcall('HINCRBY', mkey(m, META), 'count', 1)
      rcall('XADD', changes, '*', 'type', 'appended', 'memory', mid, 'gen', s.gen,
        'seq', seq, 'entry', op.id)
      record(op, {status = 'applied', seq = seq, gen = s.gen})
    elseif op.k == 'replace' then
      new_generation(s, m)
      local first, last = 0, 0
      for j, text in ipairs(op.msgs) do
        last = add_message(op, s, m, text)
        if j == 1 then first = last end
      end
      rcall('HSET', mkey(m, META), 'count', #op.msgs)
      rcall('XADD', changes, '*', 'type', 'replaced', 'memory', mid, 'gen', s.gen,
        'first_seq', first, 'last_seq', last, 'entry', op.id)
      record(op, {status = 'applied', gen = s.gen})
    elseif op.k == 'clear' then
      local backup = nil
      if s.exists and op.backup and rcall('EXISTS', mkey(m, LOG)) == 1 then
        rcall('COPY', mkey(m, LOG), mkey(m, BACKUP), 'REPLACE')
        rcall('PEXPIRE', mkey(m, BACKUP), math.min(backup_ms, mems[m].ttl))
        rcall('HSET', mkey(m, TOMB), 'backup', op.id)
        backup = op.id
      end
      if s.exists then
        new_generation(s, m)
        rcall('XADD', changes, '*', 'type', 'cleared', 'memory', mid, 'gen', s.gen,
          'entry', op.id)
      end
      record(op, {status = 'applied', gen = s.gen, backup = backup})
    elseif op.k == 'delete' then
      if s.exists then
        s.gen = rcall('HINCRBY', counters, 'gen', 1)
        rcall('DEL', mkey(m, LOG), mkey(m, META), mkey(m, TOK), mkey(m, BACKUP))
        rcall('HDEL', mkey(m, TOMB), 'backup')
        s.exists = false
        rcall('XADD', changes, '*', 'type', 'deleted', 'memory', mid, 'gen', s.gen,
          'entry', op.id)
      end
      record(op, {status = 'applied', gen = s.gen})
    elseif op.k == 'erase' then
      local removed = erase_message(m, op.seq)
      record(op, {status = 'applied', gen = s.gen, seq = op.seq,
                  detail = 'erased ' .. removed .. ' message(s)'})
    elseif op.k == 'flush' then
      local fields = {'memory', mid, 'gen', s.gen, 'request', op.ev, 'entry', op.id}
      for _, f in ipairs(op.fields or {}) do fields[#fields + 1] = f end
      rcall('XADD', flush, '*', unpack(fields))
      record(op, {status = 'applied', gen = s.gen})
    end
    if op.idem then
      rcall('ZADD', mkey(m, IDEM), now + idem_ms, op.idem)
    end
  elseif status == 'duplicate' then
    state[op.m].dup = true
    record(op, {status = 'duplicate', reason = 'idempotency_key',
                detail = 'an event with idempotency key ' .. op.idem .. ' was already applied'})
  elseif status == 'refused' then
    local letter_id = dead_letter(op, d[2], d[3])
    record(op, {status = 'refused', reason = d[2], detail = d[3], dead_letter = letter_id})
  elseif status == 'ignored' then
    status = 'refused'
    record(op, {status = 'refused', reason = d[2], detail = d[3]})
  elseif status == 'skipped' then
    record(op, {status = 'duplicate', reason = 'already_applied',
                detail = 'the entry was applied before (at or below the watermark)'})
  elseif status == 'erased' then
    record(op, {status = 'erased', reason = 'erased',
                detail = 'the entry was gone from the stream before it was applied'})
  end
  statuses[i] = status
end

-- Deadlines and tombstones of every memory the batch changed.
for m, s in pairs(state) do
  if s.touched then
    local tomb_deadline
    if s.exists then
      local deadline = now + mems[m].ttl
      rcall('HSET', mkey(m, META), 'updated', now, 'entry', s.wm)
      rcall('PEXPIREAT', mkey(m, LOG), deadline)
      rcall('PEXPIREAT', mkey(m, META), deadline)
      rcall('PEXPIREAT', mkey(m, TOK), deadline)
      tomb_deadline = deadline + tomb_ms
    else
      tomb_deadline = now + tomb_ms
    end
    rcall('HSET', mkey(m, TOMB), 'wm', s.wm, 'gen', s.gen, 'reset', s.reset)
    rcall('PEXPIREAT', mkey(m, TOMB), tomb_deadline)
    rcall('ZREMRANGEBYSCORE', mkey(m, IDEM), '-inf', now)
    rcall('PEXPIREAT', mkey(m, IDEM), tomb_deadline)
  elseif s.dup and rcall('EXISTS', mkey(m, TOMB)) == 1 then
    rcall('HSET', mkey(m, TOMB), 'wm', s.wm)
  end
end

for bucket in pairs(buckets) do
  rcall('PEXPIRE', bucket, outcome_ms)
end
if #ids > 0 then
  rcall('XACK', ingest, group, unpack(ids))
  rcall('HDEL', attempts, unpack(ids))
end
return {'ok', statuses}
