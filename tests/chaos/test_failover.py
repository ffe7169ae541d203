"""Chaos: Redis Cluster failover (3 masters, one replica each) while producers publish
and appender workers run.

A graceful ``CLUSTER FAILOVER`` on a replica loses nothing: the master stops taking
writes, the replica catches up, then takes over, so every acknowledged publish is
applied exactly once and in order. A master killed with SIGKILL loses what it
acknowledged but had not yet sent to its replica; with durable publishes
(``Publisher(durable=1)``, Redis WAIT) nothing acknowledged is lost. Either way the
system converges: the workers follow the new master (MOVED) by themselves, nothing is
applied twice, every memory stays in order, and what is lost is only missing. A batch
applied on the old master but not replicated is pending again on the new one (the
apply script's effects and its XACK replicate together) and is applied there once."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import redis

from events import (
    NotDurableError,
    Publisher,
    PublishOutcomeUnknownError,
    RedisUnavailableError,
)
from memory import Message, Role, partition_for
from store import TRANSIENT_ERRORS, Keys, MemoryReader, RedisClient, Scripts, connect
from tests.chaos.harness import (
    PARTITIONS,
    Fleet,
    all_leased_by,
    applied_appends,
    check_exact,
    dead_letters,
    held_back,
    unsettled,
    wait_for,
    wait_settled,
)
from tests.chaos.producer import Planned, memory_key, ref_of, share
from tests.servers import Cluster, NodeRole

pytestmark = [pytest.mark.chaos, pytest.mark.cluster]

PRODUCERS, MESSAGES, MEMORIES = 3, 1_500, 48
RATE = 100.0  # messages/s over all producers: about 15 s of publishing
RETRY_FOR = 60.0


@dataclass
class Producers:
    """Producers in this process, so the test knows which publishes were acknowledged
    when the master died. Each publishes its share one at a time and retries, with the
    same idempotency key, a publish that is not known to be published (or, durable, not
    known to be on a replica)."""

    url: str
    keys: Keys
    run: str
    durable: int = 0
    acked: dict[int, list[int]] = field(default_factory=dict)  # producer -> seqs, in order
    tasks: list[asyncio.Task[int]] = field(default_factory=list)
    not_durable: int = 0

    def start(self) -> None:
        for producer in range(PRODUCERS):
            self.acked[producer] = []
            self.tasks.append(asyncio.create_task(self._produce(producer)))

    async def _produce(self, producer: int) -> int:
        client = connect(self.url)
        retries = 0
        try:
            publisher = Publisher(
                client,
                keys=self.keys,
                default_partitions=PARTITIONS,
                durable=self.durable,
                durable_timeout=0.5,
            )
            for m in share(producer, PRODUCERS, MESSAGES, MEMORIES):
                await asyncio.sleep(PRODUCERS / RATE)
                retries += await self._publish(publisher, m)
                self.acked[producer].append(m.seq)
        finally:
            await client.aclose()
        return retries

    async def _publish(self, publisher: Publisher, m: Planned) -> int:
        retries = 0
        deadline = time.monotonic() + RETRY_FOR
        message = Message(
            role=Role.USER, content=m.content, metadata={"producer": m.producer, "seq": m.seq}
        )
        while True:
            try:
                await publisher.append(
                    ref_of(m.key), message, idempotency_key=m.idempotency_key(self.run)
                )
                return retries
            except (PublishOutcomeUnknownError, RedisUnavailableError, NotDurableError) as e:
                if time.monotonic() > deadline:
                    raise
                print(f"retrying {m.idempotency_key(self.run)}: {type(e).__name__}: {e}")
                if isinstance(e, NotDurableError):
                    self.not_durable += 1
                retries += 1
                await asyncio.sleep(min(0.5, 0.05 * retries))

    @property
    def publishing(self) -> bool:
        return any(not t.done() for t in self.tasks)

    def snapshot(self) -> dict[int, list[int]]:
        return {p: list(seqs) for p, seqs in self.acked.items()}

    async def wait(self, timeout: float) -> int:
        done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} producers still publishing after {timeout:g}s"
        return sum(t.result() for t in done)


def owner_port(client: RedisClient, keys: Keys, p: int) -> int:
    node = client.get_node_from_key(keys.ingest(p))  # type: ignore[union-attr]
    assert node is not None
    return int(node.port)


def pick_master(cluster: Cluster, client: RedisClient, keys: Keys) -> tuple[NodeRole, list[int]]:
    """The master that owns partition 0's ingest stream, and the partitions it owns."""
    port = owner_port(client, keys, 0)
    master = next(m for m in cluster.masters_now() if m.port == port)
    return master, [p for p in range(PARTITIONS) if owner_port(client, keys, p) == port]


