"""Chaos: the Redis server a worker and a producer use is paused (SIGSTOP: every call
hangs) or shut down and started again. Producers fail fast once the breaker is open and
recover by themselves; a worker gives its partitions up once their leases were not
renewed for the lease TTL, keeps what it was processing unacknowledged, and afterwards
every event is applied exactly once, in order."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from events import (
    MessageAppended,
    Publisher,
    PublishError,
    PublishOutcomeUnknownError,
    RedisUnavailableError,
)
from events.envelope import AppendPayload, MemoryName
from memory import MemoryRef, Message, ResourceRegistry, Role, partition_for
from processors import Appender, Batch, Handled, LoopConfig, Worker, WorkerConfig
from processors.metrics import Metrics
from store import (
    TRANSIENT_ERRORS,
    Group,
    Keys,
    MemoryReader,
    MemoryStore,
    RedisClient,
    RedisServerProcess,
    Retention,
    Scripts,
    breaker_of,
    connect,
    ensure_partitions,
)
from tests.conftest import own_server

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
TTL = 3.0
CONFIG = WorkerConfig(
    lease_ttl_ms=int(TTL * 1000),
    heartbeat_ms=500,
    loop=LoopConfig(block_ms=200, backoff_max=0.5, max_attempts=3, trim_interval=0.5),
)
REF = MemoryRef.parse("acme/customer-support/outage")


def event(text: str) -> MessageAppended:
    name = MemoryName(resource=REF.resource, key=REF.key)
    message = Message(role=Role.USER, content=text)
    return MessageAppended(tenant="acme", payload=AppendPayload(memory=name, message=message))


def client_for(server: RedisServerProcess) -> RedisClient:
    # The deadlines a worker with this lease TTL gets from its settings (a third of it).
    return connect(server.url, socket_timeout=TTL / 3, breaker_threshold=3, breaker_reset=1.0)


async def eventually(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check() if callable(check) else check
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Rig:
    def __init__(self, server: RedisServerProcess, keys: Keys) -> None:
        self.server = server
        self.keys = keys
        self.worker_client = client_for(server)
        self.producer_client = client_for(server)
        self.metrics = Metrics()
        breaker = breaker_of(self.worker_client)
        assert breaker is not None
        self.metrics.watch_circuit(breaker)
        self.stop = asyncio.Event()

    async def start(self, processor_of: type[Appender] = Appender) -> Worker:
        scripts = Scripts(self.worker_client, strict=True)
        await scripts.load()
        await ensure_partitions(self.worker_client, self.keys, PARTITIONS)
        registry = ResourceRegistry.load([ROOT / "memories"])
        store = MemoryStore(scripts, self.keys, Retention())
        self.appender = processor_of(store, self.keys, registry, PARTITIONS, metrics=self.metrics)
        self.reader = MemoryReader(self.producer_client, Scripts(self.producer_client), self.keys)
        self.publisher = Publisher(self.producer_client, keys=self.keys, default_partitions=4)
        worker = Worker(
            self.worker_client,
            scripts,
            self.keys,
            self.appender,
            PARTITIONS,
            CONFIG,
            "w1",
            self.metrics,
        )
        self.task = asyncio.create_task(worker.run(self.stop))
        await eventually(lambda: len(worker.owned) == PARTITIONS, 10, "every partition owned")
        return worker

    async def contents(self) -> list[str] | None:
        """The memory's messages (None while Redis cannot be read)."""
        try:
            view = await self.reader.read(REF)
        except TRANSIENT_ERRORS:
            return None
        return [str(m.content) for m in view.messages]

    async def close(self) -> None:
        self.stop.set()
        if hasattr(self, "task"):
            await asyncio.wait_for(self.task, 20)
        await self.worker_client.aclose()
        await self.producer_client.aclose()


async def publish_until_it_works(publisher: Publisher, text: str, within: float) -> float:
    started = time.monotonic()
    while True:
        try:
            await publisher.publish(event(text))
            return time.monotonic() - started
        except PublishError:
            assert time.monotonic() - started < within, "the publisher did not recover"
            await asyncio.sleep(0.05)


async def publish_while_hung(publisher: Publisher) -> list[str]:
    """Publish until the breaker fails a publish at once; the texts whose outcome was
    unknown (the ones before)."""
    # Producers: the first calls wait for their deadline (their outcome is unknown:
    # Redis may run them when it resumes), then the breaker fails them at once,
    # saying nothing was published.
    unknown: list[str] = []
    while True:
        text = f"during-{len(unknown)}"
        started = time.monotonic()
        with pytest.raises(PublishError) as failed:
            await publisher.publish(event(text))
        took = time.monotonic() - started
        if "circuit breaker" in str(failed.value):
            break
        assert isinstance(failed.value, PublishOutcomeUnknownError | RedisUnavailableError)
        unknown.append(text)
    assert isinstance(failed.value, RedisUnavailableError)
    assert took < 0.05, took  # the socket timeout is 1s
    print(f"fail-fast publish while open: {took * 1000:.1f}ms (socket timeout {TTL / 3:g}s)")
    return unknown


