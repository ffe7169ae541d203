"""Partition leases with fencing (DESIGN rule 1): store/lease.py and acquire_lease.lua,
refresh_lease.lua, release_lease.lua, against real Redis 6.2, 7.x and a Cluster."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from store import (
    Group,
    Keys,
    Lease,
    LeaseHolder,
    Leases,
    PartitionCountChangedError,
    RedisClient,
    Scripts,
)

P = 3
GROUP = Group.APPENDER.value
TTL = 10_000


@pytest.fixture
def leases(scripts: Scripts, keys: Keys) -> Leases:
    return Leases(scripts, keys, GROUP, TTL)


async def expire_now(client: RedisClient, key: str, timeout: float = 5.0) -> None:
    """Expire a key at once and wait (with a deadline) until Redis reports it gone."""
    await client.pexpire(key, 1)
    deadline = time.monotonic() + timeout
    while await client.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire within {timeout}s"
        await asyncio.sleep(0.005)


async def acquired(leases: Leases, partition: int, worker: str) -> Lease:
    lease = await leases.acquire(partition, worker)
    assert lease is not None, f"{worker} could not acquire partition {partition}"
    return lease


async def test_acquire_returns_a_value_of_fence_worker_and_nonce(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    assert re.fullmatch(r"1:w1:[0-9a-f]{16}", lease.value)
    assert lease.fence == 1
    assert lease.partition == P and lease.group == GROUP
    assert await client.get(keys.lease(P, GROUP)) == lease.value
    assert 0 < await client.pttl(keys.lease(P, GROUP)) <= TTL
    assert await client.get(keys.fence(P, GROUP)) == "1"


async def test_two_acquisitions_get_different_nonces(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    first = await acquired(leases, P, "w1")
    await leases.release(first)
    second = await acquired(leases, P, "w1")
    assert first.value.split(":")[2] != second.value.split(":")[2]


async def test_a_second_worker_cannot_acquire_while_the_lease_is_held(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    assert await leases.acquire(P, "w2") is None
    assert await leases.acquire(P, "w1") is None  # not re-entrant either
    assert await client.get(keys.lease(P, GROUP)) == lease.value
    # A refused acquisition is not an acquisition: the fence does not move.
    assert await client.get(keys.fence(P, GROUP)) == "1"


async def test_a_refused_acquisition_reports_the_holder_and_its_ttl(
    leases: Leases, scripts: Scripts, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    lease_keys = [keys.lease(P, GROUP), keys.fence(P, GROUP), keys.partition_count(P)]
    reply = await scripts("acquire_lease", lease_keys, ["w2", "abcd", TTL, 0])
    assert reply[0] == 0
    assert reply[1] == lease.value
    assert 0 < int(reply[2]) <= TTL


async def test_a_retried_acquisition_returns_the_lease_it_took(
    leases: Leases, scripts: Scripts, client: RedisClient, keys: Keys
) -> None:
    lease_keys = [keys.lease(P, GROUP), keys.fence(P, GROUP), keys.partition_count(P)]
    first = await scripts("acquire_lease", lease_keys, ["w1", "0123abcd", TTL, 0])
    again = await scripts("acquire_lease", lease_keys, ["w1", "0123abcd", TTL, 0])
    assert first == again == [1, "1:w1:0123abcd"]
    assert await client.get(keys.fence(P, GROUP)) == "1"
    # Another nonce of the same worker, or the same nonce of another worker, is refused.
    assert (await scripts("acquire_lease", lease_keys, ["w1", "ffff0000", TTL, 0]))[0] == 0
    assert (await scripts("acquire_lease", lease_keys, ["w2", "0123abcd", TTL, 0]))[0] == 0
    assert (await scripts("acquire_lease", lease_keys, ["1:w1", "0123abcd", TTL, 0]))[0] == 0


async def test_a_lease_is_taken_only_for_the_count_the_partition_belongs_to(
    scripts: Scripts, client: RedisClient, keys: Keys
) -> None:
    """Before the count was ever changed nothing is checked; after, only workers of the
    partition's count get a lease, and none while it is 'moving'."""
    mine = Leases(scripts, keys, GROUP, TTL, partitions=4)
    first = await mine.acquire(P, "w1")
    assert first is not None
    await mine.release(first)
    await client.set(keys.partition_count(P), "moving")
    with pytest.raises(PartitionCountChangedError, match="is being changed"):
        await mine.acquire(P, "w1")
    await client.set(keys.partition_count(P), "6")
    with pytest.raises(PartitionCountChangedError, match="is now 6, not the 4"):
        await mine.acquire(P, "w1")
    assert await client.get(keys.lease(P, GROUP)) is None
    assert await Leases(scripts, keys, GROUP, TTL, partitions=6).acquire(P, "w2") is not None
    # A topic of one partition (the lifecycle stream) is not checked.
    assert await Leases(scripts, keys, "cleanup", TTL).acquire(P, "w3") is not None


