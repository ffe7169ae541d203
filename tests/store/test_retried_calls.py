"""A call whose reply was lost may be sent again: every script is safe to run twice,
and a waiter is never handed another event's outcome."""

from __future__ import annotations

import json

import pytest
from redis.asyncio.cluster import RedisCluster

from store import (
    ApplyBatch,
    Group,
    Keys,
    Lease,
    Leases,
    MemoryReader,
    MemoryStore,
    OutcomeMismatchError,
    PartitionStreams,
    RedisClient,
    Retention,
    Scripts,
    Settle,
    Target,
    connect,
    ensure_groups,
    ensure_partitions,
)

P = 0
MEM = "acme/customer-support/retry"


@pytest.fixture
async def lease(client: RedisClient, scripts: Scripts, keys: Keys) -> Lease:
    await ensure_partitions(client, keys, 1)
    await ensure_groups(scripts, keys, P)
    held = await Leases(scripts, keys, Group.APPENDER.value, 10_000).acquire(P, "w1")
    assert held is not None
    return held


async def deliver(client: RedisClient, keys: Keys, n: int, **xadd: str) -> list[str]:
    ids = [str(await client.xadd(keys.ingest(P), {"event": "{}"}, **xadd)) for _ in range(n)]  # type: ignore[arg-type]
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(P): ">"}, count=n)
    return ids


def msg(text: str) -> str:
    return json.dumps({"role": "user", "content": text})


async def test_a_batch_applied_twice_dead_letters_once_and_keeps_its_outcomes(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    store = MemoryStore(scripts, keys, Retention())
    ids = await deliver(client, keys, 2)

    def batch() -> ApplyBatch:
        b = ApplyBatch(keys, P)
        b.append(Target(ids[0], MEM, 60_000, "ev0"), msg("a"))
        b.dead_letter(ids[1], reason="not_json", detail="bad", event="{", source="s")
        return b

    assert await store.apply(lease, batch()) == ["applied", "refused"]
    assert await store.apply(lease, batch()) == ["skipped", "skipped"]
    assert await client.xlen(keys.dlq(P)) == 1
    reader = MemoryReader(client, scripts, keys)
    first = await reader.outcome(P, ids[0])
    assert first is not None and first.status == "applied" and first.seq == 1


async def test_an_entry_applied_before_whose_outcome_expired_reports_a_duplicate(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    store = MemoryStore(scripts, keys, Retention())
    (entry,) = await deliver(client, keys, 1)
    b = ApplyBatch(keys, P)
    b.append(Target(entry, MEM, 60_000, "ev"), msg("a"))
    await store.apply(lease, b)
    await client.delete(keys.outcomes(P, entry))
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(P): "0"})
    assert await store.apply(lease, b) == ["skipped"]
    outcome = await MemoryReader(client, scripts, keys).outcome(P, entry)
    assert outcome is not None
    assert (outcome.status, outcome.reason) == ("duplicate", "already_applied")


