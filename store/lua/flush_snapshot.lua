-- flush_snapshot: one memory as a flush plans over it, in one consistent read: its
-- meta, every message, and its token hash (counts by sequence, and how readers used
-- each message: 'a:<seq>' last read into a context (ms), 'f:<seq>' how many times).
-- KEYS[1] log    zset: seq -> message JSON
-- KEYS[2] meta   hash
-- KEYS[3] tok    hash
-- Returns {meta (flat), messages (JSON texts, oldest first), tok (flat)}.
return {rcall('HGETALL', KEYS[2]), rcall('ZRANGE', KEYS[1], 0, -1), rcall('HGETALL', KEYS[3])}
