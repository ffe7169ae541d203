-- create_groups: create a partition's consumer groups at id 0 (with MKSTREAM) if they
-- are missing (DESIGN rule 8): whoever touches a partition first creates them, so no
-- group ever misses an entry.
-- KEYS[1..n]  streams, each with the group at the same position in ARGV
-- ARGV[1..n]  groups
-- Returns the number of groups created.
local created = 0
for i, stream in ipairs(KEYS) do
  local reply = rpcall('XGROUP', 'CREATE', stream, ARGV[i], '0', 'MKSTREAM')
  if type(reply) == 'table' and reply.err then
    if not string.find(reply.err, 'BUSYGROUP', 1, true) then
      return redis.error_reply(reply.err)
    end
  else
    created = created + 1
  end
end
return created
