"""The summarizer on real Redis: budget flushes end to end, manual flushes with every
strategy, stale and served requests, protected memories, and flushes racing appends."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from memory import (
    FlushStrategy,
    MemoryRef,
    Message,
    ResourceRegistry,
    Role,
    StoredMessage,
    partition_for,
)
from memory.flush import Limits
from memory.summary import extractive_summary
from memory.tokens import TokenCounter
from processors.summarizer import Summarizer
from store import Flushes
from store.lock import DistributedLock
from tests.runtime.conftest import PARTITIONS, ROOT, TOKENIZERS, Rig, user

WORDS = " ".join(f"word{i}" for i in range(300))  # about 600 tokens a message


async def settled(rig: Rig, ref: MemoryRef, count: int | None = None) -> bool:
    """Every message counted, no flush pending and nothing left in flush:{p}."""
    view = await rig.reader.read(ref)
    p = partition_for(ref.memory_id, PARTITIONS)
    pending = await rig.client.xpending(rig.keys.flush(p), "summarizer")
    return (
        view.exists
        and view.counted == view.count
        and (count is None or view.count == count)
        and not view.flush_pending
        and int(pending["pending"]) == 0
        and int(await rig.client.xlen(rig.keys.flush(p))) == 0
    )


async def meta(rig: Rig, ref: MemoryRef) -> dict[str, str]:
    p = partition_for(ref.memory_id, PARTITIONS)
    return dict(await rig.client.hgetall(rig.keys.memory(p, ref.memory_id).meta))


def recount(rig: Rig, ref: MemoryRef, messages: list[Message]) -> int:
    counter = TOKENIZERS.for_resource(rig.registry[ref.resource])
    return sum(counter.message(m) for m in messages)


async def test_a_budget_flush_summarizes_the_oldest_and_keeps_the_rest(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/hybrid-1")
    rig.start_all()
    system = Message(role=Role.SYSTEM, content="You are the support agent of Acme.")
    await rig.publisher.append(ref, system)
    sent = []
    for i in range(8):  # 8 x ~600 tokens: over 3200 (0.8 x 4000) on the 6th
        text = f"Order {1000 + i} for Alice was shipped on Monday. {WORDS}"
        sent.append(text)
        await rig.publisher.append(ref, user(text), wait=True)
    await rig.eventually(lambda: _flushed(rig, ref), timeout=20, what="a flush")
    await rig.eventually(lambda: settled(rig, ref), timeout=20, what="the memory to settle")
    view = await rig.reader.read(ref)
    resource = rig.registry["customer-support"]
    target = Limits.target_of(resource).tokens
    m = await meta(rig, ref)
    # The flush left the memory at its target; appends since keep it under the threshold.
    assert target is not None and int(m["last_flush_tokens"]) <= target
    assert view.tokens < 3200
    # The system message stays first; one summary follows; the newest messages stay.
    assert view.messages[0].role is Role.SYSTEM and not view.messages[0].is_summary
    summaries = [m for m in view.messages if m.is_summary]
    assert len(summaries) == 1
    summary = summaries[0]
    assert view.messages[1] == summary
    kept = [str(m.content) for m in view.messages[2:]]
    assert kept == sent[len(sent) - len(kept) :]
    assert summary.covers and len(summary.covers) == len(sent) - len(kept)
    # The summary keeps names and numbers, and fits its budget.
    assert "Alice" in str(summary.content) and "Order 100" in str(summary.content)
    counter = TOKENIZERS.for_resource(resource)
    assert counter.message(summary) <= resource.flushing.summary_tokens
    assert view.token_counts[1] == counter.message(summary)
    # The stored total is exact: it agrees with a recount of what is there.
    assert view.tokens == recount(rig, ref, [x.to_message() for x in view.messages])
    assert int(m["flushes:hybrid_summary"]) >= 1 and int(m["saved:hybrid_summary"]) > 0
    assert "over_budget_protected" not in m


async def _flushed(rig: Rig, ref: MemoryRef) -> bool:
    return "flushes" in await meta(rig, ref)


async def test_later_flushes_fold_the_earlier_summary_in(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/hybrid-2")
    rig.start_all()
    published = 0
    for round_ in range(3):
        for i in range(6):
            published += 1
            await rig.publisher.append(
                ref, user(f"Round {round_} message {i}: ticket T-{published}. {WORDS}"), wait=True
            )
        await rig.eventually(lambda: settled(rig, ref), timeout=20, what="the memory to settle")
    view = await rig.reader.read(ref)
    summaries = [m for m in view.messages if m.is_summary]
    assert len(summaries) == 1, "earlier summaries are folded into the new one"
    m = await meta(rig, ref)
    assert int(m["flushes"]) >= 2
    # Every published message is either kept or covered by the summary, once.
    covered = summaries[0].covers or []
    kept = [m.seq for m in view.messages if not m.is_summary]
    assert len(covered) + len(kept) == published
    assert len(set(covered) | set(kept)) == published
    assert covered == sorted(covered) and max(covered) < min(kept)


async def test_a_manual_fifo_flush_drops_the_oldest_down_to_the_target(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/fifo-1")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    for i in range(5):  # ~3000 tokens: under the threshold, over the 2400 target
        await rig.publisher.append(ref, user(f"m{i} {WORDS}"), wait=True)
    await rig.eventually(lambda: settled(rig, ref, 5), what="the accountant")
    rig.start("summarizer", rig.summarizer())
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, wait=True)
    await rig.eventually(lambda: _flushed(rig, ref), what="the flush")
    view = await rig.reader.read(ref)
    assert [str(m.content)[:2] for m in view.messages] == ["m2", "m3", "m4"]
    assert view.tokens <= 2400 and not any(m.is_summary for m in view.messages)
    m = await meta(rig, ref)
    assert m["last_flush_strategy"] == "fifo" and m["removed:fifo"] == "2"


async def test_a_dry_run_plans_and_changes_nothing(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/dry-1")
    rig.start_all()
    for i in range(5):
        await rig.publisher.append(ref, user(f"m{i} {WORDS}"), wait=True)
    await rig.eventually(lambda: settled(rig, ref, 5), what="the accountant")
    before = await rig.reader.read(ref)
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, dry_run=True, wait=True)
    await rig.eventually(lambda: _note(rig, ref, "dry_run"), what="the dry run to be recorded")
    after = await rig.reader.read(ref)
    assert after.messages == before.messages and after.tokens == before.tokens
    m = await meta(rig, ref)
    assert '"remove":[' in m["last_flush_plan"] and "flushes" not in m


async def _note(rig: Rig, ref: MemoryRef, note: str) -> bool:
    return (await meta(rig, ref)).get("last_flush_note") == note


async def test_lfu_keeps_what_readers_read_most(rig: Rig) -> None:
    # user-preferences: 50 messages, threshold 0.9 (45), target 0.7 (35), lfu.
    ref = MemoryRef.parse("acme/user-preferences/lfu-1")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    for i in range(40):
        await rig.publisher.append(ref, user(f"pref {i}"), wait=True)
    # Readers read the oldest ten into their context, three times.
    for _ in range(3):
        view = await rig.reader.read(ref, after=0, limit=10, touch=True)
        assert len(view.messages) == 10
    rig.start("summarizer", rig.summarizer())
    for i in range(40, 45):
        await rig.publisher.append(ref, user(f"pref {i}"), wait=True)
    await rig.eventually(lambda: _flushed(rig, ref), what="the flush")
    await rig.eventually(lambda: settled(rig, ref), what="the memory to settle")
    view = await rig.reader.read(ref)
    texts = [str(m.content) for m in view.messages]
    assert len(texts) == 35
    assert all(f"pref {i}" in texts for i in range(10)), "the most read stay"
    assert "pref 10" not in texts and "pref 44" in texts


async def test_a_stale_request_is_acknowledged_and_ignored(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/stale-1")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    for i in range(6):
        await rig.publisher.append(ref, user(f"m{i} {WORDS}"), wait=True)
    await rig.eventually(lambda: settled_counts(rig, ref, 6), what="the accountant")
    assert (await rig.reader.read(ref)).flush_pending
    # The memory is cleared before the summarizer sees the request.
    await rig.publisher.clear(ref, wait=True)
    await rig.publisher.append(ref, user("after the clear"), wait=True)
    rig.start("summarizer", rig.summarizer())
    p = partition_for(ref.memory_id, PARTITIONS)
    await rig.eventually(lambda: _flush_drained(rig, p), what="the request to be acknowledged")
    view = await rig.reader.read(ref)
    assert [str(m.content) for m in view.messages] == ["after the clear"]
    assert "flushes" not in await meta(rig, ref)


async def settled_counts(rig: Rig, ref: MemoryRef, count: int) -> bool:
    view = await rig.reader.read(ref)
    return view.count == count and view.counted == count


async def _flush_drained(rig: Rig, p: int) -> bool:
    pending = await rig.client.xpending(rig.keys.flush(p), "summarizer")
    groups = await rig.client.xinfo_groups(rig.keys.flush(p))
    lag_free = all(g.get("lag") in (0, None) for g in groups) if groups else False
    return int(pending["pending"]) == 0 and (
        lag_free or await rig.client.xlen(rig.keys.flush(p)) == 0
    )


async def test_protected_messages_alone_over_budget_are_flagged_not_looped(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/protected-1")
    rig.start_all()
    for i in range(6):  # system messages are protected: nothing may go
        await rig.publisher.append(
            ref, Message(role=Role.SYSTEM, content=f"rule {i} {WORDS}"), wait=True
        )
    await rig.eventually(
        lambda: _has(rig, ref, "over_budget_protected"), timeout=20, what="the flag"
    )
    await rig.eventually(lambda: settled(rig, ref), timeout=20, what="the memory to settle")
    view = await rig.reader.read(ref)
    assert view.count == 6 and not view.flush_pending
    # One request per count that trips, no loop: the flush stream is drained and stays so.
    await asyncio.sleep(0.5)
    assert await settled(rig, ref)


async def _has(rig: Rig, ref: MemoryRef, field: str) -> bool:
    return field in await meta(rig, ref)


async def test_flushes_racing_four_producers_lose_nothing(rig: Rig, tmp_path: Path) -> None:
    """FIFO flushes while four producers append at full speed: what is there is exactly
    every applied message newer than the oldest one kept, in order; the rest was removed
    by flushes, and the flushes' own count says so."""
    (tmp_path / "chat-fifo.yaml").write_text(
        "resource: memory\nid: chat-fifo\nmax_tokens: 3000\nflushing:\n  type: fifo\n",
        encoding="utf-8",
    )
    rig.registry = ResourceRegistry.load([ROOT / "memories", tmp_path])
    ref = MemoryRef.parse("acme/chat-fifo/race-1")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    rig.start("summarizer", rig.summarizer())
    counter = itertools.count()

    async def produce(n: int) -> list[int]:
        seqs = []
        for _ in range(n):
            i = next(counter)
            if i % 25 == 24:  # manual flushes too, besides the budget ones
                await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO)
            r = await rig.publisher.append(ref, user(f"msg {i} {WORDS[:400]}"), wait=True)
            assert r.outcome is not None and r.outcome.seq is not None
            seqs.append(r.outcome.seq)
        return seqs

    results = await asyncio.gather(*(produce(60) for _ in range(4)))
    applied = sorted(s for seqs in results for s in seqs)
    await rig.eventually(lambda: settled(rig, ref), timeout=30, what="the memory to settle")
    view = await rig.reader.read(ref)
    present = [m.seq for m in view.messages]
    assert present == sorted(present)
    assert not any(m.is_summary for m in view.messages)
    assert present == [s for s in applied if s >= present[0]]
    m = await meta(rig, ref)
    removed = sum(int(v) for k, v in m.items() if k.startswith("removed:"))
    assert removed == len(applied) - len(present) > 0
    assert view.tokens == recount(rig, ref, [x.to_message() for x in view.messages])