async def test_the_fence_increments_on_every_acquisition(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    fences = []
    for worker in ("w1", "w2", "w1"):
        lease = await acquired(leases, P, worker)
        fences.append(lease.fence)
        assert await leases.release(lease)
    # ... and on an acquisition after an expiry, too.
    lease = await acquired(leases, P, "w3")
    await expire_now(client, keys.lease(P, GROUP))
    fences.append(lease.fence)
    fences.append((await acquired(leases, P, "w4")).fence)
    assert fences == [1, 2, 3, 4, 5]


async def test_the_fence_counter_never_expires(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    assert await client.pttl(keys.fence(P, GROUP)) == -1
    await expire_now(client, keys.lease(P, GROUP))
    assert await client.pttl(keys.fence(P, GROUP)) == -1
    lease = await acquired(leases, P, "w2")
    await leases.release(lease)
    assert await client.pttl(keys.fence(P, GROUP)) == -1
    assert await client.get(keys.fence(P, GROUP)) == "2"


async def test_the_lease_expires_after_its_ttl(
    scripts: Scripts, client: RedisClient, keys: Keys
) -> None:
    short = Leases(scripts, keys, GROUP, 1000)
    await acquired(short, P, "w1")
    deadline = time.monotonic() + 10
    while await short.acquire(P, "w2") is None:
        assert time.monotonic() < deadline, "a 1 s lease was still held after 10 s"
        await asyncio.sleep(0.05)
    holder = await client.get(keys.lease(P, GROUP))
    assert holder is not None and holder.startswith("2:w2:")


async def test_refresh_extends_a_held_lease(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    await client.pexpire(keys.lease(P, GROUP), 1500)
    assert await leases.refresh(lease)
    assert await client.pttl(keys.lease(P, GROUP)) > 5000
    assert await client.get(keys.lease(P, GROUP)) == lease.value


async def test_a_stale_holder_cannot_refresh(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    await expire_now(client, keys.lease(P, GROUP))
    assert not await leases.refresh(lease)
    # A failed refresh must not bring the lease back.
    assert not await client.exists(keys.lease(P, GROUP))


async def test_a_stale_holder_cannot_release_or_refresh_the_next_holders_lease(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    old = await acquired(leases, P, "w1")
    await expire_now(client, keys.lease(P, GROUP))
    new = await acquired(leases, P, "w2")
    await client.pexpire(keys.lease(P, GROUP), 4000)
    assert not await leases.refresh(old)
    assert not await leases.release(old)
    assert await client.get(keys.lease(P, GROUP)) == new.value
    assert await client.pttl(keys.lease(P, GROUP)) <= 4000


async def test_a_holder_that_reacquired_cannot_use_its_old_lease(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    old = await acquired(leases, P, "w1")
    await expire_now(client, keys.lease(P, GROUP))
    new = await acquired(leases, P, "w1")
    assert not await leases.refresh(old)
    assert not await leases.release(old)
    assert await leases.refresh(new)
    assert await client.get(keys.lease(P, GROUP)) == new.value


async def test_a_lease_is_compared_by_its_whole_value(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    fence, worker, nonce = lease.value.split(":")
    forged = [
        f"{fence}:{worker}:{'0' * 16}",  # same fence and worker, other nonce
        f"{fence}:w2:{nonce}",  # other worker
        f"{int(fence) + 1}:{worker}:{nonce}",  # other fence
        f"{fence}:{worker}",  # a prefix of the value
    ]
    for value in forged:
        assert not await leases.refresh(Lease(P, GROUP, value)), value
        assert not await leases.release(Lease(P, GROUP, value)), value
    assert await client.get(keys.lease(P, GROUP)) == lease.value


async def test_release_frees_the_lease_for_another_worker(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    lease = await acquired(leases, P, "w1")
    assert await leases.release(lease)
    assert not await client.exists(keys.lease(P, GROUP))
    assert not await leases.release(lease)  # releasing twice: not held any more
    second = await acquired(leases, P, "w2")
    assert second.fence == 2


async def test_concurrent_acquisitions_elect_exactly_one_holder(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    results = await asyncio.gather(*(leases.acquire(P, f"w{i}") for i in range(10)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert winners[0].fence == 1
    assert await client.get(keys.lease(P, GROUP)) == winners[0].value


async def test_leases_of_other_partitions_and_groups_are_independent(
    scripts: Scripts, leases: Leases, client: RedisClient, keys: Keys
) -> None:
    other_group = Leases(scripts, keys, Group.ACCOUNTANT.value, TTL)
    a = await acquired(leases, P, "w1")
    b = await acquired(leases, P + 1, "w2")
    c = await acquired(other_group, P, "w3")
    assert (a.fence, b.fence, c.fence) == (1, 1, 1)
    assert await leases.release(a)
    assert await client.get(keys.lease(P + 1, GROUP)) == b.value
    assert await client.get(keys.lease(P, Group.ACCOUNTANT.value)) == c.value
    # A lease of one group is not valid for the other.
    assert not await other_group.refresh(Lease(P, Group.ACCOUNTANT.value, b.value))


def test_a_lease_shorter_than_a_second_is_refused(scripts: Scripts, keys: Keys) -> None:
    with pytest.raises(ValueError, match="at least 1000 ms"):
        Leases(scripts, keys, GROUP, 999)
    assert Leases(scripts, keys, GROUP, 1000).ttl_ms == 1000


async def test_lease_holder_reads_fence_and_worker_of_an_acquired_value(
    leases: Leases, client: RedisClient, keys: Keys
) -> None:
    await acquired(leases, P, "worker-7")
    await acquired(leases, P + 1, "other")  # another partition's fence stays separate
    value = await client.get(keys.lease(P, GROUP))
    holder = LeaseHolder(value, int(await client.pttl(keys.lease(P, GROUP))))
    assert holder.fence == 1
    assert holder.worker == "worker-7"


def test_lease_holder_reads_a_worker_id_that_contains_colons() -> None:
    # Leases.acquire accepts any worker id; the nonce (hex) never contains ':'.
    holder = LeaseHolder("12:host:8080:0123456789abcdef", 5000)
    assert holder.fence == 12
    assert holder.worker == "host:8080"
