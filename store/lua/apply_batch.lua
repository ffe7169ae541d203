-- apply_batch: the appender's one fenced step per batch (DESIGN rule 4).
-- Checks the lease, decides every entry before the first write, then applies the
-- entries in order: appends, clears, replaces, deletes, restores of a backup, erases,
-- flush requests (forwarded to flush:{p}), dead letters; advances each memory's
-- watermark, writes change events, records outcomes and acknowledges every entry it was
-- given.
--
-- KEYS[1] lease     the partition's appender lease
-- KEYS[2] ingest    ingest:{p}
-- KEYS[3] changes   changes:{p}
-- KEYS[4] dlq       dlq:{p}
-- KEYS[5] flush     flush:{p}
-- KEYS[6] counters  hash: seq, gen (never expire, never reused); swept (the newest
--                   ingest entry id an erasure removed: erase_entries.lua)
-- KEYS[7] attempts  hash: entry id -> counted attempts
-- KEYS[8 .. 7+B]    outcome buckets
-- KEYS[8+B .. 7+B+X] index keys, referred to by number (1..X) from ops and mems: a
--                   tenant's and a resource's memories, a workflow's memories, a
--                   tenant's ended workflows
-- then six keys per memory, in the order of ARGV[5]: log, meta, tomb, idem, tok, backup
-- (the messages of its last clear with a backup; erases and deletes reach it too)
--
-- ARGV[1] value       the lease value the caller holds
-- ARGV[2] group       the consumer group of ingest:{p}
-- ARGV[3] B           the number of outcome buckets
-- ARGV[4] ops         JSON list, in stream order, of
--                     {id, o (bucket), k, m (memory), ev (event id), idem?, replay?,
--                      mi?, mn? (its messages: ARGV[11 + mi .. 10 + mi + mn]),
--                      fields? (flush request fields),
--                      reason?, detail?, letter? (dead letter fields),
--                      lev? (the event text a dead letter of this op keeps)}
--                     k: append | clear | replace | delete | flush | erase | restore | dlq |
--                     drop | erased | ended (erase: seq, the message to erase)
--                     restore: bk (the backup's id, the entry id of the clear that made
--                     it); the first op of its memory in a call (it is decided from the
--                     stored backup)
--                     append, replace, restore: wf? (the writing workflow), w? (its index
--                     key)
--                     delete: ws? ({workflow id: index key} of the memory's writers)
--                     ended: tn (the tenant, recorded with the outcome, which names the
--                     workflow), wf, w, e (the ended key), ms (memories the workflow
--                     wrote), more? (more memories than one call takes: left pending);
--                     always the last op of a call
--                     (drop: refused by policy, acknowledged with its outcome, no letter)
-- ARGV[5] mems        JSON list of {id (memory id), ttl (data TTL, ms), t, r (its tenant
--                     and resource index keys), e (its tenant's ended key), pol (the
--                     policy when its last workflow ends: delete | expire | keep),
--                     grace (expire: ms)}
-- ARGV[6] idem_ms     how long an idempotency key is remembered
-- ARGV[7] tomb_ms     how long a tombstone outlives its memory's data
-- ARGV[8] outcome_ms  how long outcomes are kept
-- ARGV[9] backup_ms   how long a clear's backup is kept (never past the memory's TTL)
-- ARGV[10] X          the number of index keys
-- ARGV[11 ..]         the message JSON texts of the appends and replaces, in op order
--                     (apart from the ops' JSON, so no message is encoded twice)
--
-- Returns {'stale'} (nothing changed) or {'ok', statuses, reasons}: the reason of each
-- refused op ('' for the others), and one status per op: applied, duplicate,
-- skipped (settled before: at or below the watermark, or no longer pending), refused,
-- erased (the op's entry is no longer in the stream: an erasure removed it after the
-- caller read it), partial (an ended op with more to do: not acknowledged) per op. Outcomes are written once (a later run never overwrites one).
local lease, ingest, changes, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local flush, counters, attempts = KEYS[5], KEYS[6], KEYS[7]
local value, group, nb = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ops, mems = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])
local idem_ms, tomb_ms, outcome_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local backup_ms, nx = tonumber(ARGV[9]), tonumber(ARGV[10])

