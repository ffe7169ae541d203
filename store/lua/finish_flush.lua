-- finish_flush: the end of one flush attempt of one memory, in one fenced step.
-- With a plan, it first checks that the generation is unchanged and that every planned
-- message is still there, and returns {'changed'} without writing anything otherwise
-- (the caller plans again from a fresh snapshot). Then it removes the planned messages,
-- subtracting their stored counts, writes the summary (with its count, at the position
-- of the newest message it replaces, taking over that sequence, before that message
-- goes: the memory's keys never empty, so none is recreated without its deadline), and
-- records the flush for health.
-- Every end (applied, nothing to do, stale, given up, dead-lettered) clears the
-- memory's flush mark if one of these requests set it, acknowledges the requests, and
-- re-arms: a memory still at or over its threshold gets a new flush request only if
-- this flush removed something; when nothing could go it is flagged
-- over_budget_protected (for health), and an attempt that ended in error re-arms
-- nothing (the next count of the accountant trips the threshold again).
-- KEYS[1] lease     the partition's summarizer lease
-- KEYS[2] flush     flush:{p}
-- KEYS[3] attempts  hash: entry id -> counted attempts (summarizer)
-- KEYS[4] dlq       dlq:{p}
-- KEYS[5] log  KEYS[6] meta  KEYS[7] tok    the memory's keys
-- ARGV[1] value     the lease value the caller holds
-- ARGV[2] group     the summarizer's consumer group
-- ARGV[3] args      JSON {memory, gen, entries: [ids to acknowledge], requests: [their
--                   request ids], rearm (a new request id), limits: {tokens?, messages?,
--                   threshold}, plan?: {strategy, remove: [seqs], summarize: [seqs],
--                   digests: {seq: SHA-1 hex of the stored message the plan saw, as
--                   flush_snapshot gives it}, summary? (message JSON text),
--                   summary_tokens?, position?, entry (the request's entry id)},
--                   note? (what a plan-less end records: at_target, dry_run, ...),
--                   plan_text? (the plan's JSON, kept with the note: a dry run's plan),
--                   letter? (flat dead letter fields)}
-- Returns {'stale'}, {'changed'}, or {'ok', status, tokens, messages, rearmed, protected}
-- with status applied | ended | stale_generation | no_memory.
local lease, flush, attempts, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local log, meta, tok = KEYS[5], KEYS[6], KEYS[7]
local value, group = ARGV[1], ARGV[2]
local a = cjson.decode(ARGV[3])

if rcall('GET', lease) ~= value then
  return {'stale'}
end

local now = now_ms()
local status, removed, rearmed, protected = 'ended', 0, 0, 0
local gen = rcall('HGET', meta, 'gen')

if not gen then
  status = 'no_memory'
elseif tonumber(gen) ~= tonumber(a.gen) then
  status = 'stale_generation'
else
  local plan = a.plan
  if plan then
    local seqs = {}
    for _, s in ipairs(plan.remove) do seqs[#seqs + 1] = s end
    for _, s in ipairs(plan.summarize or {}) do seqs[#seqs + 1] = s end
    -- Every planned message is still there, and is the very message that was planned:
    -- the whole stored text, by its digest (a summary that took a sequence over may
    -- carry the same entry id, for a flush entry id can equal an ingest entry id).
    for _, s in ipairs(seqs) do
      local found = rcall('ZRANGEBYSCORE', log, s, s)
      if #found ~= 1 then return {'changed'} end
      if redis.sha1hex(found[1]) ~= plan.digests[tostring(s)] then return {'changed'} end
    end
    -- The summary takes over the sequence of the newest message it folds: that message
    -- goes last, after the summary is in, so the log never empties on the way (Redis
    -- would delete the key, and the ZADD make a new one without the memory's deadline:
    -- a flush only changes keys that exist, DESIGN rule 7).
    local position = plan.summary and plan.position
    local freed, uncounted = 0, 0
    for _, s in ipairs(seqs) do
      local t = rcall('HGET', tok, s)
      if t then freed = freed + tonumber(t) else uncounted = uncounted + 1 end
      if s == position then
        rcall('HDEL', tok, 'a:' .. s, 'f:' .. s)
      else
        rcall('HDEL', tok, s, 'a:' .. s, 'f:' .. s)
        rcall('ZREMRANGEBYSCORE', log, s, s)
      end
    end
    -- (Never pass a negated zero: Lua formats it "-0", which HINCRBY refuses.)
    if freed > 0 then rcall('HINCRBY', meta, 'tokens', 0 - freed) end
    if #seqs > uncounted then rcall('HINCRBY', meta, 'counted', uncounted - #seqs) end
    rcall('HINCRBY', meta, 'count', 0 - #seqs)
    local added = 0
    if plan.summary then
      local s = position
      local replaced = rcall('ZRANGEBYSCORE', log, s, s)[1]
      local member = '{"seq":' .. s .. ',"gen":' .. gen .. ',"at":' .. now ..
        ',"entry":"' .. plan.entry .. '",' .. string.sub(plan.summary, 2)
      rcall('ZADD', log, s, member)
      if replaced ~= member then rcall('ZREM', log, replaced) end
      rcall('HSET', tok, s, plan.summary_tokens)
      added = plan.summary_tokens
      rcall('HINCRBY', meta, 'tokens', added)
      rcall('HINCRBY', meta, 'counted', 1)
      rcall('HINCRBY', meta, 'count', 1)
      rcall('HINCRBY', meta, 'summaries', 1)
    end
    rcall('HINCRBY', meta, 'flushes', 1)
    rcall('HINCRBY', meta, 'flushes:' .. plan.strategy, 1)
    rcall('HINCRBY', meta, 'saved:' .. plan.strategy, freed - added)
    rcall('HINCRBY', meta, 'removed:' .. plan.strategy, #seqs)
    rcall('HSET', meta, 'last_flush_at', now, 'last_flush_strategy', plan.strategy,
      'last_flush_saved', freed - added, 'last_flush_removed', #seqs,
      'last_flush_tokens', rcall('HGET', meta, 'tokens'))
    removed = #seqs
    status = 'applied'
  elseif a.note then
    rcall('HSET', meta, 'last_flush_note', a.note, 'last_flush_note_at', now)
    if a.plan_text then rcall('HSET', meta, 'last_flush_plan', a.plan_text) end
  end

  -- The end of the attempt: clear the mark if it is one of ours, then re-arm.
  local mark = rcall('HGET', meta, 'flush_request')
  for _, r in ipairs(a.requests) do
    if mark == r then
      rcall('HDEL', meta, 'flush_gen', 'flush_request', 'flush_at')
      break
    end
  end
  local st = rcall('HMGET', meta, 'tokens', 'count', 'flush_gen')
  local total, count = tonumber(st[1]) or 0, tonumber(st[2]) or 0
  local lim = a.limits
  local over = (lim.tokens and total >= lim.threshold * lim.tokens)
    or (lim.messages and count >= lim.threshold * lim.messages)
  if over and removed > 0 then
    if tonumber(st[3] or -1) ~= tonumber(gen) then
      rcall('HSET', meta, 'flush_gen', gen, 'flush_request', a.rearm, 'flush_at', now)
      rcall('XADD', flush, '*', 'memory', a.memory, 'gen', gen, 'request', a.rearm,
        'reason', 'budget', 'tokens', total, 'messages', count)
      rearmed = 1
    end
    rcall('HDEL', meta, 'over_budget_protected')
  elseif over and a.note == 'over_budget_protected' then
    rcall('HSET', meta, 'over_budget_protected', now)
    protected = 1
  elseif not over then
    rcall('HDEL', meta, 'over_budget_protected')
  end
end

if a.letter then
  local letter = a.letter
  letter[#letter + 1] = 'at'
  letter[#letter + 1] = now
  rcall('XADD', dlq, '*', unpack(letter))
end
if #a.entries > 0 then
  rcall('XACK', flush, group, unpack(a.entries))
  rcall('HDEL', attempts, unpack(a.entries))
end
local after = rcall('HMGET', meta, 'tokens', 'count')
return {'ok', status, tonumber(after[1]) or 0, tonumber(after[2]) or 0, rearmed, protected}
