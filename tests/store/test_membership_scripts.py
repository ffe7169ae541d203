"""heartbeat.lua (membership by the Redis clock) and mark_held.lua (the fenced marker of
a held-back partition)."""

from __future__ import annotations

import json

from store import Group, Keys, Leases, RedisClient, Scripts


async def test_heartbeats_list_live_members_and_drop_silent_ones(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    members = keys.members("appender")
    assert await scripts("heartbeat", [members], ["a", 5000, "0"]) == ["a"]
    assert await scripts("heartbeat", [members], ["b", 5000, "0"]) == ["a", "b"]
    # "a" fell silent long ago (its score is an old Redis time): it is dropped.
    await client.zadd(members, {"a": 1})
    assert await scripts("heartbeat", [members], ["", 5000, "0"]) == ["b"]
    assert await client.zscore(members, "a") is None


async def test_a_member_that_leaves_is_gone_at_once(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    members = keys.members("appender")
    await scripts("heartbeat", [members], ["a", 5000, "0"])
    await scripts("heartbeat", [members], ["b", 5000, "0"])
    assert await scripts("heartbeat", [members], ["a", 5000, "1"]) == ["b"]


async def test_heartbeats_use_the_redis_clock(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    members = keys.members("appender")
    await scripts("heartbeat", [members], ["a", 5000, "0"])
    seconds, micros = await client.time()
    score = await client.zscore(members, "a")
    assert score is not None
    assert abs(score - (seconds * 1000 + micros // 1000)) < 1000


async def test_only_the_leaseholder_can_set_or_clear_the_held_marker(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    leases = Leases(scripts, keys, Group.APPENDER.value, 5000)
    lease = await leases.acquire(0, "w1")
    assert lease is not None
    held = keys.held(0, Group.APPENDER)
    info = json.dumps({"entry": "5-0", "reason": "newer schema"})
    lease_key = keys.lease(0, Group.APPENDER)
    assert await scripts("mark_held", [lease_key, held], [lease.value, info]) == ["ok"]
    assert json.loads(str(await client.get(held)))["entry"] == "5-0"
    assert await client.pttl(held) == -1  # lasts however long the workers are away
    stale = "0:w0:dead"
    assert await scripts("mark_held", [lease_key, held], [stale, ""]) == ["stale"]
    assert await client.exists(held)
    assert await scripts("mark_held", [lease_key, held], [lease.value, ""]) == ["ok"]
    assert not await client.exists(held)