async def test_settling_twice_dead_letters_once(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    (entry,) = await deliver(client, keys, 1)
    streams = PartitionStreams(client, scripts, keys, Group.APPENDER)
    settle = Settle(entry, "refused", "failed", "boom", letter={"event": "{}", "reason": "failed"})
    assert (await streams.settle(lease, [settle], 60_000))[0] is not None
    assert await streams.settle(lease, [settle], 60_000) == [None]
    assert await client.xlen(keys.dlq(P)) == 1


async def test_acquiring_twice_with_the_same_nonce_is_the_same_acquisition(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    lease_key, fence = keys.lease(P, "appender"), keys.fence(P, "appender")
    count = keys.partition_count(P)
    first = await scripts("acquire_lease", [lease_key, fence, count], ["w1", "n1", 5000, 0])
    again = await scripts("acquire_lease", [lease_key, fence, count], ["w1", "n1", 5000, 0])
    other = await scripts("acquire_lease", [lease_key, fence, count], ["w2", "n2", 5000, 0])
    assert first == again and int(first[0]) == 1
    assert int(other[0]) == 0
    assert await client.get(fence) == "1"


async def test_watermarks_compare_stream_ids_exactly_beyond_double_precision(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    store = MemoryStore(scripts, keys, Retention())
    # 2**53 and 2**53 + 1 are the same double: only an exact comparison keeps both.
    low = str(await client.xadd(keys.ingest(P), {"event": "{}"}, id="9007199254740992-0"))
    high = str(await client.xadd(keys.ingest(P), {"event": "{}"}, id="9007199254740993-0"))
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(P): ">"})
    first = ApplyBatch(keys, P)
    first.append(Target(low, MEM, 60_000, "ev1"), msg("low"))
    second = ApplyBatch(keys, P)
    second.append(Target(high, MEM, 60_000, "ev2"), msg("high"))
    assert await store.apply(lease, first) == ["applied"]
    assert await store.apply(lease, second) == ["applied"]


async def test_a_replay_older_than_the_tombstone_ttl_is_refused(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    store = MemoryStore(scripts, keys, Retention())
    (entry,) = await deliver(client, keys, 1)
    b = ApplyBatch(keys, P)
    b.append(Target(entry, MEM, 60_000, "ev", replay_of="1-0"), msg("ancient"))
    assert await store.apply(lease, b) == ["refused"]
    letter = (await client.xrange(keys.dlq(P)))[0][1]
    assert letter["reason"] == "replay_too_old" and letter["replay_of"] == "1-0"


async def test_a_waiter_is_never_handed_another_events_outcome(
    client: RedisClient, scripts: Scripts, keys: Keys, redis_url: str
) -> None:
    entry = "1795000000000-0"
    bucket = keys.outcomes(P, entry)
    await client.hset(bucket, entry, json.dumps({"status": "applied", "event": "theirs"}))
    reader = MemoryReader(client, scripts, keys)
    with pytest.raises(OutcomeMismatchError, match="publish again"):
        await reader.wait_applied(P, entry, 1, event_id="mine")
    outcome = await reader.wait_applied(P, entry, 1, event_id="theirs")
    assert outcome.status == "applied"


def test_clients_never_resend_a_command_on_their_own(redis_url: str) -> None:
    client = connect(redis_url)
    retry = client.retry if isinstance(client, RedisCluster) else client.get_retry()
    assert retry is not None and retry.get_retries() == 0


async def test_a_read_stops_at_its_byte_budget_and_the_rest_comes_next(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    streams = PartitionStreams(client, scripts, keys, Group.APPENDER)
    big = "x" * 100_000
    ids = [str(await client.xadd(keys.ingest(P), {"event": big})) for _ in range(5)]
    first = await streams.read(lease, "w1", 100, max_bytes=250_000)
    assert [e.id for e in first.entries] == ids[:3] and first.more
    await streams.settle(lease, [Settle(e.id, "applied") for e in first.entries], 60_000)
    second = await streams.read(lease, "w1", 100, max_bytes=250_000)
    # Delivered past the budget, they stay pending for this consumer and come first.
    assert [e.id for e in second.entries] == ids[3:]
    assert second.source == "pending" and not second.more


async def test_a_replay_older_than_the_idempotency_window_is_refused(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    window = Retention(idempotency_ms=60_000, tombstone_ms=7 * 86_400_000)
    store = MemoryStore(scripts, keys, window)
    (entry,) = await deliver(client, keys, 1)
    seconds, _ = await client.time()
    two_minutes_ago = f"{(seconds - 120) * 1000}-0"
    b = ApplyBatch(keys, P)
    b.append(Target(entry, MEM, 60_000, "ev", replay_of=two_minutes_ago), msg("late"))
    assert await store.apply(lease, b) == ["refused"]
    letter = (await client.xrange(keys.dlq(P)))[0][1]
    assert letter["reason"] == "replay_too_old"


@pytest.mark.parametrize(
    ("last", "floor"),
    [("5-9", "5-10"), ("5-19", "5-20"), ("5-99", "5-100"), ("5-18446744073709551615", "6-0")],
)
async def test_the_trim_floor_is_the_exact_next_id(
    client: RedisClient, scripts: Scripts, keys: Keys, last: str, floor: str
) -> None:
    stream = keys.ingest(P)
    await client.xadd(stream, {"event": "{}"}, id="5-1")
    await client.xadd(stream, {"event": "{}"}, id=last)
    await client.xgroup_create(stream, Group.APPENDER.value, "0")
    await client.xreadgroup(Group.APPENDER.value, "w1", {stream: ">"})
    await client.xack(stream, Group.APPENDER.value, "5-1", last)
    assert await scripts("trim_stream", [stream], ["=", Group.APPENDER.value]) == [
        "trimmed",
        2,
        floor,
    ]
