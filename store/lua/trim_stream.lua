-- trim_stream: retention by acknowledgement (DESIGN rule 8). For every group of the
-- stream, the floor is its smallest pending id, else the id just after its last-delivered
-- one (all of it is acknowledged); the stream is trimmed to the least floor (XTRIM
-- MINID: entries below the floor go). A missing required group stops the trim:
-- a group created later at id 0 must still find every entry.
-- KEYS[1] stream
-- ARGV[1] exact     '=' for an exact trim, '~' to let Redis trim whole nodes only
-- ARGV[2..] groups  the groups the stream must have
-- Returns {'trimmed', n, floor}, {'missing_group', name} or {'no_stream'}.
local stream = KEYS[1]
local exact = ARGV[1]

if rcall('EXISTS', stream) == 0 then
  return {'no_stream'}
end

local groups = {}
for _, info in ipairs(rcall('XINFO', 'GROUPS', stream)) do
  local g = kv(info)
  groups[g['name']] = g
end

for i = 2, #ARGV do
  if not groups[ARGV[i]] then
    return {'missing_group', ARGV[i]}
  end
end

-- The floor covers every group the stream has, required or not (a group added by a
-- newer version during a rolling upgrade must not miss entries either).
-- A decimal string plus one, exactly (sequence parts can exceed a double's precision).
local function increment(digits)
  local i = #digits
  while i > 0 and string.sub(digits, i, i) == '9' do i = i - 1 end
  if i == 0 then return '1' .. string.rep('0', #digits) end
  return string.sub(digits, 1, i - 1) .. (tonumber(string.sub(digits, i, i)) + 1) ..
    string.rep('0', #digits - i)
end

local floor = nil
for name, g in pairs(groups) do
  local f
  if tonumber(g['pending']) > 0 then
    f = rcall('XPENDING', stream, name)[2]
  else
    -- Everything up to the last delivered entry is acknowledged: it can go too.
    local ms, seq = string.match(g['last-delivered-id'], '^(%d+)-(%d+)$')
    if seq == '18446744073709551615' then
      f = increment(ms) .. '-0'
    else
      f = ms .. '-' .. increment(seq)
    end
  end
  if floor == nil or idcmp(f, floor) < 0 then floor = f end
end
if floor == nil then
  return {'missing_group', ''}
end
return {'trimmed', rcall('XTRIM', stream, 'MINID', exact, floor), floor}
