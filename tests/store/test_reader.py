"""The read side (store/reader.py, read_memory.lua): reading materialized memories and
waiting for published entries' outcomes, against real Redis 6.2, 7.x and a Cluster.
Memories are built by applying appender batches, as the appender does."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import pytest

from memory import MemoryRef, partition_for
from store import (
    ApplyBatch,
    Group,
    Keys,
    Lease,
    Leases,
    MemoryReader,
    MemoryStore,
    NotConfiguredError,
    OutcomeMismatchError,
    RedisClient,
    Scripts,
    Target,
    WaitTimeoutError,
    ensure_groups,
    ensure_partitions,
)

PARTITIONS = 4
REF = MemoryRef("acme", "customer-support", "k1")
TTL = 60_000


@dataclass
class World:
    client: RedisClient
    scripts: Scripts
    keys: Keys
    store: MemoryStore
    leases: Leases
    reader: MemoryReader
    held: dict[int, Lease]

    async def lease(self, p: int) -> Lease:
        if p not in self.held:
            await ensure_groups(self.scripts, self.keys, p)
            lease = await self.leases.acquire(p, "w1")
            assert lease is not None
            self.held[p] = lease
        return self.held[p]

    async def publish(self, ref: MemoryRef, n: int) -> tuple[int, list[str]]:
        """Put n raw entries in the memory's ingest stream and deliver them to w1."""
        p = partition_for(ref.memory_id, PARTITIONS)
        await self.lease(p)
        stream = self.keys.ingest(p)
        ids = [str(await self.client.xadd(stream, {"event": "{}"})) for _ in range(n)]
        await self.client.xreadgroup(Group.APPENDER.value, "w1", {stream: ">"}, count=n)
        return p, ids

    async def append(self, ref: MemoryRef, *texts: str) -> list[str]:
        p, ids = await self.publish(ref, len(texts))
        batch = ApplyBatch(self.keys, p)
        for entry_id, text in zip(ids, texts, strict=True):
            batch.append(target(ref, entry_id), msg(text))
        assert await self.store.apply(self.held[p], batch) == ["applied"] * len(texts)
        return ids

    async def command(self, ref: MemoryRef, kind: str) -> str:
        p, ids = await self.publish(ref, 1)
        batch = ApplyBatch(self.keys, p)
        batch.command(kind, target(ref, ids[0]))
        assert await self.store.apply(self.held[p], batch) == ["applied"]
        return ids[0]


def target(ref: MemoryRef, entry_id: str) -> Target:
    return Target(entry_id, ref.memory_id, TTL, f"ev-{entry_id}")


def msg(text: str) -> str:
    return json.dumps({"role": "user", "content": text, "metadata": {"i": text}})


@pytest.fixture
async def world(client: RedisClient, scripts: Scripts, keys: Keys) -> World:
    await ensure_partitions(client, keys, PARTITIONS)
    return World(
        client,
        scripts,
        keys,
        MemoryStore(scripts, keys),
        Leases(scripts, keys, Group.APPENDER.value, 10_000),
        MemoryReader(client, scripts, keys),
        {},
    )


def contents(view: object) -> list[str]:
    return [str(m.content) for m in view.messages]  # type: ignore[attr-defined]


# -- read -----------------------------------------------------------------------------


async def test_read_returns_the_whole_memory_oldest_first(world: World) -> None:
    ids = await world.append(REF, "a", "b", "c")
    view = await world.reader.read(REF)
    assert view.exists and view.ref == REF
    assert view.partition == partition_for(REF.memory_id, PARTITIONS)
    assert contents(view) == ["a", "b", "c"]
    assert [m.seq for m in view.messages] == [1, 2, 3]
    assert [m.entry for m in view.messages] == ids
    assert {m.gen for m in view.messages} == {view.generation} == {1}
    assert view.messages[0].metadata == {"i": "a"}
    assert view.count == 3
    assert view.watermark == ids[-1]
    assert view.created_ms is not None and view.updated_ms is not None
    assert view.created_ms <= view.updated_ms
    assert view.next_after == 3


async def test_read_last_returns_the_newest_n_oldest_first(world: World) -> None:
    await world.append(REF, *"abcde")
    assert contents(await world.reader.read(REF, last=2)) == ["d", "e"]
    assert contents(await world.reader.read(REF, last=1)) == ["e"]
    assert contents(await world.reader.read(REF, last=50)) == list("abcde")
    assert (await world.reader.read(REF, last=2)).count == 5