if rcall('GET', lease) ~= value then
  return {'stale'}
end

local now = now_ms()

-- An entry an erasure removed after the caller read it (erase-tenant removes a tenant's
-- entries, then its keys) is settled as erased, never applied: applying it would bring
-- back what the erasure removed. Only entries at or below the sweep mark (the newest
-- entry an erasure removed, raised in the same step) can be gone, so a batch pays one
-- HGET unless an erasure ran since its entries were published.
local swept = rcall('HGET', counters, 'swept')
if swept then
  for _, op in ipairs(ops) do
    if op.k ~= 'erased' and idcmp(op.id, swept) <= 0
        and #rcall('XRANGE', ingest, op.id, op.id) == 0 then
      op.k = 'erased'
    end
  end
end

-- A replay is safe only while both its idempotency key and the memory's last reset are
-- still remembered.
local replay_ms = math.min(idem_ms, tomb_ms)
local mem_base = 7 + nb + nx
local function xkey(i)
  return KEYS[7 + nb + i]
end
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
  local meta = rcall('HMGET', mkey(m, META), 'gen', 'expire_at', 'deadline', 'count')
  s = {wm = t[1] or '0-0', gen = tonumber(t[2]) or 0, reset = t[3] or '0-0',
       exists = meta[1] ~= false, expire_at = tonumber(meta[2]), keys = {},
       touched = false, deadline = tonumber(meta[3]), added = 0}
  -- A memory with no message may have no log key, which an append then creates: its
  -- deadlines are set in full (see the last pass).
  s.renew = (tonumber(meta[4]) or 0) == 0
  s.sim_exists = s.exists
  state[m] = s
  return s
end

