"""Redis outages are never an entry's fault: a worker that gave its partition up because
Redis could not be reached (paused longer than the lease TTL, again and again, while an
entry was in flight) charges that entry no attempt, and never dead-letters it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events import MessageAppended, Published, Publisher
from events.envelope import AppendPayload, MemoryName
from memory import Message, ResourceRegistry, Role
from processors import Appender, LoopConfig, Worker, WorkerConfig
from processors.port import Batch, Handled
from store import (
    Group,
    Keys,
    MemoryStore,
    RedisClient,
    RedisServerProcess,
    Retention,
    Scripts,
    connect,
    ensure_partitions,
)
from tests.conftest import own_server
from tests.runtime.conftest import ROOT

pytestmark = pytest.mark.chaos

TTL = 3.0
OUTAGES = 3


@dataclass
class OneEntry:
    """A server of its own holding one published entry, a worker's client with short
    deadlines and a probe client."""

    server: RedisServerProcess
    keys: Keys
    probe: RedisClient
    client: RedisClient
    scripts: Scripts
    publisher: Publisher
    published: Published
    registry: ResourceRegistry


@pytest.fixture
async def one(server_factory: list[RedisServerProcess], tmp_path: Path) -> AsyncIterator[OneEntry]:
    server = own_server(server_factory, tmp_path, appendonly=False)
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    probe = connect(server.url)
    client = connect(server.url, socket_timeout=TTL / 3, breaker_threshold=3, breaker_reset=0.7)
    scripts = Scripts(client)
    await scripts.load()
    await ensure_partitions(client, keys, 1)
    publisher = Publisher(probe, keys=keys, default_partitions=1)
    name = MemoryName(resource="customer-support", key="x")
    message = Message(role=Role.USER, content="an entry")
    published = await publisher.publish(
        MessageAppended(tenant="acme", payload=AppendPayload(memory=name, message=message))
    )
    registry = ResourceRegistry.load([ROOT / "memories"])
    yield OneEntry(server, keys, probe, client, scripts, publisher, published, registry)
    await client.aclose()
    await probe.aclose()


class Gated(Appender):
    """Holds every batch until the test lets it go, noting the attempts it sees."""

    def __init__(self, *args: object, probe: RedisClient, attempts: str) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.probe, self.attempts = probe, attempts
        self.seen: list[dict[str, str]] = []
        self.delivered = asyncio.Event()
        self.gate = asyncio.Event()

    async def process(self, batch: Batch) -> Handled:
        self.seen.append(await self.probe.hgetall(self.attempts))
        self.delivered.set()
        await self.gate.wait()
        return await super().process(batch)


@pytest.mark.timeout(180)
async def test_outages_longer_than_the_lease_charge_no_attempt(
    one: OneEntry,
) -> None:
    server, keys, probe, client, scripts = one.server, one.keys, one.probe, one.client, one.scripts
    publisher, published, registry = one.publisher, one.published, one.registry
    appender = Gated(
        MemoryStore(scripts, keys, Retention()),
        keys,
        registry,
        1,
        probe=probe,
        attempts=keys.attempts(0, Group.APPENDER.value),
    )
    config = WorkerConfig(
        lease_ttl_ms=int(TTL * 1000),
        heartbeat_ms=500,
        loop=LoopConfig(block_ms=200, backoff_max=0.5, max_attempts=OUTAGES),
    )
    worker = Worker(client, scripts, keys, appender, 1, config, worker_id="w1")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        for _ in range(OUTAGES):
            await asyncio.wait_for(appender.delivered.wait(), 30)  # in flight
            appender.delivered.clear()
            os.kill(server.pid, signal.SIGSTOP)
            await asyncio.sleep(TTL + 1.5)  # longer than the lease: the worker gives up
            os.kill(server.pid, signal.SIGCONT)
            appender.gate.set()
            await asyncio.sleep(0.1)
            appender.gate.clear()
        appender.gate.set()
        assert published.receipt is not None
        outcome = await publisher.wait_applied(published.receipt, timeout=30)
        assert outcome.ok, outcome
        assert len(appender.seen) > OUTAGES, appender.seen  # delivered again after each
        assert all(seen == {} for seen in appender.seen), appender.seen
        assert await probe.xlen(keys.dlq(0)) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class Blocking(Appender):
    """An entry whose processing blocks the event loop longer than the lease TTL (a
    pathological step): the partition is lost while Redis is fine, which is the entry's
    fault, so it must be charged and end in the dead letters (never retried forever as
    if Redis had failed)."""

    async def process(self, batch: Batch) -> Handled:
        time.sleep(TTL + 1)  # noqa: ASYNC251 (blocks the event loop, as a runaway step would)
        return await super().process(batch)


@pytest.mark.timeout(180)
async def test_an_entry_that_stalls_the_worker_is_charged_and_dead_lettered(
    one: OneEntry,
) -> None:
    keys, probe, client, scripts = one.keys, one.probe, one.client, one.scripts
    publisher, published, registry = one.publisher, one.published, one.registry
    appender = Blocking(MemoryStore(scripts, keys, Retention()), keys, registry, 1)
    config = WorkerConfig(
        lease_ttl_ms=int(TTL * 1000),
        heartbeat_ms=500,
        loop=LoopConfig(block_ms=200, backoff_max=0.5, max_attempts=2),
    )
    worker = Worker(client, scripts, keys, appender, 1, config, worker_id="w1")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        assert published.receipt is not None
        outcome = await publisher.wait_applied(published.receipt, timeout=120)
        assert outcome.reason == "attempts_exhausted", outcome
        assert await probe.xlen(keys.dlq(0)) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
