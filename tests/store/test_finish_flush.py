"""finish_flush.lua (store/flushing.py), the end of a flush attempt, against real Redis
6.2, 7.x and a Cluster: its compare-and-set applies a plan only to the very messages
the plan was made from, whatever their stream entry ids."""

from __future__ import annotations

import json

from memory import MemoryRef, partition_for
from store import (
    ApplyBatch,
    BudgetLimits,
    Change,
    Flushes,
    Group,
    Keys,
    Lease,
    Leases,
    MemoryStore,
    RedisClient,
    Scripts,
    Target,
    ensure_groups,
    ensure_partitions,
)

PARTITIONS = 4
REF = MemoryRef("acme", "customer-support", "cas-1")
LIMITS = BudgetLimits(tokens=4000, messages=None, threshold=0.8)


async def lease(scripts: Scripts, keys: Keys, p: int, group: Group) -> Lease:
    held = await Leases(scripts, keys, group.value, 10_000).acquire(p, "w1")
    assert held is not None
    return held


async def test_a_plan_never_takes_a_summary_for_the_message_it_planned(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    """Messages carry the ingest entry id that wrote them, a summary the flush entry id
    of its request: two streams, one clock, so the ids can be equal. A plan made before a
    summary took over a planned message's sequence, with the same id, must not remove
    the summary as if it were that message."""
    await ensure_partitions(client, keys, PARTITIONS)
    p = partition_for(REF.memory_id, PARTITIONS)
    await ensure_groups(scripts, keys, p)
    appender = await lease(scripts, keys, p, Group.APPENDER)
    summarizer = await lease(scripts, keys, p, Group.SUMMARIZER)
    ingest = keys.ingest(p)
    ids = [str(await client.xadd(ingest, {"event": "{}"})) for _ in range(3)]
    await client.xreadgroup(Group.APPENDER.value, "w1", {ingest: ">"}, count=3)
    batch = ApplyBatch(keys, p)
    for i, entry_id in enumerate(ids):
        message = json.dumps({"role": "user", "content": f"m{i}"})
        batch.append(Target(entry_id, REF.memory_id, 60_000, f"ev-{i}"), message)
    assert await MemoryStore(scripts, keys).apply(appender, batch) == ["applied"] * 3
    flushes = Flushes(scripts, keys)
    planned = await flushes.snapshot(p, REF.memory_id)
    m1, m2, _ = planned.messages

    # A flush request whose entry id in flush:{p} is the id of the ingest entry that
    # wrote m2; its summary folds m1 and m2 and takes m2's sequence.
    request = str(await client.xadd(keys.flush(p), {"memory": REF.memory_id}, id=m2.entry))
    assert request == m2.entry
    summary = json.dumps({"role": "system", "content": "m0 and m1", "covers": [m1.seq, m2.seq]})
    folded = Change(
        strategy="hybrid_summary",
        entry=request,
        summarize=(m1.seq, m2.seq),
        digests={s: planned.digests[s] for s in (m1.seq, m2.seq)},
        summary=summary,
        summary_tokens=5,
    )
    end = await flushes.finish(
        summarizer,
        REF.memory_id,
        gen=planned.gen,
        entries=[],
        requests=[],
        rearm="r1",
        limits=LIMITS,
        change=folded,
    )
    assert end is not None and end.status == "applied"
    now = await flushes.snapshot(p, REF.memory_id)
    assert [(m.seq, m.entry, m.is_summary) for m in now.messages[:1]] == [(m2.seq, m2.entry, True)]

    # The plan made from the first snapshot removes m2: it is gone, so the plan is stale.
    stale = Change(
        strategy="fifo", entry="0-1", remove=(m2.seq,), digests={m2.seq: planned.digests[m2.seq]}
    )
    end = await flushes.finish(
        summarizer,
        REF.memory_id,
        gen=planned.gen,
        entries=[],
        requests=[],
        rearm="r2",
        limits=LIMITS,
        change=stale,
    )
    assert end is None, "the plan removed the summary that took its message's sequence"
    after = await flushes.snapshot(p, REF.memory_id)
    assert after.messages == now.messages and after.tokens == now.tokens
