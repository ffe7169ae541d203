"""A thousand callers of one process publishing and waiting for their outcomes at once,
against a running appender: every call completes, the callers' circuit breaker never
opens (a client with all its connections busy is not Redis being down), and waiting
costs round trips per tick of the client's one outcome poller, not per waiter."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from events import Publisher
from memory import MemoryRef
from store import CircuitState, Keys, OutcomeStatus, RedisClient, breaker_of, connect
from store.poller import poller_of
from tests.roundtrips import OutcomeReads
from tests.runtime.conftest import PARTITIONS, Rig, appended

CALLERS = 1000
MEMORIES = 50


@dataclass
class Callers:
    client: RedisClient
    publisher: Publisher
    reads: OutcomeReads
    transitions: list[CircuitState] = field(default_factory=list)


@pytest.fixture
async def callers(
    rig: Rig, redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callers]:
    """A client of their own for the callers (as another process would have), whose
    outcome reads are counted and whose breaker transitions are recorded."""
    client = connect(redis_url)
    breaker = breaker_of(client)
    assert breaker is not None
    reads = OutcomeReads(f"{keys.namespace}:out:")
    reads.install(client, monkeypatch)
    publisher = Publisher(client, keys=keys, scripts=rig.scripts, default_partitions=PARTITIONS)
    found = Callers(client, publisher, reads)
    breaker.add_listener(found.transitions.append)
    yield found
    await client.aclose()


def ref(i: int) -> MemoryRef:
    return MemoryRef("acme", "customer-support", f"crowd-{i % MEMORIES}")


@pytest.mark.timeout(300)
async def test_a_thousand_concurrent_waits_complete_without_opening_the_breaker(
    rig: Rig, callers: Callers
) -> None:
    rig.start("appender")
    go = asyncio.Event()

    async def call(i: int) -> Any:
        await go.wait()
        return await callers.publisher.publish(appended(ref(i), f"c{i}"), wait=True, timeout=120)

    tasks = [asyncio.create_task(call(i)) for i in range(CALLERS)]
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    errors = Counter(f"{type(r).__name__}: {r}"[:200] for r in results if isinstance(r, Exception))
    assert not errors, errors.most_common(3)
    assert all(r.outcome is not None for r in results)
    assert Counter(r.outcome.status for r in results) == {OutcomeStatus.APPLIED: CALLERS}
    for m in range(MEMORIES):
        held = await rig.contents(ref(m))
        assert sorted(held) == sorted(f"c{i}" for i in range(m, CALLERS, MEMORIES))

    breaker = breaker_of(callers.client)
    assert breaker is not None
    assert breaker.state is CircuitState.CLOSED and breaker.opens == 0
    assert callers.transitions == []  # not even for a moment

    # Waiting took the poller's ticks, not a poll per waiter: every outcome read that
    # left the client was one of its round trips, and they were far fewer than the
    # waiters (polling per waiter takes at least one round trip each).
    poller = poller_of(callers.client)
    reads = callers.reads
    assert reads.round_trips == poller.round_trips
    assert reads.entries == poller.asked
    assert poller.ticks <= reads.round_trips <= poller.ticks * 3  # a Cluster: one per master
    assert reads.round_trips < CALLERS / 2, (reads.round_trips, poller.counters())
    assert reads.most > 1  # one round trip asked for many waiters' entries
