"""The accountant: exact token totals, counted once, and level-triggered flush requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory import MemoryRef, Message, ResourceRegistry, Role, partition_for
from processors import accountant
from store import StreamEntry
from tests.runtime.conftest import PARTITIONS, ROOT, TOKENIZERS, Rig, memory_in, user

REF = MemoryRef.parse("acme/customer-support/tokens-1")
P = partition_for(REF.memory_id, PARTITIONS)


async def caught_up(rig: Rig, ref: MemoryRef, count: int) -> bool:
    """The memory holds ``count`` messages and the accountant has counted all of them."""
    view = await rig.reader.read(ref)
    return view.exists and view.count == count and view.counted == count


async def test_every_message_is_counted_once_and_the_total_is_exact(rig: Rig) -> None:
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    messages = [
        user("hello"),
        Message(role=Role.ASSISTANT, content="Hi! How can I help you today?", name="bot"),
        Message(role=Role.TOOL, content='{"status": "shipped"}', tool_call_id="call-1"),
    ]
    for m in messages:
        await rig.publisher.append(REF, m)
    await rig.eventually(lambda: caught_up(rig, REF, 3), what="the accountant")
    view = await rig.reader.read(REF)
    counter = TOKENIZERS.for_resource(rig.registry["customer-support"])
    expected = [counter.message(m) for m in view.messages]
    assert view.token_counts == expected
    assert view.tokens == sum(expected)
    assert not view.flush_pending


async def test_crossing_the_threshold_requests_one_flush_per_generation(rig: Rig) -> None:
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    # customer-support: 4000 tokens, threshold 0.8 -> 3200.
    words = " ".join(f"word{i}" for i in range(700))
    for _ in range(5):
        await rig.publisher.append(REF, user(words))
    await rig.eventually(lambda: caught_up(rig, REF, 5), what="the accountant")
    view = await rig.reader.read(REF)
    assert view.tokens >= 3200 and view.flush_pending
    requests = await rig.client.xrange(rig.keys.flush(P))
    assert len(requests) == 1
    assert requests[0][1]["memory"] == REF.memory_id and requests[0][1]["reason"] == "budget"
    # Still over: more appends add no request (the mark is set for this generation).
    await rig.publisher.append(REF, user(words))
    await rig.eventually(lambda: caught_up(rig, REF, 6), what="the accountant")
    assert len(await rig.client.xrange(rig.keys.flush(P))) == 1
    # A new generation clears the mark: crossing again requests again.
    await rig.publisher.clear(REF, wait=True)
    for _ in range(5):
        await rig.publisher.append(REF, user(words))
    await rig.eventually(lambda: caught_up(rig, REF, 5), what="the accountant")
    assert len(await rig.client.xrange(rig.keys.flush(P))) == 2


async def test_a_count_for_a_message_cleared_meanwhile_is_not_applied(rig: Rig) -> None:
    rig.start("appender")
    for i in range(3):
        await rig.publisher.append(REF, user(f"m{i}"))
    await rig.publisher.clear(REF, wait=True)
    await rig.publisher.append(REF, user("after the clear"), wait=True)
    # The accountant starts late: it sees the old generation's changes first.
    rig.start("accountant", rig.accountant())
    await rig.eventually(lambda: caught_up(rig, REF, 1), what="the accountant")
    view = await rig.reader.read(REF)
    assert view.count == 1 and view.counted == 1
    counter = TOKENIZERS.for_resource(rig.registry["customer-support"])
    assert view.tokens == counter.message(view.messages[0])
    p = partition_for(REF.memory_id, PARTITIONS)
    await rig.eventually(lambda: _changes_trimmed(rig, p), timeout=10, what="changes trimmed")


async def _changes_trimmed(rig: Rig, p: int) -> bool:
    return int(await rig.client.xlen(rig.keys.changes(p))) == 0


LEGACY = """resource: memory
id: legacy-support
description: a support memory counted with GPT-4's tokenizer (cl100k_base)
model: gpt-4
max_tokens: 4000
"""


async def test_memories_of_different_models_in_one_batch_are_each_counted_with_their_own(
    rig: Rig, tmp_path: Path
) -> None:
    (tmp_path / "legacy-support.yaml").write_text(LEGACY)
    rig.registry = ResourceRegistry.load([ROOT / "memories", tmp_path])
    modern = rig.registry["customer-support"]
    legacy = rig.registry["legacy-support"]
    # Two memories of one partition, so that their changes come in the same batch.
    ref, other = memory_in(P, "mixed-"), memory_in(P, "mixed-", resource="legacy-support")
    text = "Grüße aus Kraków! Die Bestellung A-1234567 ist unterwegs. 日本語のテキスト"
    counters = {ref: TOKENIZERS.for_resource(modern), other: TOKENIZERS.for_resource(legacy)}
    assert counters[ref].text(text) != counters[other].text(text), "the test needs two counts"
    rig.start("appender")
    for i in range(6):
        for r in (ref, other):
            await rig.publisher.append(r, user(f"{text} ({i})"), wait=True)
    rig.start("accountant", rig.accountant())
    for r in (ref, other):
        await rig.eventually(lambda r=r: caught_up(rig, r, 6), what="the accountant")
        view = await rig.reader.read(r)
        assert view.token_counts == [counters[r].message(m) for m in view.messages]
        assert view.tokens == sum(counters[r].message(m) for m in view.messages)


async def test_a_batch_of_appends_is_counted_from_one_change_naming_every_message(
    rig: Rig,
) -> None:
    ref = memory_in(P, "tokens-batch")
    texts = [f"message {i} " + "word " * i for i in range(6)]
    for text in texts:  # published before the appender runs: applied in one batch
        await rig.publisher.append(ref, user(text))
    rig.start("appender")
    await rig.eventually(
        lambda: _count_is(rig, ref, len(texts)), what="the appender applying the batch"
    )
    changes = [
        f for _, f in await rig.client.xrange(rig.keys.changes(P)) if f["memory"] == ref.memory_id
    ]
    assert [f.get("seqs", f.get("seq", "")).count(",") + 1 for f in changes] == [len(texts)]
    rig.start("accountant", rig.accountant())
    await rig.eventually(lambda: caught_up(rig, ref, len(texts)), what="the accountant")
    view = await rig.reader.read(ref)
    counter = TOKENIZERS.for_resource(rig.registry["customer-support"])
    assert view.token_counts == [counter.message(m) for m in view.messages]
    assert view.tokens == sum(view.token_counts)


async def _count_is(rig: Rig, ref: MemoryRef, count: int) -> bool:
    view = await rig.reader.read(ref)
    return view.exists and view.count == count


async def test_a_step_counts_a_bounded_number_of_messages_and_the_rest_waits(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three memories' appends in one appender batch: three changes of four messages.
    monkeypatch.setattr(accountant, "MAX_STEP_MESSAGES", 5)
    refs = [memory_in(P, f"tokens-step-{i}-") for i in range(3)]
    for i in range(4):
        for ref in refs:
            await rig.publisher.append(ref, user(f"message {i} of {ref.key}"))
    rig.start("appender")
    for ref in refs:
        await rig.eventually(lambda r=ref: _count_is(rig, r, 4), what="the appender")
    changes = [f for _, f in await rig.client.xrange(rig.keys.changes(P))]
    assert [
        f["seqs"].count(",") + 1 for f in changes if f["memory"] in {r.memory_id for r in refs}
    ] == [4, 4, 4]
    rig.start("accountant", rig.accountant())
    for ref in refs:
        await rig.eventually(lambda r=ref: caught_up(rig, r, 4), what="the accountant")
        view = await rig.reader.read(ref)
        counter = TOKENIZERS.for_resource(rig.registry["customer-support"])
        assert view.token_counts == [counter.message(m) for m in view.messages]


def test_a_step_takes_entries_up_to_the_bound_and_always_its_first() -> None:
    def change(n: int, i: int) -> StreamEntry:
        seqs = ",".join(str(s) for s in range(1, n + 1))
        return StreamEntry(
            f"{i}-0", {"type": "appended", "memory": "acme/r/k", "gen": "1", "seqs": seqs}
        )

    batch = [change(4, 1), change(4, 2), change(1, 3), change(9, 4)]
    taken, changes = accountant.step_of(batch, 5)
    assert [e.id for e in taken] == ["1-0"] and changes[0] == ("acme/r/k", 1, [1, 2, 3, 4])
    assert [e.id for e in accountant.step_of(batch, 9)[0]] == ["1-0", "2-0", "3-0"]
    assert [e.id for e in accountant.step_of(batch[3:], 5)[0]] == ["4-0"]  # over it alone
    other = StreamEntry("5-0", {"type": "cleared", "memory": "acme/r/k", "gen": "2"})
    assert [e.id for e in accountant.step_of([other, *batch], 4)[0]] == ["5-0", "1-0"]
