"""The strict prelude of store/scripts.py: a script that touches a key it did not
declare in KEYS fails (Redis Cluster needs declared keys; Redis does not enforce it).
Run against real Redis 6.2, 7.x and a Cluster, plus static checks of store/lua/*.lua."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from store import Keys, RedisClient, ScriptKeyError, Scripts
from store.scripts import _HELPERS, _KEY_SPECS, script_body, script_names

LUA = Path(__file__).resolve().parents[2] / "store" / "lua"

EXTRA = {
    "get_undeclared": "return rcall('GET', ARGV[1])",
    "set_declared": "rcall('SET', KEYS[1], ARGV[1]); return rcall('GET', KEYS[1])",
    "del_many": "return rcall('DEL', KEYS[1], ARGV[1])",
    "del_declared": "return rcall('DEL', KEYS[1], KEYS[2])",
    "exists_many": "return rcall('EXISTS', KEYS[1], ARGV[1])",
    "pcall_undeclared": (
        "local r = rpcall('GET', ARGV[1]); if type(r) == 'table' and r.err then "
        "return 'swallowed' end; return 'ran'"
    ),
    "readgroup": (
        "local r = rcall('XREADGROUP', 'GROUP', ARGV[1], 'c', 'COUNT', 10, "
        "'STREAMS', KEYS[1], ARGV[2], '>', '>'); if r then return #r[1][2] end; return 0"
    ),
    "readgroup_declared": (
        "local r = rcall('XREADGROUP', 'GROUP', ARGV[1], 'c', 'COUNT', 10, "
        "'streams', KEYS[1], KEYS[2], '>', '>'); return #r"
    ),
    "xread_undeclared": "return rcall('XREAD', 'COUNT', 1, 'STREAMS', KEYS[1], ARGV[1], 0, 0)",
    "xinfo_undeclared": "return rcall('XINFO', 'GROUPS', ARGV[1])",
    "xgroup_undeclared": "return rcall('XGROUP', 'CREATE', ARGV[1], 'g', '0', 'MKSTREAM')",
    "unknown_command": "return rcall('SUNIONSTORE', KEYS[1], KEYS[1])",
    "lowercase": "rcall('set', KEYS[1], 'v'); return rcall('get', ARGV[1])",
    "time_only": "return rcall('TIME')[1]",
}


@pytest.fixture
async def strict(client: RedisClient) -> Scripts:
    s = Scripts(client, strict=True, extra=EXTRA)
    await s.load()
    return s


@pytest.fixture
async def lax(client: RedisClient) -> Scripts:
    s = Scripts(client, strict=False, extra=EXTRA)
    await s.load()
    return s


def tagged(keys: Keys, name: str) -> str:
    """A key in the same slot as the declared ones, so only the prelude can object."""
    return f"{keys.namespace}:{name}:{{{7}}}"


async def test_a_script_touching_an_undeclared_key_fails(
    strict: Scripts, client: RedisClient, keys: Keys
) -> None:
    key = tagged(keys, "x")
    await client.set(key, "secret")
    with pytest.raises(ScriptKeyError, match=r"GET touches undeclared key .*:x:\{7\}"):
        await strict("get_undeclared", [tagged(keys, "declared")], [key])
    with pytest.raises(ScriptKeyError, match="get_undeclared"):
        await strict("get_undeclared", [], [key])


async def test_redis_itself_does_not_enforce_declared_keys(
    lax: Scripts, client: RedisClient, keys: Keys
) -> None:
    key = tagged(keys, "x")
    await client.set(key, "secret")
    # The same script runs without the strict prelude: the prelude is what catches it.
    assert await lax("get_undeclared", [tagged(keys, "declared")], [key]) == "secret"


async def test_declared_keys_pass(strict: Scripts, client: RedisClient, keys: Keys) -> None:
    key = tagged(keys, "a")
    assert await strict("set_declared", [key], ["v1"]) == "v1"
    assert await client.get(key) == "v1"
    other = tagged(keys, "b")
    await client.set(other, "x")
    assert await strict("del_declared", [key, other]) == 2


async def test_every_key_of_a_multi_key_command_is_checked(
    strict: Scripts, client: RedisClient, keys: Keys
) -> None:
    declared, undeclared = tagged(keys, "a"), tagged(keys, "b")
    await client.set(declared, "1")
    await client.set(undeclared, "2")
    with pytest.raises(ScriptKeyError, match="DEL touches undeclared key"):
        await strict("del_many", [declared], [undeclared])
    with pytest.raises(ScriptKeyError, match="EXISTS touches undeclared key"):
        await strict("exists_many", [declared], [undeclared])
    # The failed script deleted nothing: the check comes before the command.
    assert await client.get(declared) == "1" and await client.get(undeclared) == "2"


async def test_rpcall_cannot_swallow_a_strict_key_failure(
    strict: Scripts, client: RedisClient, keys: Keys
) -> None:
    with pytest.raises(ScriptKeyError, match="undeclared key"):
        await strict("pcall_undeclared", [tagged(keys, "a")], [tagged(keys, "b")])


async def test_every_stream_after_streams_is_checked(
    strict: Scripts, client: RedisClient, keys: Keys
) -> None:
    declared, undeclared = tagged(keys, "s1"), tagged(keys, "s2")
    for stream in (declared, undeclared):
        await client.xadd(stream, {"f": "v"})
        await client.xgroup_create(stream, "g", "0")
    with pytest.raises(ScriptKeyError, match=r"XREADGROUP touches undeclared key .*:s2:"):
        await strict("readgroup", [declared], ["g", undeclared])
    # Nothing was delivered by the failed script.
    assert (await client.xpending(declared, "g"))["pending"] == 0
    with pytest.raises(ScriptKeyError, match="XREAD touches undeclared key"):
        await strict("xread_undeclared", [declared], [undeclared])
    # Declared, and with STREAMS in lower case, it runs.
    assert await strict("readgroup_declared", [declared, undeclared], ["g"]) == 2
    assert (await client.xpending(declared, "g"))["pending"] == 1


async def test_sub_command_keys_are_checked(
    strict: Scripts, client: RedisClient, keys: Keys
) -> None:
    undeclared = tagged(keys, "s")
    with pytest.raises(ScriptKeyError, match="XINFO touches undeclared key"):
        await strict("xinfo_undeclared", [tagged(keys, "a")], [undeclared])
    with pytest.raises(ScriptKeyError, match="XGROUP touches undeclared key"):
        await strict("xgroup_undeclared", [tagged(keys, "a")], [undeclared])
    assert not await client.exists(undeclared)


async def test_commands_are_checked_in_any_case(
    strict: Scripts, client: RedisClient, keys: Keys
) -> None:
    declared = tagged(keys, "a")
    with pytest.raises(ScriptKeyError, match="GET touches undeclared key"):
        await strict("lowercase", [declared], [tagged(keys, "b")])


async def test_an_unknown_command_fails_with_a_clear_message(strict: Scripts, keys: Keys) -> None:
    with pytest.raises(
        ScriptKeyError,
        match=r"command SUNIONSTORE is unknown to the key checker \(store/scripts\.py\)",
    ):
        await strict("unknown_command", [tagged(keys, "a")])


async def test_a_command_without_keys_passes(strict: Scripts) -> None:
    assert int(await strict("time_only", [])) > 1_600_000_000


async def test_scripts_are_reloaded_after_a_script_flush(
    strict: Scripts, client: RedisClient, keys: Keys
) -> None:
    await client.script_flush()
    assert await strict("set_declared", [tagged(keys, "a")], ["after-flush"]) == "after-flush"


# -- static checks of store/lua/*.lua ---------------------------------------------------

DIRECT_CALL = re.compile(r"redis\s*(\.\s*|\[\s*['\"])p?call\b")


def _code(body: str) -> str:
    """The Lua source without comments."""
    body = re.sub(r"--\[(=*)\[.*?\]\1\]", "", body, flags=re.S)
    return re.sub(r"--[^\n]*", "", body)


def test_the_direct_call_check_recognizes_direct_calls() -> None:
    for code in (
        "redis.call('GET', k)",
        "redis.pcall('GET', k)",
        "redis . call(",
        "redis['call'](",
    ):
        assert DIRECT_CALL.search(_code(code)), code
    for code in ("rcall('GET', k)", "rpcall('GET', k)", "-- redis.call is not used", "x.call()"):
        assert not DIRECT_CALL.search(_code(code)), code


def test_the_scripts_are_the_lua_files() -> None:
    assert script_names() == sorted(p.stem for p in LUA.glob("*.lua"))
    assert len(script_names()) >= 13


@pytest.mark.parametrize("name", script_names())
def test_no_script_calls_redis_directly(name: str) -> None:
    code = _code(script_body(name))
    found = DIRECT_CALL.search(code)
    assert found is None, (
        f"store/lua/{name}.lua calls {found.group(0)!r}: use rcall / rpcall, "
        f"so the strict prelude can check its keys"
    )
    assert "rcall(" in code or "rpcall(" in code, f"{name} calls Redis not at all?"


def test_the_shared_helpers_do_not_call_redis_directly() -> None:
    code = _code(_HELPERS)
    assert DIRECT_CALL.search(code) is None
    commands = {c.upper() for c in re.findall(r"\br?p?call\(\s*'([A-Za-z]+)'", code)}
    assert commands <= set(_KEY_SPECS), sorted(commands - set(_KEY_SPECS))


@pytest.mark.parametrize("name", script_names())
def test_every_command_a_script_uses_is_known_to_the_key_checker(name: str) -> None:
    commands = re.findall(r"\br?p?call\(\s*'([A-Za-z]+)'", _code(script_body(name)))
    assert commands, name
    unknown = sorted({c.upper() for c in commands} - set(_KEY_SPECS))
    assert unknown == [], f"{name}.lua uses commands the strict prelude does not know"


@pytest.mark.parametrize("name", script_names())
def test_no_script_builds_key_names(name: str) -> None:
    """Every key arrives through KEYS: a key built from a namespace string would
    escape both the prelude's declared set and the Cluster's slot check."""
    code = _code(script_body(name))
    assert not re.search(r"['\"][a-z]+:\{", code), name
