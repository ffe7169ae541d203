"""Context reads that follow the window (read_context.lua) and the index of protected
messages that apply_counts.lua keeps for them, against real Redis 6.2, 7.x and a
Cluster. Memories are built with the appender's script and counted with the
accountant's, as the processors do; every window is compared with what the budget rules
(``memory.flush.fit_budget``) give over the whole memory."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest

from memory import MemoryRef, MemoryResource, Message, ResourceRegistry, Role, partition_for
from memory.flush import Counted, Priorities, fit_budget
from memory.resource import KeywordPriority, Priority
from memory.tokens import TokenCounter
from store import (
    Accounts,
    ApplyBatch,
    ContextWindow,
    Group,
    Keys,
    Lease,
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
from tests.conftest import ROOT

PARTITIONS = 4
TTL = 60_000
COUNTER = TokenCounter(encoder=lambda text: len(text.split()), name="words")
CHUNK = 1000  # messages per appender batch while building


def resource_with(priority: Priority) -> MemoryResource:
    base = ResourceRegistry.load([ROOT / "memories"])["customer-support"]
    return base.model_copy(update={"priority": priority})


# "urgent" protects (100 >= protected); "refund" only raises the priority.
RULES = Priority(
    keywords=[
        KeywordPriority(pattern="(?i)urgent", priority=100),
        KeywordPriority(pattern="(?i)refund", priority=90),
    ]
)
RESOURCE = resource_with(RULES)


@dataclass
class Memories:
    client: RedisClient
    scripts: Scripts
    keys: Keys
    reader: MemoryReader
    accounts: Accounts
    leases: dict[str, Leases]
    held: dict[tuple[str, int], Lease]

    async def lease(self, group: Group, p: int) -> Lease:
        if (group.value, p) not in self.held:
            await ensure_groups(self.scripts, self.keys, p)
            lease = await self.leases[group.value].acquire(p, "w1")
            assert lease is not None
            self.held[(group.value, p)] = lease
        return self.held[(group.value, p)]

    async def append(self, ref: MemoryRef, messages: list[Message]) -> None:
        """Apply the messages with the appender's script, CHUNK per batch."""
        p = partition_for(ref.memory_id, PARTITIONS)
        lease = await self.lease(Group.APPENDER, p)
        stream = self.keys.ingest(p)
        store = MemoryStore(self.scripts, self.keys)
        for i in range(0, len(messages), CHUNK):
            part = messages[i : i + CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for _ in part:
                pipe.xadd(stream, {"event": "{}"})
            ids = [str(x) for x in await pipe.execute()]
            await self.client.xreadgroup(Group.APPENDER.value, "w1", {stream: ">"}, count=len(ids))
            batch = ApplyBatch(self.keys, p)
            for entry_id, m in zip(ids, part, strict=True):
                text = json.dumps(m.to_json_dict(), separators=(",", ":"))
                batch.append(Target(entry_id, ref.memory_id, TTL, f"ev-{entry_id}"), text)
            assert await store.apply(lease, batch) == ["applied"] * len(part)

    async def count(
        self,
        ref: MemoryRef,
        resource: MemoryResource = RESOURCE,
        *,
        leave: set[int] | None = None,
        rebuild: bool = False,
    ) -> None:
        """Count every message (but ``leave``) as the accountant does: with the index of
        the messages ``resource``'s rules protect (rebuilt from every message with
        ``rebuild``)."""
        p = partition_for(ref.memory_id, PARTITIONS)
        view = await self.reader.read(ref)
        priorities = Priorities(resource.priority)
        todo = [m for m in view.messages if m.seq not in (leave or set())]
        counts = MemoryCounts(
            memory_id=ref.memory_id,
            gen=view.generation,
            counts=[(m.seq, COUNTER.message(m)) for m in todo],
            threshold=1.0,
            request="r",
            rules=priorities.fingerprint,
            protected=[m.seq for m in todo if priorities.is_protected(m)],
            rebuild=[m.seq for m in view.messages if priorities.is_protected(m)]
            if rebuild
            else None,
        )
        await self.accounts.apply(await self.lease(Group.ACCOUNTANT, p), [counts], [])

    async def expected(
        self, ref: MemoryRef, budget: int, resource: MemoryResource = RESOURCE
    ) -> tuple[list[int], int, bool]:
        """The budget rules over the whole memory: sequences, tokens, over budget."""
        view = await self.reader.read(ref)
        entries = [
            Counted(m, c if c is not None else COUNTER.message(m))
            for m, c in zip(view.messages, view.token_counts, strict=True)
        ]
        chosen, over = fit_budget(entries, budget, Priorities(resource.priority))
        return [e.seq for e in chosen], sum(e.tokens for e in chosen), over

    async def context(
        self, ref: MemoryRef, budget: int, resource: MemoryResource = RESOURCE, touch: bool = False
    ) -> ContextWindow:
        window = await self.reader.read_context(ref, resource, COUNTER, budget=budget, touch=touch)
        assert window.tokens <= budget
        assert (
            [m.seq for m in window.messages],
            window.tokens,
            window.over_budget,
        ) == await self.expected(ref, budget, resource)
        return window

    def memory_keys(self, ref: MemoryRef) -> tuple[str, str]:
        k = self.keys.memory(partition_for(ref.memory_id, PARTITIONS), ref.memory_id)
        return k.tok, k.log


@pytest.fixture
async def memories(client: RedisClient, scripts: Scripts, keys: Keys) -> Memories:
    await ensure_partitions(client, keys, PARTITIONS)
    return Memories(
        client,
        scripts,
        keys,
        MemoryReader(client, scripts, keys),
        Accounts(client, scripts, keys),
        {
            g.value: Leases(scripts, keys, g.value, 10_000)
            for g in (Group.APPENDER, Group.ACCOUNTANT)
        },
        {},
    )


def say(i: int, words: int = 10) -> Message:
    role = Role.USER if i % 2 == 0 else Role.ASSISTANT
    return Message(role=role, content=f"message {i} " + "lorem ipsum " * (words // 2))


SYSTEM = Message(role=Role.SYSTEM, content="You are the support agent of Acme.")


# -- the window ---------------------------------------------------------------------


async def test_the_read_follows_the_window_not_the_memory(memories: Memories) -> None:
    small = MemoryRef("acme", "customer-support", "small")
    large = MemoryRef("acme", "customer-support", "large")
    for ref, n in ((small, 500), (large, 10_000)):
        # The same newest messages, a system message (protected) first.
        await memories.append(ref, [SYSTEM, *(say(i) for i in range(n - 1, 0, -1))])
        await memories.count(ref)
    a = await memories.context(small, 300)
    b = await memories.context(large, 300)
    assert [str(m.content) for m in a.messages] == [str(m.content) for m in b.messages]
    assert a.messages[0].role is Role.SYSTEM and a.tokens == b.tokens
    each, system = COUNTER.message(say(1)), COUNTER.message(SYSTEM)
    assert len(a.messages) == 1 + (300 - system) // each  # the system message, the newest
    # The script read as many messages of both (the window, rounded up to its page, and
    # the system message from the index), of about as many bytes (sequences and entry
    # ids of other lengths): a few dozen, not the memory.
    assert a.read == b.read <= len(a.messages) + 4
    assert a.read_bytes is not None and b.read_bytes is not None
    assert a.read_bytes * 0.95 <= b.read_bytes <= a.read_bytes * 1.05
    assert b.view.count == 10_000 and len(b.view.messages) == len(b.messages)


async def test_protected_messages_older_than_the_window_come_from_the_index(
    memories: Memories,
) -> None:
    ref = MemoryRef("acme", "customer-support", "old-protected")
    old = [
        SYSTEM,
        Message(role=Role.USER, content="this is URGENT: the parcel is lost"),
        Message(role=Role.USER, content="a refund please", priority=120),
        Message(role=Role.SYSTEM, content="not protected after all", priority=10),
        Message(role=Role.USER, content="I want a refund"),  # 90: not protected
    ]
    await memories.append(ref, [*old, *(say(i) for i in range(200))])
    await memories.count(ref)
    window = await memories.context(ref, 100)
    kept = [str(m.content) for m in window.messages[:3]]
    assert kept == [str(m.content) for m in old[:3]]
    assert all("message" in str(m.content) for m in window.messages[3:])
    # The window and the three protected ones: the index is read, not the memory.
    assert window.read < 20


async def test_protected_messages_alone_over_the_budget_are_the_newest_that_fit(
    memories: Memories,
) -> None:
    ref = MemoryRef("acme", "customer-support", "over")
    rules = [Message(role=Role.SYSTEM, content="rule " + "be kind " * n) for n in (4, 20, 3, 6)]
    await memories.append(ref, [rules[0], say(1), rules[1], say(2), rules[2], rules[3], say(3)])
    await memories.count(ref)
    budget = COUNTER.message(rules[3]) + COUNTER.message(rules[0]) + 1
    window = await memories.context(ref, budget)
    assert window.over_budget
    # Newest first, each that still fits: rules 3 and 2; then 1 and 0 no longer fit.
    assert [str(m.content) for m in window.messages] == [str(r.content) for r in rules[2:]]


async def test_a_newer_message_left_out_is_never_skipped_past(memories: Memories) -> None:
    ref = MemoryRef("acme", "customer-support", "no-gaps")
    await memories.append(ref, [say(1, 2), say(2, 2), say(3, 60), say(4, 2)])
    await memories.count(ref)
    window = await memories.context(ref, 3 * COUNTER.message(say(4, 2)))
    assert [str(m.content) for m in window.messages] == [str(say(4, 2).content)]


async def test_messages_not_counted_yet_are_counted_by_the_reader(memories: Memories) -> None:
    ref = MemoryRef("acme", "customer-support", "uncounted")
    await memories.append(ref, [SYSTEM, *(say(i) for i in range(100))])
    await memories.count(ref)
    late = [
        Message(role=Role.USER, content="URGENT: " + "call me back " * 40),
        *(say(i, words=30) for i in range(100, 110)),
    ]
    await memories.append(ref, late)  # the accountant has not counted these yet
    window = await memories.context(ref, 200)
    # The protected message not counted yet is older than the window: it was read.
    assert str(window.messages[1].content).startswith("URGENT")
    assert window.read < 40
    await memories.count(ref)  # caught up: the script chooses, the same window
    assert [m.seq for m in (await memories.context(ref, 200)).messages] == [
        m.seq for m in window.messages
    ]


async def test_a_memory_indexed_under_other_rules_is_read_whole(memories: Memories) -> None:
    ref = MemoryRef("acme", "customer-support", "other-rules")
    await memories.append(
        ref,
        [SYSTEM, Message(role=Role.USER, content="a refund, now"), *(say(i) for i in range(60))],
    )
    await memories.count(ref)
    stricter = resource_with(
        Priority(keywords=[KeywordPriority(pattern="(?i)refund", priority=100)])
    )
    window = await memories.context(ref, 60, stricter)
    assert window.read == 62  # no index of these rules: every message
    assert str(window.messages[1].content) == "a refund, now"
    # The accountant rebuilds the index under the new rules: the window again.
    await memories.append(ref, [say(60)])
    await memories.count(ref, stricter, rebuild=True)
    window = await memories.context(ref, 60, stricter)
    assert window.read < 20 and str(window.messages[1].content) == "a refund, now"


async def test_a_summary_at_an_indexed_sequence_is_not_protected(memories: Memories) -> None:
    ref = MemoryRef("acme", "customer-support", "summary-at-seq")
    await memories.append(ref, [SYSTEM, *(say(i) for i in range(40))])
    view = await memories.reader.read(ref)
    folded = view.messages[1]
    await memories.count(ref)
    # A summary took the sequence of a message that other rules protected (listed).
    tok, log = memories.memory_keys(ref)
    listed = str(await memories.client.hget(tok, "prot:seqs"))
    await memories.client.hset(tok, "prot:seqs", f"{listed}{folded.seq},")
    summary = json.loads(str((await memories.client.zrangebyscore(log, folded.seq, folded.seq))[0]))
    summary.update(content="what came before", covers=[folded.seq])
    await memories.client.zremrangebyscore(log, folded.seq, folded.seq)
    await memories.client.zadd(log, {json.dumps(summary, separators=(",", ":")): folded.seq})
    window = await memories.context(ref, 40)
    assert folded.seq not in [m.seq for m in window.messages]


async def test_windows_match_the_budget_rules(memories: Memories) -> None:
    """Random memories, counted in part or whole, random budgets: the window is always
    what the rules give over the whole memory, whichever side chose it."""
    rng = random.Random(20240601)
    for case in range(24):
        ref = MemoryRef("acme", "customer-support", f"random-{case}")
        messages = []
        for i in range(rng.randint(1, 90)):
            roll = rng.random()
            role = Role.SYSTEM if roll < 0.06 else Role.USER if i % 2 else Role.ASSISTANT
            words = rng.choice([1, 2, 5, 5, 5, 30])
            text = " ".join(
                rng.choice(["urgent", "refund", "word", "parcel"]) for _ in range(words)
            )
            text = text if rng.random() < 0.1 else text.replace("urgent", "late")
            priority = rng.choice([None] * 18 + [10, 100])
            messages.append(Message(role=role, content=text, priority=priority))
        await memories.append(ref, messages)
        view = await memories.reader.read(ref)
        seqs = [m.seq for m in view.messages]
        mode = case % 3  # all counted; the newest left; any left
        leave = (
            set()
            if mode == 0
            else set(seqs[-rng.randint(1, 5) :])
            if mode == 1
            else set(rng.sample(seqs, rng.randint(1, len(seqs))))
        )
        await memories.count(ref, leave=leave)
        total = sum(COUNTER.message(m) for m in view.messages)
        for budget in {1, rng.randint(1, total), rng.randint(1, total), total, total + 5}:
            await memories.context(ref, budget)


async def test_a_context_read_records_the_use_of_what_the_script_chose(
    memories: Memories,
) -> None:
    ref = MemoryRef("acme", "customer-support", "touched")
    await memories.append(ref, [SYSTEM, *(say(i) for i in range(30))])
    await memories.count(ref)
    window = await memories.context(ref, 50, touch=True)
    await memories.context(ref, 50, touch=True)
    tok, _ = memories.memory_keys(ref)
    fields = await memories.client.hgetall(tok)
    used = {int(name[2:]): int(v) for name, v in fields.items() if name.startswith("f:")}
    assert used == {m.seq: 2 for m in window.messages}
    assert {int(n[2:]) for n in fields if n.startswith("a:")} == set(used)


# -- the index (apply_counts.lua) -------------------------------------------------------


async def test_the_index_lists_the_counted_messages_the_rules_protect(
    memories: Memories,
) -> None:
    ref = MemoryRef("acme", "customer-support", "indexed")
    tok, _ = memories.memory_keys(ref)
    fingerprint = Priorities(RULES).fingerprint
    await memories.append(ref, [SYSTEM, say(1), Message(role=Role.USER, content="urgent!")])
    await memories.count(ref, leave={3})
    assert await memories.client.hmget(tok, ["prot", "prot:seqs"]) == [fingerprint, "1,"]
    await memories.count(ref)  # the rest: appended
    assert await memories.client.hget(tok, "prot:seqs") == "1,3,"
    # Counted under other rules without a rebuild: dropped, never half right.
    other = resource_with(Priority(protected=50))
    await memories.append(ref, [say(4)])
    await memories.count(ref, other)
    assert await memories.client.hmget(tok, ["prot", "prot:seqs"]) == [None, None]
    await memories.append(ref, [say(5)])
    await memories.count(ref, other, rebuild=True)  # every message: protected at 50 and up
    assert await memories.client.hmget(tok, ["prot", "prot:seqs"]) == [
        Priorities(other.priority).fingerprint,
        "1,2,3,4,5,",
    ]


async def test_a_new_generation_starts_an_empty_index(memories: Memories) -> None:
    ref = MemoryRef("acme", "customer-support", "cleared")
    tok, _ = memories.memory_keys(ref)
    await memories.append(ref, [SYSTEM, say(1)])
    await memories.count(ref)
    assert await memories.client.hget(tok, "prot:seqs") == "1,"
    p = partition_for(ref.memory_id, PARTITIONS)
    stream = memories.keys.ingest(p)
    entry = str(await memories.client.xadd(stream, {"event": "{}"}))
    await memories.client.xreadgroup(Group.APPENDER.value, "w1", {stream: ">"}, count=1)
    batch = ApplyBatch(memories.keys, p)
    batch.command("clear", Target(entry, ref.memory_id, TTL, f"ev-{entry}"))
    lease = await memories.lease(Group.APPENDER, p)
    assert await MemoryStore(memories.scripts, memories.keys).apply(lease, batch) == ["applied"]
    assert await memories.client.hget(tok, "prot") is None
    await memories.append(ref, [say(2), SYSTEM])
    await memories.count(ref)  # nothing counted before: this batch starts the index
    assert await memories.client.hget(tok, "prot:seqs") == "4,"