async def promoted(cluster: Cluster, port: int) -> bool:
    """The node on ``port`` is a master serving slots, as the cluster sees it."""
    try:
        roles = await asyncio.to_thread(cluster.roles)
    except RuntimeError:
        return False
    return any(r.port == port and r.master and r.slots and not r.failed for r in roles)


async def progressed(client: RedisClient, keys: Keys, n: int) -> bool:
    return await applied_appends(client, keys) >= n


async def start_run(
    cluster: Cluster, fleets: Callable[[str], Fleet], durable: int
) -> tuple[Fleet, RedisClient, Producers, list[int]]:
    """Two appender workers holding every partition, producers publishing, and 30% of
    the messages applied."""
    await asyncio.to_thread(cluster.wait_healthy, 60)
    fleet = fleets(cluster.url)
    client = connect(cluster.url)
    workers = [fleet.start_worker("appender") for _ in range(2)]
    pids = [w.pid for w in workers]
    await wait_for(
        functools.partial(all_leased_by, client, fleet.keys, pids),
        timeout=45,
        what="the workers to lease every partition",
    )
    producers = Producers(cluster.url, fleet.keys, fleet.run, durable=durable)
    producers.start()
    await wait_for(
        lambda: progressed(client, fleet.keys, MESSAGES * 3 // 10),
        timeout=60,
        what="30% applied",
    )
    return fleet, client, producers, pids


async def settle(fleet: Fleet, client: RedisClient, producers: Producers, pids: list[int]) -> int:
    """Producers done, every entry settled, the same workers alive and leasing."""
    retries = await producers.wait(timeout=90)

    async def settled() -> bool:
        try:
            return not await unsettled(client, fleet.keys)
        except TRANSIENT_ERRORS:  # a node the test's client knew changed roles
            return False

    await wait_for(settled, timeout=60, what="every ingest entry to be settled")
    await wait_settled(client, fleet.keys, timeout=10)
    assert all(w.alive for w in fleet.workers), [(w.name, w.returncode) for w in fleet.workers]
    assert await all_leased_by(client, fleet.keys, pids), "a partition is not leased"
    return retries


@pytest.mark.timeout(240)
async def test_a_graceful_cluster_failover_loses_nothing_and_workers_follow_the_new_master(
    replicated_cluster: Cluster, fleets: Callable[[str], Fleet]
) -> None:
    started = time.monotonic()
    cluster = replicated_cluster
    fleet, client, producers, pids = await start_run(cluster, fleets, durable=0)
    try:
        master, owned = pick_master(cluster, client, fleet.keys)
        replica = cluster.replicas_of(master)[0]
        with redis.Redis(port=replica.port, decode_responses=True) as node:
            assert node.execute_command("CLUSTER", "FAILOVER") in ("OK", True)
        assert producers.publishing, "the failover must happen while producers publish"
        switched_at = time.monotonic()
        await wait_for(
            functools.partial(promoted, cluster, replica.port),
            timeout=30,
            what=f"the replica on {replica.port} to take over",
        )
        took = time.monotonic() - switched_at
        applied_then = await applied_appends(client, fleet.keys)
        await wait_for(
            lambda: progressed(client, fleet.keys, applied_then + 50),
            timeout=60,
            what="applies to go on after the failover",
        )
        retries = await settle(fleet, client, producers, pids)
        # Every partition the old master held is now on the new one.
        assert {owner_port(client, fleet.keys, p) for p in owned} == {replica.port}
        await check_exact(cluster.url, fleet.keys, PRODUCERS, MESSAGES, MEMORIES)
    finally:
        await client.aclose()
    await asyncio.to_thread(cluster.wait_healthy, 60)
    print(
        f"\ngraceful CLUSTER FAILOVER of {master.port} (partitions {owned}) to "
        f"{replica.port} in {took:.1f}s: 0 of {MESSAGES} acknowledged publishes lost, "
        f"{retries} publishes retried; {time.monotonic() - started:.1f}s"
    )


async def applied_pairs(client: RedisClient, keys: Keys) -> tuple[list[tuple[int, int]], list[str]]:
    """Every applied (producer, seq), and what is wrong beyond lost messages."""
    reader = MemoryReader(client, Scripts(client), keys)
    pairs: list[tuple[int, int]] = []
    problems: list[str] = []
    for i in range(MEMORIES):
        key = memory_key(i)
        view = await reader.read(ref_of(key))
        got = [(int(m.metadata["producer"]), int(m.metadata["seq"])) for m in view.messages]
        pairs.extend(got)
        twice = sorted(pair for pair, n in Counter(got).items() if n > 1)
        if twice:
            problems.append(f"{key}: applied twice: {twice[:10]}")
        for producer in range(PRODUCERS):
            order = [s for p, s in got if p == producer]
            if order != sorted(order):
                problems.append(f"{key}: producer {producer} out of order: {order}")
        seqs = [m.seq for m in view.messages]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            problems.append(f"{key}: sequences not increasing: {seqs}")
        entries = [tuple(map(int, m.entry.split("-"))) for m in view.messages]
        if any(b <= a for a, b in itertools.pairwise(entries)):
            problems.append(f"{key}: not applied in stream order")
        if view.count != len(view.messages):
            problems.append(f"{key}: meta count {view.count} != {len(view.messages)} messages")
    return pairs, problems


@pytest.mark.timeout(240)
@pytest.mark.parametrize("durable", [0, 1], ids=["plain", "durable"])
async def test_a_killed_master_loses_only_unreplicated_publishes_and_none_when_durable(
    durable: int, replicated_cluster: Cluster, fleets: Callable[[str], Fleet]
) -> None:
    started = time.monotonic()
    cluster = replicated_cluster
    fleet, client, producers, pids = await start_run(cluster, fleets, durable=durable)
    keys = fleet.keys
    try:
        master, owned = pick_master(cluster, client, keys)
        replica = cluster.replicas_of(master)[0]
        server = cluster.node(master.port)
        acked_before = producers.snapshot()
        server.kill()
        killed_at = time.monotonic()
        assert producers.publishing, "the master must die while producers publish"
        await wait_for(
            functools.partial(promoted, cluster, replica.port),
            timeout=45,
            what=f"the replica on {replica.port} to be promoted",
        )
        took = time.monotonic() - killed_at
        # The old master comes back (empty) as a replica of the new one; durable
        # publishes to its partitions wait for it.
        server.start()
        await asyncio.to_thread(cluster.wait_healthy, 60)
        await client.aclose()
        client = connect(cluster.url)  # the old client's connections were closed
        retries = await settle(fleet, client, producers, pids)
        assert {owner_port(client, keys, p) for p in owned} == {replica.port}

        pairs, problems = await applied_pairs(client, keys)
        assert not problems, f"{len(problems)} memories are wrong:\n" + "\n".join(problems[:30])
        applied = set(pairs)
        assert len(applied) == len(pairs) == await applied_appends(client, keys), "applied twice"
        acked = producers.snapshot()
        assert sum(map(len, acked.values())) == MESSAGES
        lost: dict[int, list[int]] = {}
        for producer, seqs in acked.items():
            missing = [s for s in seqs if (producer, s) not in applied]
            before = acked_before[producer]
            # Only publishes to the killed master's partitions, acknowledged before the
            # kill, may be gone, and of those only the last ones (replication is in order).
            to_killed = [s for s in before if ref_partition(producer, s) in owned]
            assert set(missing) <= set(to_killed), (
                f"producer {producer} lost {missing}, not all sent to the killed master "
                f"before it died"
            )
            assert missing == to_killed[len(to_killed) - len(missing) :], (
                f"producer {producer} lost {missing}: not the last of its publishes to the "
                f"killed master"
            )
            lost[producer] = missing
        assert await dead_letters(client, keys) == {}
        assert await held_back(client, keys) == {}
        total = sum(map(len, lost.values()))
        if durable:
            assert total == 0, f"durable publishes acknowledged and lost: {lost}"
            await check_exact(cluster.url, keys, PRODUCERS, MESSAGES, MEMORIES)
    finally:
        await client.aclose()
    await asyncio.to_thread(cluster.wait_healthy, 60)
    print(
        f"\nSIGKILL of master {master.port} (partitions {owned}), durable={durable}: "
        f"{total} of {sum(map(len, acked_before.values()))} publishes acknowledged before "
        f"the kill lost ({ {p: len(s) for p, s in lost.items()} }); replica {replica.port} "
        f"promoted {took:.1f}s after the kill; {retries} publishes retried "
        f"({producers.not_durable} not confirmed by a replica in time); "
        f"{time.monotonic() - started:.1f}s"
    )


def ref_partition(producer: int, seq: int) -> int:
    """The partition of the memory that message (producer, seq) goes to."""
    g = seq * PRODUCERS + producer
    return partition_for(ref_of(memory_key(g % MEMORIES)).memory_id, PARTITIONS)
