-- refresh_lease: extend a lease, only if the caller still holds it (compare-and-extend).
-- KEYS[1] lease   the lease key
-- ARGV[1] value   the whole lease value the caller holds
-- ARGV[2] ttl_ms  the new TTL in milliseconds
-- Returns 1 when extended, 0 when the lease is gone or held by another value.
local lease = KEYS[1]
local value, ttl_ms = ARGV[1], tonumber(ARGV[2])

if rcall('GET', lease) ~= value then
  return 0
end
rcall('PEXPIRE', lease, ttl_ms)
return 1