async def test_a_hung_redis_gives_partitions_up_within_the_lease_ttl_and_loses_nothing(
    server_factory: list[RedisServerProcess], tmp_path: Path, keys: Keys
) -> None:
    server = own_server(server_factory, tmp_path)
    rig = Rig(server, keys)
    paused = False
    try:
        worker = await rig.start()
        for i in range(10):
            await rig.publisher.publish(event(f"before-{i}"))
        await eventually(rig.contents, 10, "the first events applied")  # the worker is at work
        fences = {p: s.lease.fence for p, s in worker.owned.items()}
        states = list(worker.owned.values())

        server.kill(signal.SIGSTOP)  # every call now hangs until its deadline
        paused = True
        hung = time.monotonic()
        await eventually(lambda: all(s.lost for s in states), TTL + 2, "the partitions given up")
        given_up = time.monotonic() - hung
        print(f"\npartitions given up {given_up:.2f}s after Redis hung (lease TTL {TTL}s)")
        assert given_up <= TTL + 0.3  # never later than the lease TTL (plus scheduling)

        unknown = await publish_while_hung(rig.publisher)

        server.kill(signal.SIGCONT)
        paused = False
        recovered = await publish_until_it_works(rig.publisher, "after-0", within=10)
        print(f"publisher recovered {recovered:.2f}s after Redis answered again")
        assert recovered < 3.0  # the breaker's reset time (1s) and a trial
        for i in range(1, 5):
            await rig.publisher.publish(event(f"after-{i}"))
        before = [f"before-{i}" for i in range(10)]
        after = [f"after-{i}" for i in range(5)]
        await eventually(
            lambda: _ends_with(rig.contents(), after), 20, "every event applied after the hang"
        )
        found = await rig.contents()
        assert found is not None
        # Each event once, in order; of those published while Redis hung, only the ones
        # whose outcome was unknown, never the one refused as "nothing was published".
        assert found == before + [t for t in unknown if t in found] + after, found
        await eventually(lambda: len(worker.owned) == PARTITIONS, 10, "partitions owned again")
        assert all(worker.owned[p].lease.fence > fences[p] for p in fences)  # acquired anew
        p = partition_for(REF.memory_id, PARTITIONS)
        assert await rig.worker_client.hlen(keys.attempts(p, Group.APPENDER)) == 0
        scraped = generate_latest(rig.metrics.registry).decode()
        assert "memstream_circuit_opens_total{client=" in scraped
        assert "memstream_lease_losses_total" in scraped
    finally:
        if paused:
            server.kill(signal.SIGCONT)
        await rig.close()


async def _ends_with(contents: Awaitable[list[str] | None], tail: list[str]) -> bool:
    found = await contents
    return found is not None and found[-len(tail) :] == tail


async def _equal(contents: Awaitable[list[str] | None], expected: list[str]) -> bool:
    found = await contents
    return found == expected


class GatedAppender(Appender):
    """Holds its first batch until the test has shut Redis down."""

    taken = asyncio.Event()
    release = asyncio.Event()

    async def process(self, batch: Batch) -> Handled:
        if not GatedAppender.release.is_set():
            GatedAppender.taken.set()
            await GatedAppender.release.wait()
        return await super().process(batch)


async def test_a_worker_keeps_its_batch_through_an_outage_and_applies_it_once(
    server_factory: list[RedisServerProcess], tmp_path: Path, keys: Keys
) -> None:
    server = own_server(server_factory, tmp_path)  # append-only: it keeps its data
    GatedAppender.taken = asyncio.Event()
    GatedAppender.release = asyncio.Event()
    rig = Rig(server, keys)
    try:
        worker = await rig.start(GatedAppender)
        texts = [f"m{i}" for i in range(8)]
        await rig.publisher.publish_many([event(t) for t in texts])
        await asyncio.wait_for(GatedAppender.taken.wait(), 10)
        down = time.monotonic()
        server.stop()  # a clean shutdown: the batch's entries stay pending in its data
        GatedAppender.release.set()  # the batch now fails: Redis is unreachable
        await eventually(lambda: not worker.owned, TTL + 3, "the partitions given up")
        breaker = breaker_of(rig.worker_client)
        assert breaker is not None and breaker.opens >= 1
        server.start()
        print(f"\nRedis was down {time.monotonic() - down:.1f}s")
        await eventually(lambda: _equal(rig.contents(), texts), 20, "the batch applied once")
        p = partition_for(REF.memory_id, PARTITIONS)
        assert await rig.worker_client.hlen(keys.attempts(p, Group.APPENDER)) == 0
        assert await rig.worker_client.xlen(keys.dlq(p)) == 0
        assert await rig.contents() == texts  # and nothing more came later
    finally:
        GatedAppender.release.set()
        await rig.close()