async def test_totals_agree_with_a_recount_after_every_kind_of_operation(rig: Rig) -> None:
    """Appends, replaces, clears and flushes of every strategy, racing the accountant and
    the summarizer: once all settle, every memory's stored total is the recount of what
    it holds, and every message is counted exactly once."""
    refs = [MemoryRef.parse(f"acme/customer-support/mix-{i}") for i in range(3)]
    rig.start_all()
    strategies = [s for s in FlushStrategy]
    for step in range(60):
        ref = refs[step % len(refs)]
        if step % 17 == 16:
            await rig.publisher.clear(ref)
        elif step % 13 == 12:
            await rig.publisher.replace(ref, [user(f"replaced {step}"), user(WORDS[:300])])
        elif step % 7 == 6:
            await rig.publisher.request_flush(ref, strategy=strategies[step % len(strategies)])
        else:
            role = Role.SYSTEM if step % 11 == 0 else Role.USER
            await rig.publisher.append(ref, Message(role=role, content=f"{step} {WORDS}"))
    flushes = 0
    for ref in refs:
        await rig.publisher.append(ref, user("the last one"), wait=True)
        await rig.eventually(lambda r=ref: settled(rig, r), timeout=30, what="settled")
        view = await rig.reader.read(ref)
        assert view.count == len(view.messages) and None not in view.token_counts
        assert view.tokens == recount(rig, ref, [m.to_message() for m in view.messages])
        assert view.tokens == sum(c for c in view.token_counts if c is not None)
        assert str(view.messages[-1].content) == "the last one"
        flushes += int((await meta(rig, ref)).get("flushes", 0))
    assert flushes >= 1  # flushes did happen among the operations


