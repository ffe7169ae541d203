-- release_lost: a worker that gave a partition up because Redis could not be reached
-- (its lease may have expired meanwhile) says, once its loop has stopped with nothing in
-- flight, that the handover is clean: no attempt is charged against the entries it left
-- pending, for Redis's failure is not theirs. Only while nobody took the partition since.
-- KEYS[1] lease     the lease key
-- KEYS[2] released  the fence of the last clean release
-- KEYS[3] fence     the fencing counter
-- ARGV[1] value     the lease value the worker held
-- Returns 1 when recorded, 0 when another worker acquired the partition meanwhile.
local lease, released, fence = KEYS[1], KEYS[2], KEYS[3]
local value = ARGV[1]
local own = string.match(value, '^(%d+):')

if rcall('GET', fence) ~= own then
  return 0
end
if rcall('GET', lease) == value then
  rcall('DEL', lease)
end
rcall('SET', released, own)
return 1
