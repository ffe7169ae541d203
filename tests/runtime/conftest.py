"""In-process workers for the runtime tests: real Redis, real scripts, short timings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from events import MessageAppended, Publisher
from events.envelope import AppendPayload, MemoryName
from memory import MemoryRef, Message, ResourceRegistry, Role, partition_for
from processors import Appender, LoopConfig, Worker, WorkerConfig
from processors.accountant import Accountant
from processors.cleanup import Cleanup
from processors.metrics import Metrics
from processors.port import Processor
from processors.summaries import SummaryWriter
from processors.summarizer import Summarizer
from processors.tokenizers import Tokenizers
from store import (
    Accounts,
    Flushes,
    Group,
    Keys,
    MemoryReader,
    MemoryStore,
    PartitionStreams,
    RedisClient,
    Retention,
    Scripts,
    ensure_partitions,
)
from store.lock import DistributedLock

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
TOKENIZERS = Tokenizers(threads=2)  # the accountant counts batches over two threads

FAST = WorkerConfig(
    lease_ttl_ms=2000,
    heartbeat_ms=200,
    loop=LoopConfig(
        batch_size=50,
        block_ms=200,
        max_attempts=3,
        trim_interval=0.2,
        exact_trim=True,
        backoff_max=0.1,
    ),
)


def user(text: str) -> Message:
    return Message(role=Role.USER, content=text)


def memory_in(
    partition: int, tag: str, partitions: int = PARTITIONS, resource: str = "customer-support"
) -> MemoryRef:
    """A memory of acme (of ``resource``) whose key starts with ``tag`` and that falls in
    ``partition`` of ``partitions``."""
    for i in range(10_000):
        ref = MemoryRef("acme", resource, f"{tag}{i}")
        if partition_for(ref.memory_id, partitions) == partition:
            return ref
    raise AssertionError(f"no key found for partition {partition} of {partitions}")


def appended(ref: MemoryRef, text: str) -> MessageAppended:
    """A user message appended to ``ref``."""
    name = MemoryName(resource=ref.resource, key=ref.key)
    return MessageAppended(
        tenant=ref.tenant, payload=AppendPayload(memory=name, message=user(text))
    )


@dataclass
class Rig:
    """A publisher, a reader and workers started on demand, all on one namespace."""

    client: RedisClient
    scripts: Scripts
    keys: Keys
    registry: ResourceRegistry
    publisher: Publisher
    reader: MemoryReader
    config: WorkerConfig = FAST
    metrics: Metrics = field(default_factory=Metrics)  # shared by every worker started
    running: dict[str, tuple[Worker, asyncio.Event, asyncio.Task[None]]] = field(
        default_factory=dict
    )

    def appender(self, **kwargs: object) -> Appender:
        return Appender(
            MemoryStore(self.scripts, self.keys, Retention()),
            self.keys,
            self.registry,
            PARTITIONS,
            **({"metrics": self.metrics} | kwargs),  # type: ignore[arg-type]
        )

    def accountant(self) -> Accountant:
        accounts = Accounts(self.client, self.scripts, self.keys)
        return Accountant(accounts, self.registry, TOKENIZERS, self.metrics)

    def summarizer(self, writer: SummaryWriter | None = None, **kwargs: float) -> Summarizer:
        return Summarizer(
            Flushes(self.scripts, self.keys),
            self.registry,
            TOKENIZERS,
            writer=writer,
            lock=DistributedLock(self.scripts, self.keys),
            **({"metrics": self.metrics} | kwargs),  # type: ignore[arg-type]
        )

    def start_all(self) -> None:
        """An appender, an accountant and a summarizer."""
        self.start("appender")
        self.start("accountant", self.accountant())
        self.start("summarizer", self.summarizer())

    def cleanup(self) -> Cleanup:
        streams = PartitionStreams(self.client, self.scripts, self.keys, Group.CLEANUP)
        return Cleanup(self.publisher, streams, self.registry, metrics=self.metrics)

    def start_cleanup(self, name: str = "cleanup") -> Worker:
        """The lifecycle stream's worker (one partition)."""
        return self.start(name, self.cleanup(), partitions=1)

    def start(
        self,
        name: str,
        processor: Processor | None = None,
        config: WorkerConfig | None = None,
        *,
        partitions: int = PARTITIONS,
    ) -> Worker:
        worker = Worker(
            self.client,
            self.scripts,
            self.keys,
            processor or self.appender(),
            partitions,
            config or self.config,
            worker_id=name,
            metrics=self.metrics,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        self.running[name] = (worker, stop, task)
        return worker

    async def stop(self, name: str) -> None:
        _, stop, task = self.running.pop(name)
        stop.set()
        await asyncio.wait_for(task, 10)

    async def cancel(self, name: str) -> None:
        """Cancel a worker's task (its loops still release their leases; the chaos tests
        kill real processes for crashes)."""
        _, _, task = self.running.pop(name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def stop_all(self) -> None:
        for name in list(self.running):
            await self.stop(name)

    async def eventually(
        self, check: Callable[[], object], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def contents(self, ref: MemoryRef) -> list[str]:
        view = await self.reader.read(ref)
        return [str(m.content) for m in view.messages]


@pytest.fixture
async def rig(client: RedisClient, scripts: Scripts, keys: Keys) -> AsyncIterator[Rig]:
    await ensure_partitions(client, keys, PARTITIONS)
    registry = ResourceRegistry.load([ROOT / "memories"])
    publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=PARTITIONS)
    r = Rig(client, scripts, keys, registry, publisher, MemoryReader(client, scripts, keys))
    yield r
    await r.stop_all()
