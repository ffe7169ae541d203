"""Chaos: workers killed (-9), paused past their lease (SIGSTOP) and replaced while
producers publish; afterwards every memory holds exactly its messages, in order
(DESIGN "Partitions", rules 1 to 6), and nothing deleted comes back."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from events import AppendPayload, MemoryName, MessageAppended, Publisher, Receipt
from memory import Message, ResourceRegistry, Role, partition_for
from processors.appender import Appender
from processors.port import Batch
from store import (
    Group,
    Keys,
    LeaseLostError,
    Leases,
    MemoryReader,
    MemoryStore,
    PartitionStreams,
    RedisClient,
    RedisServerProcess,
    Scripts,
    StreamEntry,
    connect,
    ensure_groups,
    ensure_partitions,
)
from tests.chaos.harness import (
    APPENDER,
    LEASE_TTL_S,
    PARTITIONS,
    ROOT,
    Fleet,
    Proc,
    all_leased_by,
    applied_appends,
    check_exact,
    dead_letters,
    exactness_problems,
    lease_fence,
    lease_pid,
    leases,
    owned_by,
    pending_counts,
    wait_for,
    wait_settled,
    when_busy,
)
from tests.chaos.producer import RESOURCE, TENANT, publish_one, ref_of, share
from tests.conftest import own_server

pytestmark = pytest.mark.chaos

PAUSE_S = 8.0  # longer than the lease TTL
assert PAUSE_S > LEASE_TTL_S


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[str], RedisClient]]:
    made: list[RedisClient] = []

    def make(url: str) -> RedisClient:
        made.append(connect(url))
        return made[-1]

    yield make
    for c in made:
        await c.aclose()


async def start_workers(fleet: Fleet, client: RedisClient, n: int) -> list[Proc]:
    workers = [fleet.start_worker() for _ in range(n)]
    await wait_for(
        lambda: all_leased_by(client, fleet.keys, [w.pid for w in workers]),
        timeout=45,
        what=f"{n} workers to lease every partition",
    )
    return workers


async def busiest(fleet: Fleet, client: RedisClient, among: list[Proc]) -> tuple[Proc, set[int]]:
    """The worker of ``among`` leasing the most partitions, and those partitions."""
    held = await leases(client, fleet.keys)
    owned = {w.name: {p for p, v in held.items() if v and lease_pid(v) == w.pid} for w in among}
    worker = max(among, key=lambda w: len(owned[w.name]))
    return worker, owned[worker.name]


async def leased_by_the_living(fleet: Fleet, client: RedisClient) -> None:
    """Every partition ends up leased by a running worker: none stays with a dead one."""
    await wait_for(
        lambda: all_leased_by(client, fleet.keys, [w.pid for w in fleet.live_workers()]),
        timeout=45,
        what="every partition to be leased by a live worker",
    )


async def progressed(client: RedisClient, keys: Keys, n: int) -> bool:
    return await applied_appends(client, keys) >= n


@pytest.mark.timeout(420)
async def test_crash_and_pause_lose_nothing_and_apply_nothing_twice(
    chaos_url: str, fleets: Callable[[str], Fleet], client_for: Callable[[str], RedisClient]
) -> None:
    producers, messages, memories = 4, 20_000, 500
    rate = messages / producers / 25  # about 25 s of publishing
    started = time.monotonic()
    fleet = fleets(chaos_url)
    client = client_for(chaos_url)
    keys = fleet.keys
    workers = await start_workers(fleet, client, 3)
    fleet.start_producers(producers, messages, memories, rate)

    await wait_for(lambda: progressed(client, keys, messages // 10), timeout=60, what="10% applied")
    killed, killed_owned = await busiest(fleet, client, workers)
    await when_busy(client, keys, killed_owned)
    killed.kill()
    assert killed_owned and fleet.publishing(), "the kill must hit a busy worker mid-publish"
    in_flight = sum((await pending_counts(client, keys, killed_owned)).values())
    print(f"\nkill -9 {killed.name} (partitions {sorted(killed_owned)}, {in_flight} in flight)")

    await wait_for(
        lambda: progressed(client, keys, messages * 3 // 10), timeout=90, what="30% applied"
    )
    paused, paused_owned = await busiest(fleet, client, fleet.live_workers())
    assert paused_owned, f"{paused.name} leases no partition to go stale on"
    await when_busy(client, keys, paused_owned)
    paused.pause()
    paused_at = time.monotonic()
    assert fleet.publishing(), "the pause must overlap publishing"
    await asyncio.sleep(0.2)  # an apply already sent to Redis completes
    in_flight = sum((await pending_counts(client, keys, paused_owned)).values())
    print(f"SIGSTOP {paused.name} (partitions {sorted(paused_owned)}, {in_flight} in flight)")

    async def taken_over() -> bool:
        held = await leases(client, keys)
        return all(held[p] and lease_pid(held[p] or "") != paused.pid for p in paused_owned)

    await wait_for(taken_over, timeout=45, what=f"the partitions of {paused.name} taken over")
    await asyncio.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
    paused.resume()
    print(f"SIGCONT {paused.name} after {time.monotonic() - paused_at:.1f}s")
    fleet.start_worker()  # the killed worker comes back as a new process

    await fleet.wait_producers(timeout=180)
    published_at = time.monotonic()
    await wait_settled(client, keys, timeout=120)
    print(f"settled {time.monotonic() - published_at:.1f}s after the last publish")
    await check_exact(chaos_url, keys, producers, messages, memories)
    await leased_by_the_living(fleet, client)
    stale_lines = [line for line in paused.log_text().splitlines() if "lost" in line]
    assert stale_lines, f"{paused.name} never noticed that it lost its leases"
    kind = "cluster" if "cluster" in chaos_url else "single server"
    print(f"crash and pause ({kind}): {time.monotonic() - started:.1f}s")


@pytest.mark.timeout(300)
async def test_takeover_storm_loses_nothing_and_applies_nothing_twice(
    default_redis_url: str,
    fleets: Callable[[str], Fleet],
    client_for: Callable[[str], RedisClient],
) -> None:
    producers, messages, memories = 2, 5_000, 100
    rate = messages / producers / 20  # about 20 s of publishing
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    started = time.monotonic()
    fleet = fleets(default_redis_url)
    client = client_for(default_redis_url)
    keys = fleet.keys
    await start_workers(fleet, client, 3)
    fleet.start_producers(producers, messages, memories, rate)

    kills = in_flight = 0
    deadline = time.monotonic() + 120
    while fleet.publishing() and time.monotonic() < deadline:
        await asyncio.sleep(rng.uniform(2.0, 3.0))
        if not fleet.publishing():
            break
        victim = rng.choice(fleet.live_workers())
        owned = await owned_by(client, keys, victim.pid)
        await when_busy(client, keys, owned, timeout=1.0)
        fleet.restart(victim)
        kills += 1
        in_flight += sum((await pending_counts(client, keys, owned)).values())
    print(
        f"\nstorm: {kills} workers killed and replaced, {in_flight} entries in flight (seed {seed})"
    )
    await fleet.wait_producers(timeout=60)
    assert kills >= 4, f"only {kills} kills happened while publishing"
    await wait_settled(client, keys, timeout=120)
    await check_exact(default_redis_url, keys, producers, messages, memories)
    await leased_by_the_living(fleet, client)
    print(f"takeover storm: {time.monotonic() - started:.1f}s")


@pytest.mark.timeout(240)
async def test_redis_restart_while_publishing_loses_nothing(
    server_factory: list[RedisServerProcess],
    tmp_path: Path,
    fleets: Callable[[str], Fleet],
    client_for: Callable[[str], RedisClient],
) -> None:
    producers, messages, memories = 2, 4_000, 100
    rate = messages / producers / 15  # about 15 s of publishing
    started = time.monotonic()
    server = own_server(server_factory, tmp_path)  # with its append-only file
    fleet = fleets(server.url)
    client = client_for(server.url)
    keys = fleet.keys
    await start_workers(fleet, client, 2)
    fleet.start_producers(producers, messages, memories, rate)
    await wait_for(
        lambda: progressed(client, keys, messages * 3 // 10), timeout=60, what="30% applied"
    )
    server.kill(signal.SIGTERM)  # a clean shutdown: every acknowledged write is on disk
    assert fleet.publishing(), "Redis must go down while producers publish"
    await asyncio.sleep(2.0)  # down for a while
    server.start()
    print(f"\nRedis restarted on port {server.port}")
    client = client_for(server.url)  # the old client's pooled connection is broken
    await fleet.wait_producers(timeout=120)
    await wait_settled(client, keys, timeout=120)
    await check_exact(server.url, keys, producers, messages, memories)
    retried = sum(p.log_text().count("retrying") for p in fleet.producers)
    print(f"redis restart: {retried} publishes retried, {time.monotonic() - started:.1f}s")


def append_event(key: str, content: str, idempotency_key: str) -> MessageAppended:
    return MessageAppended(
        tenant=TENANT,
        idempotency_key=idempotency_key,
        payload=AppendPayload(
            memory=MemoryName(resource=RESOURCE, key=key),
            message=Message(role=Role.USER, content=content),
        ),
    )


async def pending_of(client: RedisClient, keys: Keys, p: int) -> int:
    summary = await client.xpending(keys.ingest(p), APPENDER)
    return int(summary["pending"])


async def catch_between_read_and_apply(
    fleet: Fleet, client: RedisClient, publisher: Publisher, worker: Proc, key: str, p: int
) -> tuple[int, Receipt, int]:
    """Publish bursts to memory ``key`` until ``worker`` is paused holding entries it read
    but has not applied; returns (messages published, last receipt, entries held)."""
    published = 0
    for burst in range(20):
        events = [
            append_event(key, f"burst {burst} message {i}", f"{fleet.run}:{burst}:{i}")
            for i in range(300)
        ]
        receipts = await publisher.publish_many(events)
        published += len(receipts)
        poll_until = time.monotonic() + 5
        while time.monotonic() < poll_until and not await pending_of(client, fleet.keys, p):
            pass
        worker.pause()
        await asyncio.sleep(0.2)  # let an apply already sent to Redis finish
        caught = await pending_of(client, fleet.keys, p)
        if caught:
            return published, receipts[-1].receipt, caught
        worker.resume()
    raise AssertionError("never caught the holder between read and apply")


@pytest.mark.timeout(180)
async def test_delete_wins_over_a_paused_stale_holder(
    default_redis_url: str,
    fleets: Callable[[str], Fleet],
    client_for: Callable[[str], RedisClient],
) -> None:
    started = time.monotonic()
    fleet = fleets(default_redis_url)
    client = client_for(default_redis_url)
    keys = fleet.keys
    publisher = Publisher(client, keys=keys, default_partitions=PARTITIONS)
    ref = ref_of("conv-doomed")
    p = partition_for(ref.memory_id, PARTITIONS)
    (stale,) = await start_workers(fleet, client, 1)

    published, last, caught = await catch_between_read_and_apply(
        fleet, client, publisher, stale, ref.key, p
    )
    stale_lease = (await leases(client, keys))[p]
    assert stale_lease is not None and lease_pid(stale_lease) == stale.pid
    print(f"\n{stale.name} paused holding {caught} read, unapplied entries of partition {p}")

    successor = fleet.start_worker()

    async def successor_holds() -> bool:
        value = (await leases(client, keys))[p]
        return value is not None and lease_pid(value) == successor.pid

    await wait_for(successor_holds, timeout=45, what="the successor to take the partition over")
    outcome = await publisher.wait_applied(last, timeout=60)
    assert outcome.status == "applied", outcome
    reader = MemoryReader(client, Scripts(client), keys)
    before = await reader.read(ref)
    assert before.exists and before.count == published

    deleted = await publisher.delete(ref, wait=True, timeout=60)
    assert deleted.outcome is not None and deleted.outcome.status == "applied", deleted
    gone = await reader.read(ref)
    assert not gone.exists and gone.count == 0

    before_resume = len(stale.log_text())
    stale.resume()
    # It finds its lease taken (its partition loop checks the fence), or its watchdog
    # gives the partition up first (the lease was not renewed for the TTL): either way
    # it stops working on the partition.
    lost_lines = (
        f"partition {p}: lease lost, stopping its loop",
        f"lease on partition {p} lost: not renewed",
    )
    await wait_for(
        lambda: _ready(any(line in stale.log_text()[before_resume:] for line in lost_lines)),
        timeout=45,
        what=f"{stale.name} to find its lease lost ({lost_lines!r})",
    )
    await wait_settled(client, keys, timeout=60)
    after = await reader.read(ref)
    assert not after.exists, f"the deleted memory came back: {after}"
    assert after.count == 0 and after.messages == []
    assert after.generation == gone.generation and after.watermark == gone.watermark
    assert await applied_appends(client, keys) == published, "an append was applied twice"
    assert await dead_letters(client, keys) == {}
    print(f"delete racing a paused stale holder: {time.monotonic() - started:.1f}s")


async def _ready(value: bool) -> bool:
    return value


async def snapshot(client: RedisClient, namespace: str) -> dict[str, bytes | None]:
    """Every key of the namespace, serialized (DUMP), on a single server."""
    names = sorted([k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)])
    return {k: await client.dump(k) for k in names}


async def test_stale_apply_after_delete_is_refused_and_changes_nothing(
    default_redis_url: str, namespace: str, client_for: Callable[[str], RedisClient]
) -> None:
    client = client_for(default_redis_url)
    scripts = Scripts(client, strict=True)
    await scripts.load()
    keys = Keys(namespace)
    await ensure_partitions(client, keys, PARTITIONS)
    publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=PARTITIONS)
    registry = ResourceRegistry.load([ROOT / "memories"])
    appender = Appender(MemoryStore(scripts, keys), keys, registry, PARTITIONS)
    leases_ = Leases(scripts, keys, APPENDER, int(LEASE_TTL_S * 1000))
    streams = PartitionStreams(client, scripts, keys, Group.APPENDER)
    ref = ref_of("conv-stale")
    p = partition_for(ref.memory_id, PARTITIONS)
    await ensure_groups(scripts, keys, p)
    reader = MemoryReader(client, scripts, keys)

    for i in range(3):
        await publisher.publish(append_event(ref.key, f"m{i}", f"stale:{i}"))
    old = await leases_.acquire(p, "old-worker")
    assert old is not None
    stale_batch = await streams.read(old, "old-worker", 100)
    assert len(stale_batch.entries) == 3  # read, not applied: then its lease lapses

    await client.pexpire(keys.lease(p, APPENDER), 1)
    new = await wait_for(
        lambda: leases_.acquire(p, "new-worker"), timeout=5, what="the lease to be free"
    )
    assert lease_fence(new.value) > lease_fence(old.value)
    claim = await streams.claim_all(new, "new-worker")
    assert claim.claimed == [e.id for e in stale_batch.entries]
    mine = await streams.read(new, "new-worker", 100)
    await appender.process(Batch(p, new, mine.entries))
    assert (await reader.read(ref)).count == 3
    await publisher.delete(ref)
    deletion = await streams.read(new, "new-worker", 100)
    await appender.process(Batch(p, new, deletion.entries))
    deleted = await reader.read(ref)
    assert not deleted.exists

    # An append published after the delete, that the stale holder tries to apply:
    # applied with its stale lease it would bring the memory back.
    receipt = (await publisher.publish(append_event(ref.key, "late", "stale:late"))).receipt
    raw = await client.xrange(keys.ingest(p), receipt.entry_id, receipt.entry_id)
    late = StreamEntry(raw[0][0], dict(raw[0][1]))

    before = await snapshot(client, namespace)
    for entries in (stale_batch.entries, [late], [*stale_batch.entries, late]):
        with pytest.raises(LeaseLostError):
            await appender.process(Batch(p, old, entries))
        assert await snapshot(client, namespace) == before, "a refused stale apply wrote"
    # Nor can it take entries: reads and claims are fenced too (rule 2).
    with pytest.raises(LeaseLostError):
        await streams.read(old, "old-worker", 100)
    with pytest.raises(LeaseLostError):
        await streams.claim_all(old, "old-worker")
    assert await snapshot(client, namespace) == before, "a refused stale read changed the group"
    after = await reader.read(ref)
    assert not after.exists and after.generation == deleted.generation

    # The probe was live: the leaseholder applying the same entry starts a new generation.
    await appender.process(Batch(p, new, [late]))
    revived = await reader.read(ref)
    assert revived.exists and [m.content for m in revived.messages] == ["late"]
    assert revived.generation > deleted.generation


async def apply_in_process(client: RedisClient, scripts: Scripts, keys: Keys) -> None:
    """Apply everything published, partition by partition, with the real appender."""
    registry = ResourceRegistry.load([ROOT / "memories"])
    appender = Appender(MemoryStore(scripts, keys), keys, registry, PARTITIONS)
    leases_ = Leases(scripts, keys, APPENDER, int(LEASE_TTL_S * 1000))
    streams = PartitionStreams(client, scripts, keys, Group.APPENDER)
    for p in range(PARTITIONS):
        await ensure_groups(scripts, keys, p)
        lease = await leases_.acquire(p, "checker")
        assert lease is not None
        while entries := (await streams.read(lease, "checker", 100)).entries:
            await appender.process(Batch(p, lease, entries))
        await leases_.release(lease)


async def test_exactness_check_catches_loss_duplication_and_disorder(
    default_redis_url: str, namespace: str, client_for: Callable[[str], RedisClient]
) -> None:
    """The harness's checks can fail: a correct run passes, each corruption is named."""
    producers, messages, memories = 2, 200, 5
    client = client_for(default_redis_url)
    scripts = Scripts(client, strict=True)
    await scripts.load()
    keys = Keys(namespace)
    publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=PARTITIONS)
    for producer in range(producers):
        for m in share(producer, producers, messages, memories):
            await publish_one(publisher, namespace, m)
    await apply_in_process(client, scripts, keys)
    assert await exactness_problems(client, keys, producers, messages, memories) == []
    await check_exact(default_redis_url, keys, producers, messages, memories)

    ref = ref_of("conv-0")
    p = partition_for(ref.memory_id, PARTITIONS)
    log = keys.memory(p, ref.memory_id).log
    members = await client.zrange(log, 0, -1, withscores=True)
    (first, a), (second, b) = members[0], members[2]  # both from producer 0

    async def problems() -> str:
        return "\n".join(await exactness_problems(client, keys, producers, messages, memories))

    await client.zrem(log, first)
    assert "conv-0 (partition" in await problems() and "lost 1: [(0, 0)]" in await problems()
    await client.zadd(log, {first: a})
    twin = first.replace(f'"seq":{int(a)},', '"seq":999999,')
    await client.zadd(log, {twin: 999999})
    assert "applied twice: [(0, 0)]" in await problems()
    await client.zrem(log, twin)
    await client.zadd(log, {first: b, second: a})
    found = await problems()
    assert "producer 0 out of order" in found and "not strictly increasing" in found
    await client.zadd(log, {first: a, second: b})
    assert await problems() == ""

    await client.xadd(keys.dlq(p), {"reason": "test"})
    with pytest.raises(AssertionError, match="dead letters"):
        await check_exact(default_redis_url, keys, producers, messages, memories)
    await client.delete(keys.dlq(p))
    await client.set(keys.held(p, APPENDER), "{}")
    with pytest.raises(AssertionError, match="held back"):
        await check_exact(default_redis_url, keys, producers, messages, memories)
    await client.delete(keys.held(p, APPENDER))
    await client.hincrby(keys.counters(p), "seq", 1)
    with pytest.raises(AssertionError, match="applied != published"):
        await check_exact(default_redis_url, keys, producers, messages, memories)
