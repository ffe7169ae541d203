"""apply_counts.lua (store/accounting.py), the accountant's fenced step, against real
Redis 6.2, 7.x and a Cluster: a message's count is set once, only while that message
is in the memory's generation the count was made for; the memory's total moves by
exactly the counts set; the change entries are acknowledged; a stale holder changes
nothing."""

from __future__ import annotations

import json

import pytest

from memory import MemoryRef, partition_for
from store import (
    Accounts,
    ApplyBatch,
    Group,
    Keys,
    Lease,
    LeaseLostError,
    Leases,
    MemoryCounts,
    MemoryReader,
    MemoryStore,
    RedisClient,
    Scripts,
    Target,
    ensure_groups,
    ensure_partitions,
)

PARTITIONS = 4
REF = MemoryRef("acme", "customer-support", "counts-1")
P = partition_for(REF.memory_id, PARTITIONS)


class Memory:
    """One memory written through the appender's script, counted through the
    accountant's."""

    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys) -> None:
        self.client, self.scripts, self.keys = client, scripts, keys
        self.accounts = Accounts(client, scripts, keys)
        self.reader = MemoryReader(client, scripts, keys)
        self.appender: Lease | None = None
        self.accountant: Lease | None = None
        self.ops = 0

    async def start(self) -> None:
        await ensure_partitions(self.client, self.keys, PARTITIONS)
        await ensure_groups(self.scripts, self.keys, P)
        for group in (Group.APPENDER, Group.ACCOUNTANT):
            held = await Leases(self.scripts, self.keys, group.value, 10_000).acquire(P, "w1")
            assert held is not None
            if group is Group.APPENDER:
                self.appender = held
            else:
                self.accountant = held

    async def write(self, *ops: tuple[str, object]) -> None:
        """Apply appends (text), erases (seq) and clears (None) in one appender batch."""
        ingest = self.keys.ingest(P)
        ids = [str(await self.client.xadd(ingest, {"event": "{}"})) for _ in ops]
        await self.client.xreadgroup(Group.APPENDER.value, "w1", {ingest: ">"}, count=len(ids))
        batch = ApplyBatch(self.keys, P)
        for entry_id, (kind, arg) in zip(ids, ops, strict=True):
            self.ops += 1
            target = Target(entry_id, REF.memory_id, 600_000, f"ev-{self.ops}")
            if kind == "append":
                batch.append(target, json.dumps({"role": "user", "content": arg}))
            elif kind == "erase":
                assert isinstance(arg, int)
                batch.erase(target, arg)
            else:
                batch.command("clear", target)
        assert self.appender is not None
        await MemoryStore(self.scripts, self.keys).apply(self.appender, batch)

    async def changes(self, count: int) -> list[str]:
        """``count`` change entries delivered to the accountant (pending until applied)."""
        stream = self.keys.changes(P)
        await self.client.delete(stream)  # the appender's own change events are not used
        await ensure_groups(self.scripts, self.keys, P)
        ids = [str(await self.client.xadd(stream, {"type": "test"})) for _ in range(count)]
        await self.client.xreadgroup(Group.ACCOUNTANT.value, "w1", {stream: ">"}, count=count)
        return ids

    async def count(
        self, gen: int, counts: list[tuple[int, int]], lease: Lease | None = None
    ) -> tuple[int, int]:
        mem = MemoryCounts(REF.memory_id, gen, counts, token_limit=100_000, request="r1")
        held = lease or self.accountant
        assert held is not None
        return await self.accounts.apply(held, [mem], await self.changes(1))

    async def state(self) -> tuple[dict[int, int | None], int, int]:
        """Each message's stored count, the total and how many are counted."""
        view = await self.reader.read(REF)
        counts = {m.seq: c for m, c in zip(view.messages, view.token_counts, strict=True)}
        return counts, view.tokens, view.counted


@pytest.fixture
async def memory(client: RedisClient, scripts: Scripts, keys: Keys) -> Memory:
    m = Memory(client, scripts, keys)
    await m.start()
    return m


async def test_a_count_is_set_once_and_the_total_moves_by_exactly_the_counts_set(
    memory: Memory,
) -> None:
    await memory.write(("append", "a"), ("append", "b"), ("append", "c"))
    view = await memory.reader.read(REF)
    s1, s2, s3 = (m.seq for m in view.messages)
    assert await memory.count(view.generation, [(s1, 10), (s2, 20)]) == (2, 0)
    assert await memory.state() == ({s1: 10, s2: 20, s3: None}, 30, 2)
    # Counted again (a redelivered batch, another holder's recount): nothing moves but
    # the one message not counted yet.
    assert await memory.count(view.generation, [(s1, 99), (s2, 99), (s3, 7)]) == (1, 0)
    assert await memory.state() == ({s1: 10, s2: 20, s3: 7}, 37, 3)


async def test_a_count_for_a_message_gone_or_of_another_generation_is_not_set(
    memory: Memory,
) -> None:
    await memory.write(("append", "a"), ("append", "b"))
    view = await memory.reader.read(REF)
    s1, s2 = (m.seq for m in view.messages)
    await memory.write(("erase", s1))
    assert await memory.count(view.generation, [(s1, 10), (s2, 20), (s2 + 50, 5)]) == (1, 0)
    assert await memory.state() == ({s2: 20}, 20, 1)
    await memory.write(("clear", None), ("append", "after the clear"))
    cleared = await memory.reader.read(REF)
    (s3,) = (m.seq for m in cleared.messages)
    assert await memory.count(view.generation, [(s3, 5)]) == (0, 0)
    assert await memory.state() == ({s3: None}, 0, 0)
    assert await memory.count(cleared.generation, [(s3, 5)]) == (1, 0)
    assert await memory.state() == ({s3: 5}, 5, 1)


async def test_the_change_entries_are_acknowledged_with_the_counts(memory: Memory) -> None:
    await memory.write(("append", "a"))
    view = await memory.reader.read(REF)
    await memory.count(view.generation, [(view.messages[0].seq, 3)])
    pending = await memory.client.xpending(memory.keys.changes(P), Group.ACCOUNTANT.value)
    assert pending["pending"] == 0


async def test_a_stale_holder_counts_nothing(memory: Memory) -> None:
    await memory.write(("append", "a"))
    view = await memory.reader.read(REF)
    assert memory.accountant is not None
    held = memory.accountant
    # The value an earlier holder held: same worker name, an older fence.
    stale = Lease(P, held.group, f"{held.fence - 1}:{held.value.split(':', 1)[1]}")
    with pytest.raises(LeaseLostError):
        await memory.count(view.generation, [(view.messages[0].seq, 3)], lease=stale)
    assert await memory.state() == ({view.messages[0].seq: None}, 0, 0)
    pending = await memory.client.xpending(memory.keys.changes(P), Group.ACCOUNTANT.value)
    assert pending["pending"] == 1