async def test_read_after_a_sequence_returns_at_most_limit_messages(world: World) -> None:
    await world.append(REF, *"abcdef")
    view = await world.reader.read(REF, after=2, limit=2)
    assert contents(view) == ["c", "d"]
    assert [m.seq for m in view.messages] == [3, 4]
    assert contents(await world.reader.read(REF, after=0, limit=100)) == list("abcdef")
    assert contents(await world.reader.read(REF, after=6)) == []


async def test_pagination_with_next_after_reads_every_message_once(world: World) -> None:
    texts = [f"m{i}" for i in range(11)]
    await world.append(REF, *texts)
    pages: list[list[str]] = []
    after = 0
    while True:
        view = await world.reader.read(REF, after=after, limit=3)
        if view.next_after is None:
            assert view.messages == []
            break
        pages.append(contents(view))
        assert view.next_after > after
        after = view.next_after
        assert len(pages) < 10, "pagination did not end"
    assert [len(p) for p in pages] == [3, 3, 3, 2]
    assert [t for page in pages for t in page] == texts


async def test_pagination_skips_sequences_of_other_memories(world: World) -> None:
    # Another memory of the same partition: its messages take sequences in between.
    p = partition_for(REF.memory_id, PARTITIONS)
    candidates = (MemoryRef("acme", "customer-support", f"o{i}") for i in range(100))
    other = next(r for r in candidates if partition_for(r.memory_id, PARTITIONS) == p)
    await world.append(REF, "a1")
    await world.append(other, "b1")
    await world.append(REF, "a2")
    first = await world.reader.read(REF, after=0, limit=1)
    assert contents(first) == ["a1"]
    second = await world.reader.read(REF, after=first.next_after, limit=1)
    assert contents(second) == ["a2"]
    assert [m.seq for m in second.messages] == [3]
    assert contents(await world.reader.read(other)) == ["b1"]


async def test_a_memory_that_does_not_exist_reads_empty(world: World) -> None:
    view = await world.reader.read(MemoryRef("acme", "customer-support", "nobody"))
    assert not view.exists
    assert view.messages == []
    assert (view.generation, view.count, view.watermark) == (0, 0, "0-0")
    assert view.created_ms is None and view.updated_ms is None
    assert view.next_after is None


async def test_a_deleted_memory_keeps_its_generation_and_watermark(world: World) -> None:
    await world.append(REF, "a", "b")
    before = await world.reader.read(REF)
    deleted = await world.command(REF, "delete")
    view = await world.reader.read(REF)
    assert not view.exists
    assert view.messages == [] and view.count == 0
    assert view.watermark == deleted
    assert view.generation > before.generation
    outcome = await world.reader.outcome(view.partition, deleted)
    assert outcome is not None and outcome.gen == view.generation
    # Re-creation starts yet another generation; sequences go on.
    await world.append(REF, "c")
    again = await world.reader.read(REF)
    assert again.exists and again.generation > view.generation
    assert [m.seq for m in again.messages] == [3]


async def test_a_cleared_memory_exists_empty_in_a_new_generation(world: World) -> None:
    await world.append(REF, "a")
    cleared = await world.command(REF, "clear")
    view = await world.reader.read(REF)
    assert view.exists and view.messages == [] and view.count == 0
    assert view.generation == 2 and view.watermark == cleared


async def test_a_memory_whose_meta_is_gone_is_no_memory(world: World) -> None:
    """The meta hash is what makes a memory: a log or token hash that outlived it (a key
    whose deadline was lost) is neither served nor written to by a read."""
    await world.append(REF, "a", "b")
    p = partition_for(REF.memory_id, PARTITIONS)
    k = world.keys.memory(p, REF.memory_id)
    await world.client.delete(k.meta)
    for kwargs in ({}, {"last": 1}, {"after": 0}, {"touch": True}):
        view = await world.reader.read(REF, **kwargs)  # type: ignore[arg-type]
        assert not view.exists, kwargs
        assert (view.messages, view.token_counts, view.count, view.tokens) == ([], [], 0, 0)
        assert view.generation == 1 and view.watermark != "0-0"  # the tombstone's
    assert await world.scripts("touch_messages", [k.tok, k.log, k.meta], [1, 2]) == 0
    fields = await world.client.hkeys(k.tok)
    assert not [f for f in fields if f.startswith(("a:", "f:"))], fields


async def test_memories_are_read_from_their_own_partition(world: World) -> None:
    refs = [MemoryRef("acme", "customer-support", f"key-{i}") for i in range(8)]
    assert len({partition_for(r.memory_id, PARTITIONS) for r in refs}) > 1
    for i, ref in enumerate(refs):
        await world.append(ref, f"text-{i}")
    for i, ref in enumerate(refs):
        view = await world.reader.read(ref)
        assert view.partition == partition_for(ref.memory_id, PARTITIONS)
        assert contents(view) == [f"text-{i}"]


