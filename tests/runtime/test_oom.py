"""Redis out of memory (``maxmemory`` reached with ``maxmemory-policy noeviction``).

Publishing is refused whole, with an error saying Redis is out of memory and nothing
was published. The processors (appender, accountant, summarizer) apply nothing in part:
Redis refuses a script only at its first write, and each of their scripts either makes
no write before one that may be refused or cannot fail after it. They back off and
retry without counting attempts or dead-lettering anything, and once memory is
available again everything pending is applied exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import OutOfMemoryError

from events import (
    MessageAppended,
    Publisher,
    PublishError,
    RedisOutOfMemoryError,
    is_out_of_memory,
)
from events.envelope import AppendPayload, MemoryName
from memory import MemoryRef, Message, ResourceRegistry, Role, partition_for
from processors import Appender, Worker
from processors.port import Batch, Handled, Processor
from store import (
    Group,
    Keys,
    MemoryReader,
    MemoryStore,
    RedisClient,
    RedisServerProcess,
    Retention,
    Scripts,
    connect,
    ensure_partitions,
)
from tests.chaos.harness import unsettled
from tests.conftest import FLAVOURS, own_server
from tests.runtime.conftest import FAST, PARTITIONS, ROOT, Rig

MAXMEMORY = 32 * 1024 * 1024
TENANT = "acme"
RESOURCE_YAML = "resource: memory\nid: chat-fifo\nmax_tokens: 1500\nflushing:\n  type: fifo\n"
FILLER = " ".join(f"w{i}" for i in range(20))  # a message is about 50 tokens
MEMORIES = 4
GROUPS = (Group.APPENDER, Group.ACCOUNTANT, Group.SUMMARIZER)


@pytest.fixture(params=sorted(FLAVOURS))
async def capped(
    request: pytest.FixtureRequest, server_factory: list[RedisServerProcess], tmp_path: Path
) -> AsyncIterator[RedisClient]:
    """A server of its own with a small maxmemory and no eviction."""
    server = own_server(
        server_factory,
        tmp_path,
        str(request.param),
        appendonly=False,
        extra_args=["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"],
    )
    client = connect(server.url)
    yield client
    await client.aclose()


async def fill(client: RedisClient) -> None:
    """Fill Redis with ballast (another application's data, say) until it refuses
    writes, then keep it there: maxmemory just under what is used, so processors
    trimming their streams cannot end it by themselves."""
    i = 0
    for size in (100_000, 1_000):  # small writes: no large buffer to free later
        while True:
            try:
                await client.set(f"ballast:{i}", "x" * size)
            except OutOfMemoryError:
                break
            i += 1
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used - 4_000_000)
    await still_out_of_memory(client)


async def still_out_of_memory(client: RedisClient) -> None:
    with pytest.raises(OutOfMemoryError):
        await client.set("ballast:probe", "x")


async def relieve(client: RedisClient) -> None:
    await client.config_set("maxmemory", MAXMEMORY * 8)


async def oom_refusals(client: RedisClient) -> int:
    stats = await client.info("errorstats")
    return int(stats.get("errorstat_OOM", {}).get("count", 0))


def appended(ref: MemoryRef, text: str, key: str | None = None) -> MessageAppended:
    return MessageAppended(
        tenant=ref.tenant,
        idempotency_key=key,
        payload=AppendPayload(
            memory=MemoryName(resource=ref.resource, key=ref.key),
            message=Message(role=Role.USER, content=text),
        ),
    )


def refs_in_distinct_partitions(resource: str, n: int) -> list[MemoryRef]:
    refs: dict[int, MemoryRef] = {}
    i = 0
    while len(refs) < n:
        ref = MemoryRef(TENANT, resource, f"oom-{i}")
        refs.setdefault(partition_for(ref.memory_id, PARTITIONS), ref)
        i += 1
    return list(refs.values())


async def stream_lengths(client: RedisClient, keys: Keys) -> list[int]:
    return [int(await client.xlen(keys.ingest(p))) for p in range(PARTITIONS)]


async def test_publishing_while_redis_is_out_of_memory_publishes_nothing(
    capped: RedisClient, keys: Keys
) -> None:
    client = capped
    await ensure_partitions(client, keys, PARTITIONS)
    publisher = Publisher(client, keys=keys, default_partitions=PARTITIONS)
    refs = refs_in_distinct_partitions("customer-support", 3)
    await publisher.publish_many([appended(ref, "before") for ref in refs])  # groups ready
    one_partition = [appended(refs[0], f"m{i}", f"one:{i}") for i in range(10)]
    several = [appended(ref, f"m{i}", f"several:{i}") for i, ref in enumerate(refs * 3)]
    before = await stream_lengths(client, keys)
    await fill(client)

    for batch in (one_partition, several):
        with pytest.raises(PublishError) as refused:
            await publisher.publish_many(batch)
        assert is_out_of_memory(str(refused.value)), str(refused.value)
        assert "nothing was published" in str(refused.value)
        assert await stream_lengths(client, keys) == before, "part of a batch was published"

    await relieve(client)
    for batch in (one_partition, several):
        assert len(await publisher.publish_many(batch)) == len(batch)
    assert sum(await stream_lengths(client, keys)) == sum(before) + 10 + 9


async def test_publishing_while_redis_is_out_of_memory_raises_redis_out_of_memory_error(
    capped: RedisClient, keys: Keys
) -> None:
    client = capped
    await ensure_partitions(client, keys, PARTITIONS)
    ready = Publisher(client, keys=keys, default_partitions=PARTITIONS)
    ref = refs_in_distinct_partitions("customer-support", 1)[0]
    await ready.publish(appended(ref, "before"))
    await fill(client)
    # A publisher whose groups exist, and a new one (it creates them first).
    for publisher in (ready, Publisher(client, keys=keys, default_partitions=PARTITIONS)):
        with pytest.raises(RedisOutOfMemoryError, match=r"out of memory.*nothing was published"):
            await publisher.publish(appended(ref, "refused"))


class Gated:
    """A processor that waits for its gate to open before each batch (so a test can
    let entries wait, read but not processed, for Redis to run out of memory)."""

    def __init__(self, inner: Processor) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()

    @property
    def group(self) -> Group:
        return self.inner.group

    async def process(self, batch: Batch) -> Handled:
        await self.gate.wait()
        return await self.inner.process(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # letter, in_flight, drop


@dataclass
class MemoryState:
    count: int
    last_seq: int
    tokens: int
    counted: int
    removed: int
    flushes: int


async def state_of(client: RedisClient, keys: Keys, ref: MemoryRef) -> MemoryState:
    p = partition_for(ref.memory_id, PARTITIONS)
    fields = ("count", "last_seq", "tokens", "counted", "removed:fifo", "flushes")
    values = await client.hmget(keys.memory(p, ref.memory_id).meta, fields)
    return MemoryState(*(int(v or 0) for v in values))


async def attempts_and_letters(client: RedisClient, keys: Keys) -> dict[str, int]:
    found: dict[str, int] = {}
    for p in range(PARTITIONS):
        for group in GROUPS:
            n = int(await client.hlen(keys.attempts(p, group)))
            if n:
                found[f"attempts {group.value} {p}"] = n
        letters = int(await client.xlen(keys.dlq(p)))
        if letters:
            found[f"dlq {p}"] = letters
    return found


def sample(rig: Rig, name: str, processor: str) -> float:
    value = rig.metrics.registry.get_sample_value(name, {"processor": processor})
    return value or 0.0


@dataclass
class Stage:
    """A rig whose processors wait at their gates, and what was published to which
    memories."""

    rig: Rig
    gates: dict[Group, Gated]
    refs: list[MemoryRef]
    published: dict[str, int]

    async def publish(self, per_memory: int, *, wait: bool) -> None:
        for ref in self.refs:
            first = self.published[ref.key]
            events = [
                appended(ref, f"{i} {FILLER}", f"{ref.key}:{i}")
                for i in range(first, first + per_memory)
            ]
            await self.rig.publisher.publish_many(events, wait=wait, timeout=20)
            self.published[ref.key] += per_memory


async def staged(client: RedisClient, keys: Keys, folder: Path) -> Stage:
    """An appender, an accountant and a summarizer holding every partition, with work
    waiting for each: flush requests for the summarizer, change events for the
    accountant, ingest entries for the appender, each held at its gate."""
    scripts = Scripts(client, strict=True)
    await scripts.load()
    await ensure_partitions(client, keys, PARTITIONS)
    (folder / "chat-fifo.yaml").write_text(RESOURCE_YAML)
    registry = ResourceRegistry.load([ROOT / "memories", folder / "chat-fifo.yaml"])
    publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=PARTITIONS)
    rig = Rig(client, scripts, keys, registry, publisher, MemoryReader(client, scripts, keys))
    gates = {
        Group.APPENDER: Gated(rig.appender()),
        Group.ACCOUNTANT: Gated(rig.accountant()),
        Group.SUMMARIZER: Gated(rig.summarizer()),
    }
    refs = refs_in_distinct_partitions("chat-fifo", MEMORIES)
    stage = Stage(rig, gates, refs, {ref.key: 0 for ref in refs})
    workers = [rig.start(group.value, gated) for group, gated in gates.items()]
    await rig.eventually(
        lambda: all(len(w.owned) == PARTITIONS for w in workers),
        what="every partition leased in every group",
    )
    gates[Group.SUMMARIZER].gate.clear()
    await stage.publish(30, wait=True)  # over the threshold: the accountant asks for flushes

    async def flushes_requested() -> bool:
        lengths = [await client.xlen(keys.flush(p)) for p in range(PARTITIONS)]
        return sum(lengths) >= MEMORIES

    await rig.eventually(flushes_requested, what="a flush request for every memory")
    gates[Group.ACCOUNTANT].gate.clear()
    await stage.publish(10, wait=True)
    gates[Group.APPENDER].gate.clear()
    await stage.publish(10, wait=False)
    return stage


async def all_settled(client: RedisClient, keys: Keys) -> bool:
    for group in GROUPS:
        if await unsettled(client, keys, group.value):
            return False
    return True


async def test_processors_under_oom_apply_nothing_in_part_and_resume_exactly_once(
    capped: RedisClient, keys: Keys, tmp_path: Path
) -> None:
    client = capped
    stage = await staged(client, keys, tmp_path)
    rig = stage.rig
    try:
        before = {ref.key: await state_of(client, keys, ref) for ref in stage.refs}
        workers = {g: rig.running[g.value][0] for g in GROUPS}
        leased = {g: {p: s.lease.value for p, s in w.owned.items()} for g, w in workers.items()}
        refused_before = await oom_refusals(client)
        retries = {g: sample(rig, "memstream_retries_total", g.value) for g in GROUPS}

        await fill(client)
        for gated in stage.gates.values():
            gated.gate.set()
        await asyncio.sleep(3.0)
        await still_out_of_memory(client)

        assert await oom_refusals(client) > refused_before, "Redis refused nothing"
        for group, worker in workers.items():
            assert not rig.running[group.value][2].done(), f"{group.value} stopped under OOM"
            now = {p: s.lease.value for p, s in worker.owned.items()}
            assert now == leased[group], f"{group.value} lost leases under OOM"
            retried = sample(rig, "memstream_retries_total", group.value) - retries[group]
            assert retried >= 2, f"the {group.value} worker did not retry under OOM"
            assert sample(rig, "memstream_failed_attempts_total", group.value) == 0
        for ref in stage.refs:  # nothing applied, counted or flushed, not even in part
            assert await state_of(client, keys, ref) == before[ref.key], ref.key
        assert await attempts_and_letters(client, keys) == {}

        await relieve(client)
        await rig.eventually(
            lambda: all_settled(client, keys), timeout=30, what="everything pending settled"
        )
    finally:
        await rig.stop_all()

    assert await attempts_and_letters(client, keys) == {}
    seqs = 0
    for p in range(PARTITIONS):
        seqs += int(await client.hget(keys.counters(p), "seq") or 0)
    assert seqs == sum(stage.published.values()), "an append was applied twice or not at all"
    for ref in stage.refs:
        published = stage.published[ref.key]
        state = await state_of(client, keys, ref)
        view = await rig.reader.read(ref)
        numbers = [int(str(m.content).split(" ", 1)[0]) for m in view.messages]
        assert numbers == list(range(published - len(numbers), published)), ref.key
        assert state.count + state.removed == published, (ref.key, state)
        assert state.flushes > before[ref.key].flushes, f"{ref.key} was not flushed after OOM"
        assert state.counted == state.count, (ref.key, state)


async def test_a_worker_started_while_redis_is_out_of_memory_waits_and_joins(
    capped: RedisClient,
) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    scripts = Scripts(capped, strict=True)
    await scripts.load()
    await ensure_partitions(capped, keys, PARTITIONS)
    await fill(capped)
    registry = ResourceRegistry.load([ROOT / "memories"])
    appender = Appender(MemoryStore(scripts, keys, Retention()), keys, registry, PARTITIONS)
    worker = Worker(capped, scripts, keys, appender, PARTITIONS, FAST, worker_id="late")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.sleep(1.5)
        assert not task.done(), "the worker must wait for Redis, not exit"
        assert await capped.zcard(keys.members(Group.APPENDER.value)) == 0
        await relieve(capped)
        for _ in range(100):
            if len(worker.owned) == PARTITIONS:
                break
            await asyncio.sleep(0.1)
        assert len(worker.owned) == PARTITIONS
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
