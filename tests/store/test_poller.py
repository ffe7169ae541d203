"""The outcome poller (store/poller.py): every caller of one client that waits for
outcomes is served by one poller, which asks for all of them in one round trip a tick,
against real Redis 6.2, 7.x and a Cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from memory import MemoryRef, partition_for
from store import (
    ApplyBatch,
    Group,
    Keys,
    Lease,
    Leases,
    MemoryReader,
    MemoryStore,
    Outcome,
    RedisClient,
    RedisServerProcess,
    Scripts,
    Target,
    WaitTimeoutError,
    connect,
    ensure_groups,
    ensure_partitions,
)
from store.acl import producer_rules, setuser
from store.poller import OutcomePoller, poller_of
from tests.conftest import own_server
from tests.roundtrips import OutcomeReads

PARTITIONS = 4
WAITERS = 200


class Entries:
    """Raw ingest entries delivered to a leaseholder, and their application."""

    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self.store = MemoryStore(scripts, keys)
        self.leases = Leases(scripts, keys, Group.APPENDER.value, 60_000)
        self.scripts = scripts
        self.held: dict[int, Lease] = {}
        self.refs: dict[str, MemoryRef] = {}

    async def publish(self, n: int) -> list[tuple[int, str]]:
        """n entries over every partition: (partition, entry id) each."""
        await ensure_partitions(self.client, self.keys, PARTITIONS)
        published = []
        for i in range(n):
            ref = MemoryRef("acme", "customer-support", f"poll{i % 20}")
            p = partition_for(ref.memory_id, PARTITIONS)
            if p not in self.held:
                await ensure_groups(self.scripts, self.keys, p)
                lease = await self.leases.acquire(p, "w1")
                assert lease is not None
                self.held[p] = lease
            entry_id = str(await self.client.xadd(self.keys.ingest(p), {"event": "{}"}))
            await self.client.xreadgroup(
                Group.APPENDER.value, "w1", {self.keys.ingest(p): ">"}, count=1
            )
            self.refs[entry_id] = ref
            published.append((p, entry_id))
        return published

    async def apply(self, entries: list[tuple[int, str]]) -> None:
        for p in sorted({p for p, _ in entries}):
            batch = ApplyBatch(self.keys, p)
            for q, entry_id in entries:
                if q == p:
                    text = json.dumps({"role": "user", "content": entry_id})
                    batch.append(
                        Target(entry_id, self.refs[entry_id].memory_id, 60_000, f"ev-{entry_id}"),
                        text,
                    )
            await self.store.apply(self.held[p], batch)


@pytest.fixture
def entries(client: RedisClient, scripts: Scripts, keys: Keys) -> Entries:
    return Entries(client, scripts, keys)


@pytest.fixture
def reads(client: RedisClient, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> OutcomeReads:
    counted = OutcomeReads(f"{keys.namespace}:out:")
    counted.install(client, monkeypatch)
    return counted


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_every_waiter_of_a_client_is_asked_for_in_one_round_trip_a_tick(
    client: RedisClient, scripts: Scripts, keys: Keys, entries: Entries, reads: OutcomeReads
) -> None:
    published = await entries.publish(WAITERS)
    # A reader each, as callers with their own publisher would have: one poller serves
    # them all, because they share the client.
    waits = [
        asyncio.create_task(
            MemoryReader(client, scripts, keys).wait_applied(p, e, 60, event_id=f"ev-{e}")
        )
        for p, e in published
    ]
    poller = poller_of(client)
    await until(lambda: poller.ticks >= 3, "three ticks")
    assert poller.asked == poller.ticks * WAITERS  # each tick asks for every waiter
    assert not any(w.done() for w in waits)

    await entries.apply(published)
    outcomes = await asyncio.wait_for(asyncio.gather(*waits), 30)
    assert [o.event_id for o in outcomes] == [f"ev-{e}" for _, e in published]
    assert all(o.status == "applied" for o in outcomes)
    await until(lambda: poller.idle, "the poller to stop once nobody waits")
    assert poller.pending == 0
    # What left the client: the poller's round trips, one a tick (a Cluster: one per
    # master), and nothing per waiter.
    assert (reads.round_trips, reads.entries) == (poller.round_trips, poller.asked)
    assert poller.ticks <= reads.round_trips <= poller.ticks * 3
    assert reads.round_trips < WAITERS


async def test_on_one_server_the_apply_step_rings_the_waiters_doorbell(
    client: RedisClient, scripts: Scripts, keys: Keys, entries: Entries
) -> None:
    """One server: between ticks the poller blocks on the partitions' changes and dead
    letter streams, which the apply step writes anyway; blocks run out while nothing
    is applied, and the apply ends one. A Cluster polls instead."""
    ((p, e),) = await entries.publish(1)
    waiter = asyncio.create_task(MemoryReader(client, scripts, keys).wait_applied(p, e, 60))
    poller = poller_of(client)
    await until(lambda: poller.ticks >= 3, "three ticks")
    assert poller.rung == 0  # nothing was written: every block ran out
    await entries.apply([(p, e)])
    outcome = await asyncio.wait_for(waiter, 30)
    assert outcome.status == "applied"
    assert poller.rung == (0 if isinstance(client, RedisCluster) else 1)


async def test_an_outcome_that_rings_no_doorbell_is_found_all_the_same(
    client: RedisClient, scripts: Scripts, keys: Keys, entries: Entries
) -> None:
    """Some outcomes are recorded without a write to changes or dead letters (a
    duplicate, an erased entry): the block runs out and the next tick finds them."""
    ((p, e),) = await entries.publish(1)
    waiter = asyncio.create_task(MemoryReader(client, scripts, keys).wait_applied(p, e, 60))
    poller = poller_of(client)
    await until(lambda: poller.ticks >= 1, "a tick")
    duplicate = {"status": "duplicate", "reason": "idempotency_key", "event": f"ev-{e}"}
    await client.hset(keys.outcomes(p, e), e, json.dumps(duplicate))
    outcome = await asyncio.wait_for(waiter, 30)
    assert (outcome.status, outcome.reason) == ("duplicate", "idempotency_key")
    assert poller.rung == 0


async def test_a_waiter_that_gives_up_is_no_longer_asked_for(
    client: RedisClient, scripts: Scripts, keys: Keys, entries: Entries, reads: OutcomeReads
) -> None:
    (gone, (p, kept)) = await entries.publish(2)
    reader = MemoryReader(client, scripts, keys)
    waiter = asyncio.create_task(reader.wait_applied(p, kept, 60))
    with pytest.raises(WaitTimeoutError):
        await reader.wait_applied(*gone, timeout=0.2)
    poller = poller_of(client)
    ticks = poller.ticks
    await until(lambda: poller.ticks > ticks, "a tick after the timeout")
    assert reads.last == 1  # the kept entry only
    await entries.apply([(p, kept)])
    outcome = await asyncio.wait_for(waiter, 30)
    assert outcome.status == "applied"


async def test_two_waits_for_one_entry_both_get_its_outcome(
    client: RedisClient, scripts: Scripts, keys: Keys, entries: Entries
) -> None:
    ((p, e),) = await entries.publish(1)
    reader = MemoryReader(client, scripts, keys)
    both = asyncio.gather(reader.wait_applied(p, e, 60), reader.wait_applied(p, e, 60))
    poller = poller_of(client)
    await until(lambda: poller.ticks >= 1, "a tick")
    await entries.apply([(p, e)])
    first, second = await asyncio.wait_for(both, 30)
    assert first == second and isinstance(first, Outcome) and first.seq == 1


async def test_an_outcome_known_at_the_deadline_is_returned(
    client: RedisClient, scripts: Scripts, keys: Keys, entries: Entries
) -> None:
    ((p, e),) = await entries.publish(1)
    await entries.apply([(p, e)])
    outcome = await MemoryReader(client, scripts, keys).wait_applied(p, e, timeout=0)
    assert outcome.status == "applied"


async def test_a_tick_that_fails_fails_the_waits_it_asked_for(
    server_factory: list[RedisServerProcess], tmp_path: Path, keys: Keys
) -> None:
    """Redis gone while callers wait: they get the error at once, not a timeout later
    (as when each caller polled on its own)."""
    server = own_server(server_factory, tmp_path)
    client = connect(server.url, socket_timeout=2.0)
    try:
        scripts = Scripts(client, strict=True)
        await scripts.load()
        published = await Entries(client, scripts, keys).publish(3)
        reader = MemoryReader(client, scripts, keys)
        waits = [asyncio.create_task(reader.wait_applied(p, e, 60)) for p, e in published]
        poller = poller_of(client)
        await until(lambda: poller.ticks >= 1, "a tick")
        server.kill()
        done = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 20)
        assert all(isinstance(r, RedisConnectionError) for r in done), done
        await until(lambda: poller.idle, "the poller to stop")
    finally:
        await client.aclose()


async def test_a_user_that_may_not_read_the_doorbells_waits_by_polling(
    server_factory: list[RedisServerProcess], tmp_path: Path, keys: Keys
) -> None:
    """The producer user of `memstream acl` may not read the changes and dead letter
    streams (every tenant's): its waits poll, and still get their outcomes."""
    server = own_server(server_factory, tmp_path)
    admin = connect(server.url)
    producer = connect(f"redis://producer:pw@127.0.0.1:{server.port}")
    try:
        await admin.execute_command(*setuser("producer", "pw", producer_rules(keys.namespace)))
        scripts = Scripts(admin, strict=True)
        await scripts.load()
        entries = Entries(admin, scripts, keys)
        published = await entries.publish(2)
        reader = MemoryReader(producer, Scripts(producer), keys)
        waits = [asyncio.create_task(reader.wait_applied(p, e, 60)) for p, e in published]
        poller = poller_of(producer)
        await until(lambda: poller.ticks >= 2, "two ticks")
        await entries.apply(published)
        outcomes = await asyncio.wait_for(asyncio.gather(*waits), 30)
        assert [o.status for o in outcomes] == ["applied", "applied"]
        assert poller.rung == 0 and not poller.doorbells
    finally:
        await producer.aclose()
        await admin.aclose()


async def test_a_poller_belongs_to_one_client_and_one_event_loop(client: RedisClient) -> None:
    poller = poller_of(client)
    assert poller_of(client) is poller
    other = connect("redis://127.0.0.1:1")
    try:
        assert poller_of(other) is not poller
        assert isinstance(poller_of(other), OutcomePoller)
    finally:
        await other.aclose()
