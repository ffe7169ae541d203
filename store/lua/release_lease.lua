-- release_lease: give a lease up, only if the caller still holds it (compare-and-delete),
-- and record the released fence: the next holder then knows the partition was handed
-- over cleanly (nothing in flight died with its holder) and charges no attempt.
-- KEYS[1] lease     the lease key
-- KEYS[2] released  the fence of the last clean release (never expires)
-- ARGV[1] value     the whole lease value the caller holds
-- Returns 1 when released, 0 when the lease was not the caller's.
local lease, released = KEYS[1], KEYS[2]
local value = ARGV[1]

if rcall('GET', lease) ~= value then
  return 0
end
rcall('DEL', lease)
rcall('SET', released, string.match(value, '^(%d+):'))
return 1
