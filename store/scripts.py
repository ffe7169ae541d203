"""Lua scripts: loaded once per client, called by SHA, reloaded on NOSCRIPT.

Each script lives in ``store/lua/<verb_noun>.lua`` and calls Redis only through the
``rcall`` / ``rpcall`` functions of a prelude prepended here. The normal prelude binds
them to ``redis.call`` / ``redis.pcall``. The strict prelude (``strict=True``, used by
the tests and by ``MEMSTREAM_STRICT_SCRIPT_KEYS=1``) first checks that every key a
command touches was declared in KEYS, and fails the script otherwise: Redis Cluster
needs declared keys, and Redis itself does not enforce it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from store.connection import RedisClient
from store.errors import ScriptKeyError

_PRELUDE = """local rcall = redis.call
local rpcall = redis.pcall
"""

# Helpers shared by every script, after rcall / rpcall are bound.
_HELPERS = """
-- Is s a stream id ("ms-seq", both decimal)?
local function is_id(s)
  return type(s) == 'string' and string.match(s, '^%d+%-%d+$') ~= nil
end

-- Compare two unsigned decimal strings exactly (no double rounding): -1, 0 or 1.
local function numcmp(a, b)
  local na, nb = #a, #b
  -- Digit strings of one length compare as text; of two lengths, the longer is the
  -- larger unless one starts with a zero (only then are zeros stripped).
  if na == nb then
    if a == b then return 0 elseif a < b then return -1 else return 1 end
  end
  if string.byte(a) ~= 48 and string.byte(b) ~= 48 then
    if na < nb then return -1 else return 1 end
  end
  a = string.gsub(a, '^0+(%d)', '%1')
  b = string.gsub(b, '^0+(%d)', '%1')
  if #a ~= #b then
    if #a < #b then return -1 else return 1 end
  end
  if a == b then return 0 elseif a < b then return -1 else return 1 end
end

-- Compare two stream ids ("ms-seq"): -1, 0 or 1.
local function idcmp(a, b)
  if a == b then return 0 end
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  local c = numcmp(ams, bms)
  if c ~= 0 then return c end
  return numcmp(aseq, bseq)
end

-- Is the entry id pending in the group (delivered and not acknowledged)?
local function pending(stream, group, id)
  return #rcall('XPENDING', stream, group, id, id, 1) > 0
end

-- Milliseconds since the epoch, by the Redis server's clock.
local function now_ms()
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A flat reply {k1, v1, k2, v2, ...} as a table.
local function kv(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
"""

# Where each command keeps its keys: "1" the first argument, "*" every argument,
# "2" the second (sub-commands), "S" after STREAMS (first half of what follows).
_KEY_SPECS: dict[str, str] = {
    **dict.fromkeys(
        """GET SET INCR INCRBY TYPE PEXPIRE PEXPIREAT PTTL EXPIRE HGET HSET HSETNX HMGET
        HGETALL HDEL HINCRBY HLEN HEXISTS HKEYS ZADD ZREM ZSCORE ZMSCORE ZCARD ZCOUNT ZRANGE
        ZRANGEBYSCORE ZREVRANGE ZREVRANGEBYSCORE ZREMRANGEBYSCORE XADD XACK XLEN XRANGE
        XREVRANGE XTRIM XPENDING XAUTOCLAIM XCLAIM XDEL""".split(),
        "1",
    ),
    **dict.fromkeys(["DEL", "EXISTS", "UNLINK"], "*"),
    "COPY": "12",
    **dict.fromkeys(["XINFO", "XGROUP"], "2"),
    **dict.fromkeys(["XREADGROUP", "XREAD"], "S"),
    "TIME": "",
}

_STRICT_PRELUDE_TEMPLATE = """local __declared = {}
for _, k in ipairs(KEYS) do __declared[k] = true end
local __specs = {%(specs)s}
local function __check(cmd, ...)
  local args = {...}
  local name = string.upper(cmd)
  local spec = __specs[name]
  if spec == nil then
    error('strict keys: command ' .. name .. ' is unknown to the key checker (store/scripts.py)')
  end
  local keys = {}
  if spec == '1' then keys = {args[1]}
  elseif spec == '2' then keys = {args[2]}
  elseif spec == '12' then keys = {args[1], args[2]}
  elseif spec == '*' then keys = args
  elseif spec == 'S' then
    for i = 1, #args do
      if string.upper(tostring(args[i])) == 'STREAMS' then
        local n = (#args - i) / 2
        for j = 1, n do keys[j] = args[i + j] end
        break
      end
    end
  end
  for _, k in ipairs(keys) do
    if not __declared[k] then
      error('strict keys: ' .. name .. ' touches undeclared key ' .. tostring(k))
    end
  end
end
local function rcall(cmd, ...)
  __check(cmd, ...)
  return redis.call(cmd, ...)
end
local function rpcall(cmd, ...)
  __check(cmd, ...)
  return redis.pcall(cmd, ...)
end
"""


def _strict_prelude() -> str:
    specs = ", ".join(f"{name}='{spec}'" for name, spec in sorted(_KEY_SPECS.items()))
    return _STRICT_PRELUDE_TEMPLATE % {"specs": specs}


def script_names() -> list[str]:
    folder = resources.files("store") / "lua"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua"))


def script_body(name: str) -> str:
    return (resources.files("store") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """The Lua scripts of one client, called by name."""

    def __init__(
        self, client: RedisClient, *, strict: bool = False, extra: Mapping[str, str] | None = None
    ) -> None:
        """``extra`` adds scripts by name and body (tests use it to exercise the prelude)."""
        self._client = client
        self.strict = strict
        prelude = (_strict_prelude() if strict else _PRELUDE) + _HELPERS
        self._sources: dict[str, str] = {}
        self._shas: dict[str, str] = {}
        bodies = {name: script_body(name) for name in script_names()} | dict(extra or {})
        for name, body in bodies.items():
            source = prelude + body
            self._sources[name] = source
            self._shas[name] = hashlib.sha1(source.encode("utf-8")).hexdigest()

    @property
    def client(self) -> RedisClient:
        return self._client

    async def load(self) -> None:
        """Register every script (SCRIPT LOAD; on a Cluster, on every master)."""
        for name, source in self._sources.items():
            sha = await self._client.script_load(source)
            if sha != self._shas[name]:
                raise RuntimeError(
                    f"Redis returned sha {sha} for {name}, expected {self._shas[name]}"
                )

    def queue(
        self, pipe: Any, name: str, keys: Sequence[str], args: Sequence[str | int | float] = ()
    ) -> None:
        """Add a call to a pipeline (its reply is a NoScriptError if Redis lost the
        script: ``load`` and send the call again; it did not run)."""
        pipe.evalsha(self._shas[name], len(keys), *keys, *args)

    async def __call__(
        self, name: str, keys: Sequence[str], args: Sequence[str | int | float] = ()
    ) -> Any:
        sha = self._shas[name]
        try:
            try:
                return await self._client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._client.script_load(self._sources[name])
                return await self._client.evalsha(sha, len(keys), *keys, *args)
        except ResponseError as e:
            if "strict keys:" in str(e):
                raise ScriptKeyError(f"{name}: {e}") from e
            raise
