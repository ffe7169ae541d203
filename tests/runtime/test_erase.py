"""Erasing one message by sequence, in order with appends: its count leaves the total,
and a summary that covers it is erased too."""

from __future__ import annotations

from memory import FlushStrategy, MemoryRef, StoredMessage, partition_for
from tests.runtime.conftest import PARTITIONS, TOKENIZERS, Rig, user

WORDS = " ".join(f"word{i}" for i in range(300))


async def _counted(rig: Rig, ref: MemoryRef, count: int) -> bool:
    view = await rig.reader.read(ref)
    return view.count == count and view.counted == count


def _recount(rig: Rig, ref: MemoryRef, view_messages: list[StoredMessage]) -> int:
    counter = TOKENIZERS.for_resource(rig.registry[ref.resource])
    return sum(counter.message(m) for m in view_messages)


async def test_erasing_a_message_takes_its_tokens_with_it(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/erase-1")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    seqs = []
    for text in ("one", "my card is secret", "three"):
        published = await rig.publisher.append(ref, user(text), wait=True)
        assert published.outcome is not None and published.outcome.seq is not None
        seqs.append(published.outcome.seq)
    await rig.eventually(lambda: _counted(rig, ref, 3), what="the accountant")
    erased = await rig.publisher.erase(ref, seqs[1], wait=True)
    assert erased.outcome is not None and erased.outcome.ok
    assert erased.outcome.detail == "erased 1 message(s)"
    view = await rig.reader.read(ref)
    assert [str(m.content) for m in view.messages] == ["one", "three"]
    assert view.count == view.counted == 2
    assert view.tokens == _recount(rig, ref, view.messages)
    # Erasing it again (or any absent sequence) is harmless.
    again = await rig.publisher.erase(ref, seqs[1], wait=True)
    assert again.outcome is not None and again.outcome.detail == "erased 0 message(s)"
    nothing = await rig.publisher.erase(MemoryRef.parse("acme/customer-support/none"), 1, wait=True)
    assert nothing.outcome is not None and nothing.outcome.reason == "no_such_memory"


async def test_erasing_a_summarized_message_erases_its_summary(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/erase-2")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    rig.start("summarizer", rig.summarizer())
    for i in range(5):
        await rig.publisher.append(ref, user(f"m{i}. {WORDS}"), wait=True)
    await rig.eventually(lambda: _counted(rig, ref, 5), what="the accountant")
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.HYBRID_SUMMARY, wait=True)

    async def summarized() -> bool:
        return any(m.is_summary for m in (await rig.reader.read(ref)).messages)

    await rig.eventually(summarized, what="a summary")
    view = await rig.reader.read(ref)
    summary = next(m for m in view.messages if m.is_summary)
    assert summary.covers
    covered = summary.covers[0]
    erased = await rig.publisher.erase(ref, covered, wait=True)
    assert erased.outcome is not None and erased.outcome.detail == "erased 1 message(s)"
    after = await rig.reader.read(ref)
    assert not any(m.is_summary for m in after.messages)
    assert [m.seq for m in after.messages] == [m.seq for m in view.messages if not m.is_summary]
    assert after.count == after.counted == len(after.messages)
    assert after.tokens == _recount(rig, ref, after.messages)
    p = partition_for(ref.memory_id, PARTITIONS)
    assert await rig.client.hget(rig.keys.memory(p, ref.memory_id).tok, str(summary.seq)) is None
