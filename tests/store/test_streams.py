"""The Redis Streams side of the runtime (store/streams.py): read_entries.lua,
claim_pending.lua, count_attempt.lua, settle_entries.lua, create_groups.lua and the
plain XREAD BLOCK wait, against real Redis 6.2, 7.x and a Cluster."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest
from redis.exceptions import ResponseError

from store import (
    Group,
    Keys,
    Lease,
    LeaseLostError,
    Leases,
    MemoryReader,
    PartitionStreams,
    RedisClient,
    Scripts,
    Settle,
    ensure_groups,
)

P = 2
GROUP = Group.APPENDER.value
OUTCOME_MS = 60_000


class RecordingScripts:
    """Scripts that remember which scripts were called (to count pages)."""

    def __init__(self, inner: Scripts) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def __call__(self, name: str, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        self.calls.append(name)
        return await self.inner(name, keys, args)


@pytest.fixture
async def lease(scripts: Scripts, keys: Keys) -> Lease:
    await ensure_groups(scripts, keys, P)
    held = await Leases(scripts, keys, GROUP, 10_000).acquire(P, "w1")
    assert held is not None
    return held


@pytest.fixture
def streams(client: RedisClient, scripts: Scripts, keys: Keys) -> PartitionStreams:
    return PartitionStreams(client, scripts, keys, Group.APPENDER)


async def add(client: RedisClient, keys: Keys, n: int, start: int = 0) -> list[str]:
    return [
        str(await client.xadd(keys.ingest(P), {"event": f"e{start + i}", "n": str(start + i)}))
        for i in range(n)
    ]


async def add_many(client: RedisClient, keys: Keys, n: int) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(keys.ingest(P), {"event": f"e{i}"})
    return [str(x) for x in await pipe.execute()]


async def deliver(client: RedisClient, keys: Keys, consumer: str, count: int) -> list[str]:
    """Deliver new entries to ``consumer`` outside any script (a previous holder)."""
    reply = await client.xreadgroup(GROUP, consumer, {keys.ingest(P): ">"}, count=count)
    return [str(entry[0]) for entry in reply[0][1]] if reply else []


async def pending_by_consumer(client: RedisClient, keys: Keys) -> dict[str, list[str]]:
    rows = await client.xpending_range(keys.ingest(P), GROUP, "-", "+", 100_000)
    owners: dict[str, list[str]] = {}
    for row in rows:
        owners.setdefault(str(row["consumer"]), []).append(str(row["message_id"]))
    return owners


async def consumers(client: RedisClient, keys: Keys) -> set[str]:
    return {str(c["name"]) for c in await client.xinfo_consumers(keys.ingest(P), GROUP)}


async def redis_major(client: RedisClient) -> int:
    info = await client.info("server")
    if "redis_version" not in info:  # a Cluster answers per node
        info = next(iter(info.values()))
    return int(str(info["redis_version"]).split(".")[0])


def lease_key(keys: Keys) -> str:
    return keys.lease(P, GROUP)


def stale(lease: Lease) -> Lease:
    fence, worker, _ = lease.value.split(":")
    return Lease(lease.partition, lease.group, f"{fence}:{worker}:{'f' * 16}")


# -- read_entries.lua ---------------------------------------------------------------


async def test_read_delivers_new_entries_in_order_with_fields_and_tail(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 3)
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.source == "new"
    assert [e.id for e in delivery.entries] == ids
    assert [e.fields for e in delivery.entries] == [
        {"event": f"e{i}", "n": str(i)} for i in range(3)
    ]
    assert [e.attempts for e in delivery.entries] == [0, 0, 0]
    assert delivery.tail == ids[-1]
    assert await pending_by_consumer(client, keys) == {"w1": ids}


async def test_read_takes_at_most_count_entries(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 5)
    delivery = await streams.read(lease, "w1", 2)
    assert [e.id for e in delivery.entries] == ids[:2]
    assert delivery.tail == ids[-1]
    assert await pending_by_consumer(client, keys) == {"w1": ids[:2]}


async def test_own_pending_entries_come_before_new_ones(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 3)
    first = await streams.read(lease, "w1", 2)
    assert [e.id for e in first.entries] == ids[:2]
    more = await add(client, keys, 2, start=3)
    again = await streams.read(lease, "w1", 10)
    assert again.source == "pending"
    assert [e.id for e in again.entries] == ids[:2]
    assert again.tail == more[-1]
    await client.xack(keys.ingest(P), GROUP, *ids[:2])
    after_ack = await streams.read(lease, "w1", 10)
    assert after_ack.source == "new"
    assert [e.id for e in after_ack.entries] == [ids[2], *more]


async def test_pending_entries_are_redelivered_in_id_order_count_at_a_time(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 5)
    await streams.read(lease, "w1", 5)
    seen: list[str] = []
    for _ in range(3):
        delivery = await streams.read(lease, "w1", 2)
        assert delivery.source == "pending"
        seen += [e.id for e in delivery.entries]
        await client.xack(keys.ingest(P), GROUP, *[e.id for e in delivery.entries])
    assert seen == ids
    last = await streams.read(lease, "w1", 2)
    assert last.entries == [] and last.source == "new"


async def test_entries_pending_for_another_consumer_are_not_redelivered(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 4)
    assert await deliver(client, keys, "old", 2) == ids[:2]
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.source == "new"
    assert [e.id for e in delivery.entries] == ids[2:]
    assert await pending_by_consumer(client, keys) == {"old": ids[:2], "w1": ids[2:]}


async def test_a_stale_lease_reads_nothing_and_delivers_nothing(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 3)
    with pytest.raises(LeaseLostError) as caught:
        await streams.read(stale(lease), "w1", 10)
    assert caught.value.partition == P and caught.value.group == GROUP
    assert await pending_by_consumer(client, keys) == {}
    groups = await client.xinfo_groups(keys.ingest(P))
    assert groups[0]["last-delivered-id"] == "0-0"
    # The holder still gets every entry, as new.
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.source == "new" and [e.id for e in delivery.entries] == ids


async def test_an_expired_lease_reads_nothing(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    await add(client, keys, 1)
    await client.delete(keys.lease(P, GROUP))
    with pytest.raises(LeaseLostError):
        await streams.read(lease, "w1", 10)
    assert await pending_by_consumer(client, keys) == {}


async def test_read_returns_the_counted_attempts_of_each_entry(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 3)
    await streams.read(lease, "w1", 10)
    await streams.count_attempt(lease, ids[1])
    await streams.count_attempt(lease, ids[1])
    await streams.count_attempt(lease, ids[2])
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.source == "pending"
    assert [e.attempts for e in delivery.entries] == [0, 2, 1]


async def test_reading_an_empty_stream_returns_nothing_with_tail_zero(
    streams: PartitionStreams, lease: Lease
) -> None:
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.source == "new"
    assert delivery.entries == []
    assert delivery.tail == "0-0"


async def test_the_tail_is_the_last_entry_when_nothing_is_left(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 2)
    await streams.read(lease, "w1", 10)
    await client.xack(keys.ingest(P), GROUP, *ids)
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.entries == [] and delivery.tail == ids[-1]


async def test_a_deleted_entry_still_pending_comes_back_without_fields(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 3)
    await streams.read(lease, "w1", 10)
    await client.xdel(keys.ingest(P), ids[1])
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.source == "pending"
    assert [e.id for e in delivery.entries] == ids
    assert delivery.entries[0].fields == {"event": "e0", "n": "0"}
    assert delivery.entries[1].fields is None
    assert delivery.entries[2].fields == {"event": "e2", "n": "2"}


async def test_read_fails_on_a_missing_group(
    client: RedisClient, scripts: Scripts, keys: Keys, streams: PartitionStreams
) -> None:
    held = await Leases(scripts, keys, GROUP, 10_000).acquire(P, "w1")
    assert held is not None
    await add(client, keys, 1)
    with pytest.raises(ResponseError, match="NOGROUP"):
        await streams.read(held, "w1", 10)


# -- claim_pending.lua ----------------------------------------------------------------


async def test_claim_takes_every_pending_entry_from_other_consumers(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 6)
    a = await deliver(client, keys, "a", 2)
    b = await deliver(client, keys, "b", 3)
    claim = await streams.claim_all(lease, "w1")
    assert sorted(claim.claimed) == sorted(a + b)
    assert claim.claimed == sorted(claim.claimed, key=lambda i: tuple(map(int, i.split("-"))))
    assert claim.gone == []
    assert await pending_by_consumer(client, keys) == {"w1": a + b}
    # The claimed entries come first, then the one never delivered.
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.source == "pending" and [e.id for e in delivery.entries] == a + b
    await client.xack(keys.ingest(P), GROUP, *(a + b))
    fresh = await streams.read(lease, "w1", 10)
    assert [e.id for e in fresh.entries] == [ids[5]]


async def test_claim_pages_until_the_cursor_returns_to_zero(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    recording = RecordingScripts(scripts)
    streams = PartitionStreams(client, recording, keys, Group.APPENDER)  # type: ignore[arg-type]
    ids = await add_many(client, keys, 1150)
    assert len(await deliver(client, keys, "old", 600)) == 600
    assert len(await deliver(client, keys, "older", 600)) == 550
    claim = await streams.claim_all(lease, "w1", page=100)
    assert recording.calls.count("claim_pending") >= 12
    assert len(claim.claimed) == len(set(claim.claimed)) == 1150
    assert set(claim.claimed) == set(ids)
    assert await pending_by_consumer(client, keys) == {"w1": ids}
    assert sorted(claim.removed_consumers) == ["old", "older"]
    # Only the lowest pending entry is charged for the takeover (rule 5).
    assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "1"}


async def test_claim_with_the_default_page_takes_more_than_a_thousand_entries(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add_many(client, keys, 1200)
    await deliver(client, keys, "old", 1200)
    claim = await streams.claim_all(lease, "w1")
    assert set(claim.claimed) == set(ids)
    assert await pending_by_consumer(client, keys) == {"w1": ids}


async def test_each_takeover_charges_one_attempt_to_the_lowest_pending_entry(
    scripts: Scripts, streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 3)
    await deliver(client, keys, "old", 2)
    await streams.claim_all(lease, "w1")
    assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "1"}
    leases = Leases(scripts, keys, GROUP, 10_000)
    # The holder dies (its lease expires, nothing released): the next takeover charges.
    await client.delete(keys.lease(P, GROUP))
    second = await leases.acquire(P, "w2")
    assert second is not None
    claim = await streams.claim_all(second, "w2")
    assert claim.claimed == ids[:2]
    assert claim.removed_consumers == ["w1"]
    # The entries behind the lowest one are never charged for it.
    assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "2"}
    delivery = await streams.read(second, "w2", 10)
    assert [(e.id, e.attempts) for e in delivery.entries] == [(ids[0], 2), (ids[1], 0)]
    # Once the lowest is settled, the next takeover charges the next one.
    await streams.settle(second, [Settle(ids[0], "applied")], OUTCOME_MS)
    await client.delete(keys.lease(P, GROUP))  # the second holder dies too
    third = await leases.acquire(P, "w3")
    assert third is not None
    assert (await streams.claim_all(third, "w3")).claimed == [ids[1]]
    assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[1]: "1"}


async def test_a_takeover_does_not_charge_the_entry_the_partition_is_held_at(
    scripts: Scripts, streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 2)
    await deliver(client, keys, "old", 2)
    held = {"entry": ids[0], "reason": "schema version 3 is newer than 2", "worker": "old"}
    await client.set(keys.held(P, GROUP), json.dumps(held))
    claim = await streams.claim_all(lease, "w1")
    assert claim.claimed == ids
    assert await client.hgetall(keys.attempts(P, GROUP)) == {}
    # Held at another entry (or an unreadable marker): the lowest one is charged.
    for marker in (json.dumps({"entry": ids[1]}), "not json"):
        await client.set(keys.held(P, GROUP), marker)
        await client.hdel(keys.attempts(P, GROUP), ids[0])
        await streams.claim_all(lease, "w1")
        assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "1"}, marker


async def test_idle_consumers_are_removed_but_not_the_caller_or_busy_ones(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    await client.xgroup_createconsumer(keys.ingest(P), GROUP, "idle")
    await client.xgroup_createconsumer(keys.ingest(P), GROUP, "w1")
    claim = await streams.claim_all(lease, "w1")
    assert claim.claimed == [] and claim.gone == []
    assert claim.removed_consumers == ["idle"]
    assert "idle" not in await consumers(client, keys)
    assert "w1" in await consumers(client, keys)


async def test_a_clean_handover_charges_no_attempt(
    scripts: Scripts, streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 2)
    await deliver(client, keys, "w1", 2)
    leases = Leases(scripts, keys, GROUP, 10_000)
    assert await leases.release(lease)  # a graceful handover (the entries stay pending)
    second = await leases.acquire(P, "w2")
    assert second is not None
    claim = await streams.claim_all(second, "w2")
    assert claim.claimed == ids
    assert await client.hgetall(keys.attempts(P, GROUP)) == {}
    assert await client.get(keys.released(P, GROUP)) == str(lease.fence)


async def test_nothing_is_removed_before_the_last_page(
    scripts: Scripts, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    await add(client, keys, 5)
    await deliver(client, keys, "old", 5)
    await client.xgroup_createconsumer(keys.ingest(P), GROUP, "idle")
    reply = await scripts(
        "claim_pending",
        [
            lease_key(keys),
            keys.ingest(P),
            keys.attempts(P, GROUP),
            keys.held(P, GROUP),
            keys.released(P, GROUP),
        ],
        [lease.value, GROUP, "w1", "0-0", 2],
    )
    assert reply[0] == "ok" and reply[1] != "0-0"
    assert len(reply[2]) == 2 and reply[4] == []
    assert await consumers(client, keys) >= {"old", "idle"}


async def test_a_stale_lease_claims_nothing(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    await add(client, keys, 3)
    old = await deliver(client, keys, "old", 3)
    await client.xgroup_createconsumer(keys.ingest(P), GROUP, "idle")
    with pytest.raises(LeaseLostError):
        await streams.claim_all(stale(lease), "w1")
    assert await pending_by_consumer(client, keys) == {"old": old}
    assert await client.hgetall(keys.attempts(P, GROUP)) == {}
    assert {"old", "idle"} <= await consumers(client, keys)


async def test_deleted_pending_entries_are_gone_on_redis_7_and_erased_on_read_on_6(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 4)
    await deliver(client, keys, "old", 4)
    await client.xdel(keys.ingest(P), ids[1], ids[2])
    await client.hset(keys.attempts(P, GROUP), ids[1], "3")
    claim = await streams.claim_all(lease, "w1")
    if await redis_major(client) >= 7:
        assert claim.gone == [ids[1], ids[2]]
        assert claim.claimed == [ids[0], ids[3]]
        assert await pending_by_consumer(client, keys) == {"w1": [ids[0], ids[3]]}
        assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "1"}
    else:
        # Redis 6.2 claims them like any other; the fenced read reports them deleted.
        assert claim.gone == []
        assert claim.claimed == ids
        assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "1", ids[1]: "3"}
        delivery = await streams.read(lease, "w1", 10)
        assert [e.id for e in delivery.entries] == ids
        assert [e.fields is None for e in delivery.entries] == [False, True, True, False]


# -- count_attempt.lua ----------------------------------------------------------------


async def test_count_attempt_counts_one_per_call(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 2)
    assert [await streams.count_attempt(lease, ids[0]) for _ in range(3)] == [1, 2, 3]
    assert await streams.count_attempt(lease, ids[1]) == 1
    assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "3", ids[1]: "1"}
    assert await client.pttl(keys.attempts(P, GROUP)) == -1


async def test_a_stale_lease_counts_no_attempt(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 1)
    with pytest.raises(LeaseLostError):
        await streams.count_attempt(stale(lease), ids[0])
    assert await client.hgetall(keys.attempts(P, GROUP)) == {}


# -- settle_entries.lua ---------------------------------------------------------------


async def test_settle_acknowledges_with_outcomes_and_forgets_attempts(
    streams: PartitionStreams,
    lease: Lease,
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
) -> None:
    ids = await add(client, keys, 3)
    await streams.read(lease, "w1", 10)
    await streams.count_attempt(lease, ids[0])
    letters = await streams.settle(
        lease,
        [
            Settle(ids[0], "erased", "erased", "gone before it was processed"),
            Settle(ids[1], "applied"),
        ],
        OUTCOME_MS,
    )
    assert letters == [None, None]
    assert await pending_by_consumer(client, keys) == {"w1": [ids[2]]}
    assert await client.hgetall(keys.attempts(P, GROUP)) == {}
    reader = MemoryReader(client, scripts, keys)
    first = await reader.outcome(P, ids[0])
    assert first is not None
    assert (first.status, first.reason, first.detail) == (
        "erased",
        "erased",
        "gone before it was processed",
    )
    assert first.dead_letter is None
    second = await reader.outcome(P, ids[1])
    assert second is not None and second.status == "applied" and second.reason is None
    assert await reader.outcome(P, ids[2]) is None
    assert await client.xlen(keys.dlq(P)) == 0
    bucket = keys.outcomes(P, ids[0])
    assert 0 < await client.pttl(bucket) <= OUTCOME_MS


async def test_settle_writes_dead_letters_with_their_fields(
    streams: PartitionStreams,
    lease: Lease,
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
) -> None:
    ids = await add(client, keys, 2)
    await streams.read(lease, "w1", 10)
    letter = {
        "event": '{"type": "message_appended"}',
        "reason": "attempts_exhausted",
        "detail": "its worker stopped while processing it",
        "entry": ids[0],
        "source": keys.ingest(P),
        "attempts": "10",
    }
    letters = await streams.settle(
        lease,
        [
            Settle(ids[0], "refused", letter["reason"], letter["detail"], letter=letter),
            Settle(ids[1], "applied"),
        ],
        OUTCOME_MS,
    )
    assert letters[0] is not None and letters[1] is None
    stored = await client.xrange(keys.dlq(P))
    assert [(entry_id, fields) for entry_id, fields in stored] == [(letters[0], letter)]
    outcome = await MemoryReader(client, scripts, keys).outcome(P, ids[0])
    assert outcome is not None
    assert outcome.status == "refused" and outcome.reason == "attempts_exhausted"
    assert outcome.dead_letter == letters[0]
    assert not outcome.ok
    assert await pending_by_consumer(client, keys) == {}


async def test_settle_records_each_outcome_in_the_bucket_of_its_minute(
    streams: PartitionStreams,
    lease: Lease,
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
) -> None:
    ids = ["59999-0", "60000-0", "61000-3", "180000-1"]
    for entry_id in ids:
        await client.xadd(keys.ingest(P), {"event": "e"}, id=entry_id)
    await streams.read(lease, "w1", 10)
    statuses = ["applied", "duplicate", "erased", "refused"]
    await streams.settle(
        lease, [Settle(i, s) for i, s in zip(ids, statuses, strict=True)], OUTCOME_MS
    )
    reader = MemoryReader(client, scripts, keys)
    found = [await reader.outcome(P, i) for i in ids]
    assert [o.status if o else None for o in found] == statuses
    assert len({keys.outcomes(P, i) for i in ids}) == 3
    assert await client.hkeys(keys.outcomes(P, "60000-0")) == ["60000-0", "61000-3"]
    for entry_id in ids:
        assert 0 < await client.pttl(keys.outcomes(P, entry_id)) <= OUTCOME_MS


async def test_settling_a_dead_letter_again_writes_it_once(
    streams: PartitionStreams,
    lease: Lease,
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
) -> None:
    ids = await add(client, keys, 1)
    await streams.read(lease, "w1", 10)
    letter = {"event": "{}", "reason": "failed", "detail": "boom", "entry": ids[0]}
    settle = Settle(ids[0], "refused", "failed", "boom", letter=letter)
    first = await streams.settle(lease, [settle], OUTCOME_MS)
    # A retried call (its reply lost, say): the entry is no longer pending.
    second = await streams.settle(lease, [settle], OUTCOME_MS)
    assert first[0] is not None and second == [None]
    assert [i for i, _ in await client.xrange(keys.dlq(P))] == [first[0]]
    outcome = await MemoryReader(client, scripts, keys).outcome(P, ids[0])
    assert outcome is not None and outcome.dead_letter == first[0]


async def test_settle_keeps_an_outcome_already_recorded(
    streams: PartitionStreams,
    lease: Lease,
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
) -> None:
    ids = await add(client, keys, 1)
    await streams.read(lease, "w1", 10)
    await streams.settle(lease, [Settle(ids[0], "applied")], OUTCOME_MS)
    await streams.settle(lease, [Settle(ids[0], "erased", "erased")], OUTCOME_MS)
    outcome = await MemoryReader(client, scripts, keys).outcome(P, ids[0])
    assert outcome is not None and outcome.status == "applied"


async def test_a_stale_lease_settles_nothing(
    streams: PartitionStreams,
    lease: Lease,
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
) -> None:
    ids = await add(client, keys, 1)
    await streams.read(lease, "w1", 10)
    await streams.count_attempt(lease, ids[0])
    letter = {"event": "{}", "reason": "failed", "entry": ids[0]}
    with pytest.raises(LeaseLostError):
        await streams.settle(
            stale(lease), [Settle(ids[0], "refused", "failed", letter=letter)], OUTCOME_MS
        )
    assert await pending_by_consumer(client, keys) == {"w1": ids}
    assert await client.xlen(keys.dlq(P)) == 0
    assert await MemoryReader(client, scripts, keys).outcome(P, ids[0]) is None
    assert await client.hgetall(keys.attempts(P, GROUP)) == {ids[0]: "1"}


async def test_settling_nothing_calls_no_script(
    client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    recording = RecordingScripts(scripts)
    streams = PartitionStreams(client, recording, keys, Group.APPENDER)  # type: ignore[arg-type]
    assert await streams.settle(lease, [], OUTCOME_MS) == []
    assert recording.calls == []


# -- create_groups.lua ----------------------------------------------------------------


async def test_ensure_groups_creates_every_group_at_zero_once(
    scripts: Scripts, client: RedisClient, keys: Keys
) -> None:
    assert await ensure_groups(scripts, keys, P) == 3
    assert await ensure_groups(scripts, keys, P) == 0
    expected = {
        keys.ingest(P): Group.APPENDER,
        keys.changes(P): Group.ACCOUNTANT,
        keys.flush(P): Group.SUMMARIZER,
    }
    for stream, group in expected.items():
        groups = await client.xinfo_groups(stream)
        assert [(g["name"], g["last-delivered-id"]) for g in groups] == [(group.value, "0-0")]
    assert await client.xlen(keys.dlq(P)) == 0


async def test_entries_published_before_the_groups_exist_are_delivered(
    scripts: Scripts, client: RedisClient, keys: Keys, streams: PartitionStreams
) -> None:
    ids = await add(client, keys, 3)
    assert await ensure_groups(scripts, keys, P) == 3
    held = await Leases(scripts, keys, GROUP, 10_000).acquire(P, "w1")
    assert held is not None
    delivery = await streams.read(held, "w1", 10)
    assert [e.id for e in delivery.entries] == ids


async def test_ensure_groups_keeps_the_position_of_existing_groups(
    streams: PartitionStreams, lease: Lease, scripts: Scripts, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 2)
    await streams.read(lease, "w1", 10)
    await client.xack(keys.ingest(P), GROUP, *ids)
    assert await ensure_groups(scripts, keys, P) == 0
    delivery = await streams.read(lease, "w1", 10)
    assert delivery.entries == []


async def test_ensure_groups_creates_only_the_missing_ones(
    scripts: Scripts, client: RedisClient, keys: Keys
) -> None:
    await client.xgroup_create(keys.changes(P), Group.ACCOUNTANT.value, "0", mkstream=True)
    assert await ensure_groups(scripts, keys, P) == 2


async def test_ensure_groups_reports_errors_other_than_an_existing_group(
    scripts: Scripts, client: RedisClient, keys: Keys
) -> None:
    await client.set(keys.changes(P), "not a stream")
    with pytest.raises(ResponseError, match=r"WRONGTYPE|wrong kind"):
        await ensure_groups(scripts, keys, P)


# -- waiting with XREAD BLOCK -----------------------------------------------------------


async def test_wait_returns_when_an_entry_arrives_after_the_tail(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 1)
    tail = (await streams.read(lease, "w1", 10)).tail
    assert tail == ids[0]
    started = time.monotonic()
    waiter = asyncio.create_task(streams.wait(P, tail, 20_000))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await add(client, keys, 1, start=1)
    assert await asyncio.wait_for(waiter, 10) is True
    assert time.monotonic() - started < 10
    # Waiting delivers nothing: the new entry is not pending for anyone.
    assert await pending_by_consumer(client, keys) == {"w1": ids}


async def test_wait_returns_at_once_when_entries_are_already_after_the_tail(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    await add(client, keys, 2)
    assert await asyncio.wait_for(streams.wait(P, "0-0", 20_000), 5) is True


async def test_wait_times_out_when_nothing_arrives(
    streams: PartitionStreams, lease: Lease, client: RedisClient, keys: Keys
) -> None:
    ids = await add(client, keys, 1)
    started = time.monotonic()
    assert await asyncio.wait_for(streams.wait(P, ids[0], 200), 5) is False
    assert time.monotonic() - started >= 0.15