async def test_a_flush_of_messages_not_counted_yet_keeps_the_totals_exact(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/uncounted-1")
    rig.start("appender")
    rig.start("summarizer", rig.summarizer())  # no accountant yet: nothing is counted
    for i in range(5):
        await rig.publisher.append(ref, user(f"m{i} {WORDS}"), wait=True)
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, wait=True)
    await rig.eventually(lambda: _flushed(rig, ref), what="the flush")
    view = await rig.reader.read(ref)
    assert [str(m.content)[:2] for m in view.messages] == ["m2", "m3", "m4"]
    assert view.count == 3 and view.counted == 0 and view.tokens == 0
    # The accountant then counts what is left, and only that.
    rig.start("accountant", rig.accountant())
    await rig.eventually(lambda: settled(rig, ref, 3), what="the accountant")
    view = await rig.reader.read(ref)
    assert view.tokens == recount(rig, ref, [m.to_message() for m in view.messages])


async def test_a_lock_left_by_another_holder_does_not_stop_a_flush(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/locked-1")
    stale = DistributedLock(rig.scripts, rig.keys, "a-worker-that-died")
    assert await stale.acquire(f"flush:{ref.memory_id}", ttl=60) is not None
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    rig.start("summarizer", rig.summarizer(lock_wait=0.1))
    for i in range(5):
        await rig.publisher.append(ref, user(f"m{i} {WORDS}"), wait=True)
    await rig.eventually(lambda: settled(rig, ref, 5), what="the accountant")
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, wait=True)
    await rig.eventually(lambda: _flushed(rig, ref), what="the flush")
    assert (await rig.reader.read(ref)).count == 3


