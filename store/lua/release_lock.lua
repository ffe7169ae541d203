-- release_lock: compare-and-delete: remove a lock only if the caller still holds it.
-- KEYS[1] lock    the lock key
-- ARGV[1] value   the whole value the caller holds
-- Returns 1 when released, 0 when the lock is gone or held by another value.
if rcall('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
rcall('DEL', KEYS[1])
return 1