-- The expiry of every idempotency key the batch names, one ZMSCORE per memory (6.2+).
local seen_until = {}
do
  local asked = {}
  for _, op in ipairs(ops) do
    if op.idem and op.m then
      local list = asked[op.m]
      if not list then
        list = {}
        asked[op.m] = list
      end
      list[#list + 1] = op.idem
    end
  end
  for m, list in pairs(asked) do
    local found = {}
    for i = 1, #list, 500 do  -- unpack() takes a few thousand values at most
      local part = {}
      for j = i, math.min(i + 499, #list) do part[#part + 1] = list[j] end
      local scores = rcall('ZMSCORE', mkey(m, IDEM), unpack(part))
      for j, score in ipairs(part) do found[score] = scores[j] end
    end
    seen_until[m] = found
  end
end

local function key_seen(s, m, key)
  if s.keys[key] then return true end
  local expiry = seen_until[m] and seen_until[m][key]
  return expiry ~= nil and expiry ~= false and tonumber(expiry) > now
end

-- Why a restore of backup `id` cannot be applied (nil if it can): only the memory's
-- latest backup (the tombstone's `backup`), while it is kept, is brought back.
local function restore_refusal(m, id)
  local mid = mems[m].id
  local latest = rcall('HGET', mkey(m, TOMB), 'backup')
  if latest and latest ~= id then
    return 'backup_not_latest', 'backup ' .. id .. ' of ' .. mid .. ' is not its latest (' ..
      latest .. '): only the latest backup can be restored'
  end
  if not latest or rcall('EXISTS', mkey(m, BACKUP)) == 0 then
    return 'backup_gone', 'no backup ' .. id .. ' of ' .. mid .. ' is kept (a backup expires ' ..
      'with the memory or after the backup TTL, a delete removes it, and one whose every ' ..
      'message was erased is empty)'
  end
  return nil
end

-- Has the workflow ended (in this partition)? An end is the last op of its call, so
-- what is stored is all there is to know.
local function has_ended(e, wf)
  local until_ms = rcall('ZSCORE', xkey(e), wf)
  return until_ms ~= false and tonumber(until_ms) > now
end

local decisions = {}
for i, op in ipairs(ops) do
  local d
  if op.k == 'ended' then
    if not op.more and has_ended(op.e, op.wf) and rcall('EXISTS', xkey(op.w)) == 0 then
      d = {'again'}
    else
      d = {'apply'}
    end
  elseif op.k == 'dlq' then
    d = {'refused', op.reason, op.detail}
  elseif op.k == 'drop' then
    d = {'ignored', op.reason, op.detail}
  elseif op.k == 'erased' then
    d = {'erased'}
  else
    local s = load(op.m)
    local why, detail
    if op.k == 'restore' then why, detail = restore_refusal(op.m, op.bk) end
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
           'the replayed event ' .. op.replay .. ' precedes the last clear, replace, ' ..
           'restore or delete of ' .. mems[op.m].id .. ' (' .. s.reset .. ')'}
    elseif op.idem and key_seen(s, op.m, op.idem) then
      d = {'duplicate'}
      s.wm = op.id
    elseif op.wf and has_ended(mems[op.m].e, op.wf) then
      d = {'refused', 'workflow_ended',
           'workflow ' .. op.wf .. ' has ended: its writes are refused (' .. mems[op.m].id ..
           ' is not changed)'}
    elseif why then
      d = {'refused', why, detail}
    elseif (op.k == 'flush' or op.k == 'erase') and not s.sim_exists then
      d = {'ignored', 'no_such_memory', 'there is no memory ' .. mems[op.m].id .. ' to ' .. op.k}
    else
      d = {'apply'}
      s.wm = op.id
      if op.idem then s.keys[op.idem] = true end
      if op.k == 'clear' or op.k == 'replace' or op.k == 'delete' or op.k == 'restore' then
        s.reset = op.id
      end
      if op.k == 'delete' then
        s.sim_exists = false
      elseif op.k == 'append' or op.k == 'replace' or op.k == 'restore' then
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

-- Write pass. Outcomes are gathered per bucket and written at the end, each once.
local buckets = {}
local function record_text(op, text)
  local bucket = KEYS[7 + op.o]
  local list = buckets[bucket]
  if not list then
    list = {}
    buckets[bucket] = list
  end
  list[#list + 1] = op.id
  list[#list + 1] = text
end

local function record(op, outcome)
  outcome.event = op.ev
  record_text(op, cjson.encode(outcome))
end

-- An applied append's outcome, written as text (the common case: no table to encode).
-- Event refs are SDK ids or sha1: digests (see event_ref); anything else is encoded.
local function record_applied(op, seq, gen)
  local ev = op.ev
  if type(ev) ~= 'string' or not string.find(ev, '^[%w:%-]*$') then
    record(op, {status = 'applied', seq = seq, gen = gen})
    return
  end
  record_text(op, '{"status":"applied","seq":' .. seq .. ',"gen":' .. gen ..
    ',"event":"' .. ev .. '"}')
end

-- The `appended` changes of the batch: one entry per run of a memory's appends in one
-- generation, naming their sequences (`seq`, or `seqs` separated by commas when there
-- are several), written before any other change of that memory and at the end.
local appended = {}
local appended_order = {}
local function flush_appended(m)
  local a = appended[m]
  if not a then return end
  appended[m] = nil
  local name = (#a.seqs == 1) and 'seq' or 'seqs'
  rcall('XADD', changes, '*', 'type', 'appended', 'memory', mems[m].id, 'gen', a.gen,
    name, table.concat(a.seqs, ','), 'entry', a.entry)
end
local function note_appended(m, gen, seq, entry)
  local a = appended[m]
  if a and a.gen ~= gen then
    flush_appended(m)
    a = nil
  end
  if not a then
    a = {gen = gen, seqs = {}, m = m}
    appended[m] = a
    appended_order[#appended_order + 1] = a
  end
  a.seqs[#a.seqs + 1] = seq
  a.entry = entry
end

-- What a new generation keeps of the memory's meta: when it was created, the workflows
-- writing it and a fixed deadline (an `expire` policy's grace).
local function carried(m)
  local keep = {}
  local fields = rcall('HGETALL', mkey(m, META))
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == 'created' or f == 'writers' or f == 'expire_at' or string.sub(f, 1, 3) == 'wf:' then
      keep[#keep + 1] = f
      keep[#keep + 1] = fields[i + 1]
    end
  end
  return keep
end

local function new_generation(s, m)
  flush_appended(m)
  s.gen = rcall('HINCRBY', counters, 'gen', 1)
  local keep = carried(m)
  rcall('DEL', mkey(m, LOG), mkey(m, META), mkey(m, TOK))
  -- A generation starts with no messages and no tokens, no flush mark; the token hash
  -- is created here (only the appender creates a memory's keys) for the accountant.
  rcall('HSET', mkey(m, META), 'gen', s.gen, 'count', 0, 'tokens', 0, 'counted', 0,
    'updated', now, 'created', now)
  -- One field at a time: a memory may have more writers than unpack() takes.
  for i = 1, #keep, 2 do rcall('HSET', mkey(m, META), keep[i], keep[i + 1]) end
  rcall('HSET', mkey(m, TOK), 'gen', s.gen)
  s.exists = true
  s.added, s.last_seq, s.renew = 0, nil, true
end

-- A workflow wrote the memory: it is one of its writers (in its meta and in the
-- workflow's index) until it ends. A workflow writing during an `expire` grace makes the
-- memory live again: the grace is cancelled.
local function add_writer(op, s, m)
  if not op.wf then return end
  if rcall('HSETNX', mkey(m, META), 'wf:' .. op.wf, now) == 1 then
    rcall('HINCRBY', mkey(m, META), 'writers', 1)
  end
  if s.expire_at then
    rcall('HDEL', mkey(m, META), 'expire_at')
    s.expire_at = nil
    s.renew = true
  end
  local idx = xkey(op.w)
  rcall('ZADD', idx, 'NX', now, mems[m].id)
  local left = rcall('PTTL', idx)
  if left < mems[m].ttl then rcall('PEXPIRE', idx, mems[m].ttl) end
end

-- Delete a memory's data (a new generation number, never reused); its tombstone stays.
-- `writers` maps the workflow ids that may name it in their index to those index keys.
local function delete_memory(op, s, m, writers, why)
  flush_appended(m)
  s.gen = rcall('HINCRBY', counters, 'gen', 1)
  local mid = mems[m].id
  local fields = rcall('HKEYS', mkey(m, META))
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 3) == 'wf:' then
      local idx = writers and writers[string.sub(f, 4)]
      if idx then rcall('ZREM', xkey(idx), mid) end
    end
  end
  rcall('DEL', mkey(m, LOG), mkey(m, META), mkey(m, TOK), mkey(m, BACKUP))
  rcall('HDEL', mkey(m, TOMB), 'backup')
  s.exists = false
  s.expire_at = nil
  s.reset = op.id
  s.touched = true
  rcall('XADD', changes, '*', 'type', 'deleted', 'memory', mid, 'gen', s.gen,
    'entry', op.id, 'reason', why)
end

-- The memory's last writing workflow ended: run its resource's policy.
local function run_policy(op, s, m)
  local pol = mems[m].pol
  if pol == 'delete' then
    delete_memory(op, s, m, nil, 'workflow_ended')
  elseif pol == 'expire' then
    local deadline = now + mems[m].grace
    local left = rcall('PTTL', mkey(m, META))
    if left >= 0 and now + left < deadline then deadline = now + left end
    rcall('HSET', mkey(m, META), 'expire_at', deadline)
    s.expire_at = deadline
    s.touched = true
  end
  return pol
end

-- Workflow `wf` ended: it no longer writes memory m. Writers whose end is stored
-- already but who are still listed (their index had expired before they ended) go
-- too. The policy runs when none is left.
local function end_writer(op, s, m, wf)
  if not s.exists then return 'gone' end
  local meta = mkey(m, META)
  local removed = rcall('HDEL', meta, 'wf:' .. wf)
  if removed == 0 then return 'gone' end
  for _, f in ipairs(rcall('HKEYS', meta)) do
    if string.sub(f, 1, 3) == 'wf:' and has_ended(mems[m].e, string.sub(f, 4)) then
      removed = removed + rcall('HDEL', meta, f)
    end
  end
  if rcall('HINCRBY', meta, 'writers', 0 - removed) > 0 then return 'shared' end
  rcall('HDEL', meta, 'writers')
  return run_policy(op, s, m)
end

-- The end of a workflow in this partition (the last op of its script call, so no
-- later op is decided before it is applied). It is recorded as ended once its last
-- memory is done, which `wait_ended` waits for; until then its entry stays pending and
-- holds back the entries after it.
local function apply_ended(op)
  local idx = xkey(op.w)
  local tally = {delete = 0, expire = 0, keep = 0, shared = 0, gone = 0}
  for _, m in ipairs(op.ms) do
    if rcall('ZSCORE', idx, mems[m].id) then
      local what = end_writer(op, load(m), m, op.wf)
      tally[what] = tally[what] + 1
      rcall('ZREM', idx, mems[m].id)
    end
  end
  if not op.more then
    rcall('DEL', idx)
    local ekey = xkey(op.e)
    rcall('ZADD', ekey, now + tomb_ms, op.wf)
    rcall('ZREMRANGEBYSCORE', ekey, '-inf', now)
    rcall('PEXPIRE', ekey, tomb_ms)
  end
  return tally
end

-- The batch's sequences are taken from the counter at once (see the write pass).
local next_seq = 0

-- A memory's appended messages wait in `s.members` and go into its log with one ZADD
-- (a call from a script costs more than the insert), before any other op of the memory
-- and before the deadlines are set.
local function write_members(s, m)
  local members = s.members
  if not members then return end
  s.members = nil
  for i = 1, #members, 1000 do  -- unpack() takes a few thousand values at most
    rcall('ZADD', mkey(m, LOG), unpack(members, i, math.min(i + 999, #members)))
  end
end

local function add_message(op, s, m, text)
  local seq = next_seq
  next_seq = next_seq + 1
  local member = '{"seq":' .. seq .. ',"gen":' .. s.gen .. ',"at":' .. now ..
    ',"entry":"' .. op.id .. '",' .. string.sub(text, 2)
  local members = s.members
  if not members then
    members = {}
    s.members = members
  end
  members[#members + 1] = seq
  members[#members + 1] = member
  s.added, s.last_seq = s.added + 1, seq
  return seq
end

local function message(op, j)
  return ARGV[10 + op.mi + j]
end

-- Bring the memory's backup back as a new generation; the number of messages.
-- Every message keeps its sequence: it is the same message coming back, which DESIGN
-- rule 6 allows (it forbids giving a sequence to another message). So a restored
-- summary's `covers` still names the messages it stands for (erasing one of them
-- removes the summary), and an erase by the sequence a reader saw before the clear
-- still reaches the message. Renumbering would mean rewriting every `covers` and would
-- leave those erases pointing nowhere. No sequence collides: the generation starts
-- empty, and later appends take new sequences from the counter, above every restored
-- one. Only the generation in each message changes (the accountant counts a message
-- in the generation it names); its time and entry stay. One `appended` change per
-- message has the accountant count it, exactly as an append.
local function restore_backup(op, s, m)
  local found = rcall('ZRANGE', mkey(m, BACKUP), 0, -1, 'WITHSCORES')
  new_generation(s, m)
  add_writer(op, s, m)
  local n, last = 0, 0
  for i = 1, #found, 2 do
    local seq = found[i + 1]
    local head, rest = string.match(found[i], '^({"seq":%d+,"gen":)%d+(,.*)$')
    local member = head and (head .. s.gen .. rest) or found[i]
    rcall('ZADD', mkey(m, LOG), seq, member)
    note_appended(m, s.gen, seq, op.id)
    n, last = n + 1, seq
  end
  rcall('HSET', mkey(m, META), 'count', n)
  s.last_seq = last
  return n
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
local reasons = {}
local ids = {}
local needed = 0
for i, op in ipairs(ops) do
  if decisions[i][1] == 'apply' and (op.k == 'append' or op.k == 'replace') then
    needed = needed + op.mn
  end
end
if needed > 0 then
  next_seq = rcall('HINCRBY', counters, 'seq', needed) - needed + 1
end
for i, op in ipairs(ops) do
  local d = decisions[i]
  local status = d[1]
  if not (op.k == 'ended' and op.more) then ids[#ids + 1] = op.id end
  if op.k == 'ended' then
    for m, s in pairs(state) do write_members(s, m) end
  elseif op.k ~= 'append' and op.m and state[op.m] then
    write_members(state[op.m], op.m)
  end
  if op.k == 'ended' then
    -- An end applied before has nothing left to do (its index is gone).
    local t = (status == 'again') and {delete = 0, expire = 0, keep = 0, shared = 0}
      or apply_ended(op)
    local detail = 'workflow ' .. op.wf .. ' ended: ' .. t.delete .. ' deleted, ' .. t.expire ..
      ' expiring, ' .. t.keep .. ' kept, ' .. t.shared .. ' still written by other workflows'
    if op.more then
      status = 'partial'
    elseif status == 'again' then
      status = 'duplicate'
      record(op, {status = 'duplicate', reason = 'already_ended', tenant = op.tn,
                  detail = 'workflow ' .. op.wf .. ' had ended already'})
    else
      status = 'applied'
      record(op, {status = 'applied', detail = detail, tenant = op.tn})
    end
  elseif status == 'apply' then
    status = 'applied'
    local m, s = op.m, state[op.m]
    local mid = mems[m].id
    s.touched = true
    if op.k == 'append' then
      if not s.exists then new_generation(s, m) end
      add_writer(op, s, m)
      local seq = add_message(op, s, m, message(op, 1))
      note_appended(m, s.gen, seq, op.id)
      record_applied(op, seq, s.gen)
    elseif op.k == 'replace' then
      new_generation(s, m)
      add_writer(op, s, m)
      local first, last = 0, 0
      for j = 1, op.mn do
        last = add_message(op, s, m, message(op, j))
        if j == 1 then first = last end
      end
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
    elseif op.k == 'restore' then
      local n = restore_backup(op, s, m)
      record(op, {status = 'applied', gen = s.gen, backup = op.bk,
                  detail = 'restored ' .. n .. ' message(s) of backup ' .. op.bk})
    elseif op.k == 'delete' then
      if s.exists then delete_memory(op, s, m, op.ws, 'deleted') end
      record(op, {status = 'applied', gen = s.gen})
    elseif op.k == 'erase' then
      local removed = erase_message(m, op.seq)
      s.renew = true  -- the log may be empty now, and an append recreate it
      record(op, {status = 'applied', gen = s.gen, seq = op.seq,
                  detail = 'erased ' .. removed .. ' message(s)'})
    elseif op.k == 'flush' then
      local fields = {'memory', mid, 'gen', s.gen, 'request', op.ev, 'entry', op.id}
      for _, f in ipairs(op.fields or {}) do fields[#fields + 1] = f end
      rcall('XADD', flush, '*', unpack(fields))
      record(op, {status = 'applied', gen = s.gen})
    end
    if op.idem then
      s.idem_new = s.idem_new or {}
      s.idem_new[#s.idem_new + 1] = now + idem_ms
      s.idem_new[#s.idem_new + 1] = op.idem
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
  reasons[i] = (status == 'refused' and d[2]) or ''
end
-- The runs still open, in the order they started; the messages still waiting.
for _, a in ipairs(appended_order) do
  if appended[a.m] == a then flush_appended(a.m) end
end
for m, s in pairs(state) do write_members(s, m) end

-- Deadlines and tombstones of every memory the batch changed, and the inventory.
local indexes = {}
-- Run `call(key, ...)` on a flat list of pairs, a few hundred at a time (unpack()'s
-- limit).
local function in_chunks(call, key, flat)
  for i = 1, #flat, 1000 do
    local part = {}
    for j = i, math.min(i + 999, #flat) do part[#part + 1] = flat[j] end
    rcall(call, key, unpack(part))
  end
end

for m, s in pairs(state) do
  if s.touched then
    if s.idem_new then in_chunks('ZADD', mkey(m, IDEM), s.idem_new) end
    local tomb_deadline
    local tenant_idx, resource_idx = xkey(mems[m].t), xkey(mems[m].r)
    local ttl = mems[m].ttl
    -- Renewed on write, except during an `expire` grace (its deadline is fixed): in full
    -- when it moved by more than a twentieth of the TTL (at most a minute), or the batch
    -- may have created a key; else the keys keep the deadline they have, which is that
    -- much earlier at most (and every key has it: none was created).
    -- (A shorter TTL than the one a memory's deadline was set with renews it too.)
    local fresh = now + ttl
    local full = not s.exists or s.expire_at or s.renew or not s.deadline
      or math.abs(fresh - s.deadline) > math.min(60000, math.floor(ttl / 20))
    local deadline = s.expire_at or fresh
    if s.exists then
      local fields = {'updated', now, 'entry', s.wm}
      if s.last_seq then
        fields[#fields + 1] = 'last_seq'
        fields[#fields + 1] = s.last_seq
      end
      if full then
        fields[#fields + 1] = 'deadline'
        fields[#fields + 1] = deadline
      end
      rcall('HSET', mkey(m, META), unpack(fields))
      if s.added ~= 0 then rcall('HINCRBY', mkey(m, META), 'count', s.added) end
    end
    if not full then
      rcall('HSET', mkey(m, TOMB), 'wm', s.wm, 'gen', s.gen, 'reset', s.reset)
      if s.idem_new then rcall('PEXPIREAT', mkey(m, IDEM), s.deadline + tomb_ms) end
    elseif s.exists then
      rcall('PEXPIREAT', mkey(m, LOG), deadline)
      rcall('PEXPIREAT', mkey(m, META), deadline)
      rcall('PEXPIREAT', mkey(m, TOK), deadline)
      if s.expire_at then
        local left = rcall('PTTL', mkey(m, BACKUP))
        if left >= 0 and now + left > deadline then
          rcall('PEXPIREAT', mkey(m, BACKUP), deadline)
        end
      end
      tomb_deadline = deadline + tomb_ms
      for _, idx in ipairs({tenant_idx, resource_idx}) do
        rcall('ZADD', idx, deadline, mems[m].id)
      end
    else
      tomb_deadline = now + tomb_ms
      rcall('ZREM', tenant_idx, mems[m].id)
      rcall('ZREM', resource_idx, mems[m].id)
    end
    if full then
      indexes[tenant_idx] = true
      indexes[resource_idx] = true
      rcall('HSET', mkey(m, TOMB), 'wm', s.wm, 'gen', s.gen, 'reset', s.reset)
      rcall('PEXPIREAT', mkey(m, TOMB), tomb_deadline)
      rcall('ZREMRANGEBYSCORE', mkey(m, IDEM), '-inf', now)
      rcall('PEXPIREAT', mkey(m, IDEM), tomb_deadline)
    end
  elseif s.dup and rcall('EXISTS', mkey(m, TOMB)) == 1 then
    rcall('HSET', mkey(m, TOMB), 'wm', s.wm)
  end
end

-- An inventory index forgets expired memories and expires with its last one.
for idx in pairs(indexes) do
  rcall('ZREMRANGEBYSCORE', idx, '-inf', now)
  local last = rcall('ZRANGE', idx, -1, -1, 'WITHSCORES')
  if last[2] then rcall('PEXPIREAT', idx, last[2]) end
end

-- Outcomes are written once: a later run (the same entries again) never overwrites one.
for bucket, list in pairs(buckets) do
  local ids_of = {}
  for i = 1, #list, 2 do ids_of[#ids_of + 1] = list[i] end
  local new = {}
  for i = 1, #ids_of, 500 do
    local part = {}
    for j = i, math.min(i + 499, #ids_of) do part[#part + 1] = ids_of[j] end
    local stored = rcall('HMGET', bucket, unpack(part))
    for j, found in ipairs(stored) do
      if not found then
        local at = (i + j - 2) * 2 + 1
        new[#new + 1] = list[at]
        new[#new + 1] = list[at + 1]
      end
    end
  end
  if #new > 0 then in_chunks('HSET', bucket, new) end
  rcall('PEXPIRE', bucket, outcome_ms)
end
if #ids > 0 then
  rcall('XACK', ingest, group, unpack(ids))
  rcall('HDEL', attempts, unpack(ids))
end
return {'ok', statuses, reasons}