class _SlowWriter:
    """Extractive, but a summary of anything that mentions "slow" waits for ``go``."""

    name = "slow"

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def write(
        self, messages: Sequence[StoredMessage], budget: int, counter: TokenCounter
    ) -> Message:
        if any("slow" in str(m.content) for m in messages):
            self.waiting.set()
            await self.go.wait()
        return extractive_summary(messages, budget, counter)


def _same_partition(n: int) -> list[MemoryRef]:
    refs: list[MemoryRef] = []
    for i in itertools.count():
        ref = MemoryRef.parse(f"acme/customer-support/side-{i}")
        if partition_for(ref.memory_id, PARTITIONS) == 0:
            refs.append(ref)
        if len(refs) == n:
            return refs
    raise AssertionError("unreachable")


async def test_a_slow_summary_does_not_hold_up_other_flushes_of_its_partition(rig: Rig) -> None:
    slow_ref, other_ref = _same_partition(2)
    writer = _SlowWriter()
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    rig.start("summarizer", rig.summarizer(writer, summary_timeout=60, detach_after=0.2))
    for i in range(5):
        await rig.publisher.append(slow_ref, user(f"slow {i}. {WORDS}"), wait=True)
        await rig.publisher.append(other_ref, user(f"fast {i}. {WORDS}"), wait=True)
    await rig.eventually(lambda: settled_counts(rig, slow_ref, 5), what="counted")
    await rig.eventually(lambda: settled_counts(rig, other_ref, 5), what="counted")
    await rig.publisher.request_flush(slow_ref, wait=True)
    await asyncio.wait_for(writer.waiting.wait(), 10)
    # While that summary is being written: another request for the same memory waits,
    # and another memory of the partition is flushed.
    await rig.publisher.request_flush(slow_ref, wait=True)
    await rig.publisher.request_flush(other_ref, wait=True)
    await rig.eventually(lambda: _flushed(rig, other_ref), what="the other memory's flush")
    assert not await _flushed(rig, slow_ref)
    writer.go.set()
    await rig.eventually(lambda: _flushed(rig, slow_ref), what="the slow flush")
    await rig.eventually(lambda: settled(rig, slow_ref), what="both requests settled")
    view = await rig.reader.read(slow_ref)
    assert sum(1 for m in view.messages if m.is_summary) == 1
    assert int((await meta(rig, slow_ref))["flushes"]) == 1  # the second found it at target