async def test_read_refuses_contradictory_or_empty_windows(world: World) -> None:
    with pytest.raises(ValueError, match="either last or after"):
        await world.reader.read(REF, last=2, after=1)
    for kwargs in ({"last": 0}, {"last": -1}, {"after": 0, "limit": 0}):
        with pytest.raises(ValueError, match="positive"):
            await world.reader.read(REF, **kwargs)  # type: ignore[arg-type]


async def test_reading_without_a_partition_count_says_what_to_do(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    reader = MemoryReader(client, scripts, keys)
    with pytest.raises(NotConfiguredError, match="memstream run all"):
        await reader.read(REF)


# -- wait_applied ---------------------------------------------------------------------


async def test_wait_applied_returns_a_known_outcome_at_once(world: World) -> None:
    ids = await world.append(REF, "a")
    p = partition_for(REF.memory_id, PARTITIONS)
    outcome = await world.reader.wait_applied(p, ids[0], timeout=5)
    assert outcome.status == "applied" and outcome.ok
    assert outcome.seq == 1 and outcome.gen == 1
    assert outcome.event_id == f"ev-{ids[0]}"


async def test_wait_applied_returns_as_soon_as_the_outcome_is_recorded(world: World) -> None:
    p, ids = await world.publish(REF, 1)
    waiter = asyncio.create_task(world.reader.wait_applied(p, ids[0], timeout=30))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    started = time.monotonic()
    batch = ApplyBatch(world.keys, p)
    batch.append(target(REF, ids[0]), msg("late"))
    await world.store.apply(world.held[p], batch)
    outcome = await asyncio.wait_for(waiter, 10)
    assert time.monotonic() - started < 10
    assert outcome.status == "applied" and outcome.seq == 1


async def test_wait_applied_returns_a_refusal_with_its_reason(world: World) -> None:
    p, ids = await world.publish(REF, 1)
    batch = ApplyBatch(world.keys, p)
    batch.dead_letter(
        ids[0], reason="not_json", detail="the event field is not JSON", event="{", source="s"
    )
    await world.store.apply(world.held[p], batch)
    outcome = await world.reader.wait_applied(p, ids[0], timeout=5)
    assert outcome.status == "refused" and not outcome.ok
    assert outcome.reason == "not_json" and outcome.detail == "the event field is not JSON"
    assert outcome.dead_letter is not None


async def test_wait_applied_checks_the_outcome_belongs_to_the_event(world: World) -> None:
    ids = await world.append(REF, "a")
    p = partition_for(REF.memory_id, PARTITIONS)
    mine = await world.reader.wait_applied(p, ids[0], timeout=5, event_id=f"ev-{ids[0]}")
    assert mine.status == "applied"
    with pytest.raises(OutcomeMismatchError) as caught:
        await world.reader.wait_applied(p, ids[0], timeout=5, event_id="another-event")
    assert f"ev-{ids[0]}" in str(caught.value) and "another-event" in str(caught.value)
    assert caught.value.partition == p and caught.value.entry_id == ids[0]


async def test_wait_applied_times_out_with_the_held_back_reason(world: World) -> None:
    p, ids = await world.publish(REF, 1)
    reason = "schema version 3 is newer than this worker's 2: upgrade consumers first"
    held = {"entry": ids[0], "reason": reason, "worker": "w1", "at": 1}
    await world.client.set(world.keys.held(p, Group.APPENDER.value), json.dumps(held))
    with pytest.raises(WaitTimeoutError) as caught:
        await world.reader.wait_applied(p, ids[0], timeout=0.2)
    message = str(caught.value)
    assert "held back" in message and reason in message
    assert ids[0] in message
    assert caught.value.partition == p and caught.value.entry_id == ids[0]


async def test_wait_applied_times_out_without_a_reason_when_not_held(world: World) -> None:
    p, ids = await world.publish(REF, 1)
    other = (p + 1) % PARTITIONS
    await world.client.set(world.keys.held(other, Group.APPENDER.value), '{"reason": "x"}')
    with pytest.raises(WaitTimeoutError) as caught:
        await world.reader.wait_applied(p, ids[0], timeout=0.1)
    assert "held back" not in str(caught.value)
    assert "may still be applied" in str(caught.value)


async def test_wait_applied_never_hangs_past_its_timeout(world: World) -> None:
    p, ids = await world.publish(REF, 1)
    for timeout in (0.0, 0.3, 1.0):
        started = time.monotonic()
        with pytest.raises(WaitTimeoutError):
            await asyncio.wait_for(world.reader.wait_applied(p, ids[0], timeout=timeout), 10)
        elapsed = time.monotonic() - started
        assert timeout <= elapsed < timeout + 1.0