class _BrokenFlushes(Flushes):
    """Every end of a flush fails like a script bug, after a while."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(rig.scripts, rig.keys)
        self.calls = 0

    async def finish(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0.3)
        raise ResponseError("Error running script (call to f_0): @user_script:1: broken")


async def test_a_flush_failing_in_the_background_is_charged_and_dead_lettered(rig: Rig) -> None:
    ref = _same_partition(1)[0]
    broken = _BrokenFlushes(rig)
    summarizer = Summarizer(broken, rig.registry, TOKENIZERS, detach_after=0.05)
    rig.start("appender")
    rig.start("summarizer", summarizer)
    await rig.publisher.append(ref, user("hello"), wait=True)
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, wait=True)
    letters = rig.keys.dlq(0)

    async def dead_lettered() -> bool:
        return int(await rig.client.xlen(letters)) == 1

    await rig.eventually(dead_lettered, timeout=30, what="the dead letter")
    letter = (await rig.client.xrange(letters))[0][1]
    assert letter["source"] == rig.keys.flush(0) and "ResponseError" in letter["detail"]
    # Charged once per attempt (max_attempts 3), each a finish and its failed end.
    assert broken.calls <= 2 * rig.config.loop.max_attempts + 2
    await asyncio.sleep(1)
    assert int(await rig.client.xlen(letters)) == 1


async def test_a_summary_of_every_message_expires_with_its_memory(rig: Rig, tmp_path: Path) -> None:
    """A hybrid flush that folds every message empties the log (Redis deletes it) and
    writes the summary into a new one: that key gets the memory's deadline, and once the
    memory's meta is gone nothing of it is served, and the summary goes too."""
    (tmp_path / "brief.yaml").write_text(
        "resource: memory\nid: brief\nmax_tokens: 4000\npersistence: {ttl: 5s}\n"
        "flushing: {type: hybrid_summary}\n",
        encoding="utf-8",
    )
    rig.registry = ResourceRegistry.load([ROOT / "memories", tmp_path])
    ref = MemoryRef.parse("acme/brief/all-folded")
    rig.start("appender")
    rig.start("summarizer", rig.summarizer())
    # One message of ~3000 tokens: over the 2400 target, and the only one to fold.
    await rig.publisher.append(ref, user(" ".join([WORDS] * 5)), wait=True)
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.HYBRID_SUMMARY, wait=True)
    await rig.eventually(lambda: _flushed(rig, ref), what="the flush")
    view = await rig.reader.read(ref)
    assert [m.is_summary for m in view.messages] == [True]
    k = rig.keys.memory(partition_for(ref.memory_id, PARTITIONS), ref.memory_id)
    meta_left = int(await rig.client.pttl(k.meta))
    for key in (k.log, k.tok):
        left = int(await rig.client.pttl(key))
        assert 0 < left <= meta_left + 5, f"{key}: PTTL {left}, the memory's {meta_left}"

    async def meta_gone() -> bool:
        return not await rig.client.exists(k.meta)

    await rig.eventually(meta_gone, timeout=15, what="the memory to expire")
    gone = await rig.reader.read(ref)
    assert not gone.exists and gone.messages == [] and gone.count == 0
    resource = rig.registry["brief"]
    window = await rig.reader.read_context(ref, resource, TOKENIZERS.for_resource(resource))
    assert window.messages == [] and window.tokens == 0

    async def log_gone() -> bool:
        return not await rig.client.exists(k.log)

    await rig.eventually(log_gone, timeout=2, what="the summary to expire with its memory")
