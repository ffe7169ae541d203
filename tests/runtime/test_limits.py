"""Size limits: the SDK refuses before publishing, the appender refuses what reaches it
(from a producer that does not check), into the dead letter stream with the reason."""

from __future__ import annotations

import pytest

from events import MessageAppended, Publisher, PublishError, RequestLimits
from events.envelope import AppendPayload, MemoryName
from memory import MemoryRef, Message, Role, partition_for
from store import DeadLetters, OutcomeStatus
from tests.runtime.conftest import PARTITIONS, Rig, user

REF = MemoryRef.parse("acme/customer-support/limits-1")
SMALL = RequestLimits(max_message_bytes=1000, max_messages=3, max_request_bytes=3000)


def _publisher(rig: Rig, limits: RequestLimits) -> Publisher:
    return Publisher(
        rig.client, keys=rig.keys, scripts=rig.scripts, default_partitions=PARTITIONS, limits=limits
    )


async def test_the_sdk_refuses_what_is_over_a_limit_before_publishing(rig: Rig) -> None:
    publisher = _publisher(rig, SMALL)
    with pytest.raises(PublishError, match="over the 1000-byte limit of one message"):
        await publisher.append(REF, user("x" * 2000))
    with pytest.raises(PublishError, match="4 messages, over the limit of 3 per event"):
        await publisher.replace(REF, [user("a")] * 4)
    events = [
        MessageAppended(
            tenant="acme",
            payload=AppendPayload(
                memory=MemoryName(resource=REF.resource, key=REF.key), message=user(f"m{i}")
            ),
        )
        for i in range(4)
    ]
    with pytest.raises(PublishError, match="a batch of 4 events, over the limit of 3"):
        await publisher.publish_many(events)
    big = [
        MessageAppended(
            tenant="acme",
            payload=AppendPayload(
                memory=MemoryName(resource=REF.resource, key=REF.key), message=user("y" * 900)
            ),
        )
        for _ in range(3)
    ]
    with pytest.raises(PublishError, match="over the 3000-byte limit of one call"):
        await publisher.publish_many(big)
    assert (
        int(await rig.client.xlen(rig.keys.ingest(partition_for(REF.memory_id, PARTITIONS)))) == 0
    )
    # Within the limits, it goes.
    assert (await publisher.append(REF, user("small"))).receipt is not None


async def test_the_appender_refuses_what_is_over_a_limit_into_the_dead_letters(rig: Rig) -> None:
    rig.start("appender", rig.appender(limits=SMALL))
    loose = _publisher(rig, RequestLimits())  # a producer that allows more
    too_big = await loose.append(REF, user("x" * 2000), wait=True)
    assert too_big.outcome is not None and too_big.outcome.status is OutcomeStatus.REFUSED
    assert too_big.outcome.reason == "too_large"
    assert "MEMSTREAM_MAX_MESSAGE_BYTES" in (too_big.outcome.detail or "")
    too_many = await loose.replace(REF, [user("a")] * 4, wait=True)
    assert too_many.outcome is not None and too_many.outcome.reason == "too_large"
    ok = await loose.append(REF, Message(role=Role.USER, content="fine"), wait=True)
    assert ok.outcome is not None and ok.outcome.ok
    p = partition_for(REF.memory_id, PARTITIONS)
    letters = await DeadLetters(rig.client, rig.scripts, rig.keys).list(p)
    assert [letter.reason for letter in letters] == ["too_large", "too_large"]
    assert [str(m.content) for m in (await rig.reader.read(REF)).messages] == ["fine"]


def deep(levels: int) -> object:
    value: object = "leaf"
    for _ in range(levels):
        value = [value]
    return value


async def test_the_deepest_metadata_admitted_is_read_counted_and_flushed(rig: Rig) -> None:
    from events.codec import MAX_JSON_DEPTH
    from memory import FlushStrategy

    rig.start_all()
    ref = MemoryRef.parse("acme/customer-support/limits-deep")
    with pytest.raises(PublishError, match=f"more than {MAX_JSON_DEPTH} deep"):
        await rig.publisher.append(
            ref, Message(role=Role.USER, content="x", metadata={"m": deep(MAX_JSON_DEPTH)})
        )
    # payload, message, metadata and the value's own level take four of the 64.
    deepest = Message(role=Role.USER, content="x", metadata={"m": deep(MAX_JSON_DEPTH - 4)})
    published = await rig.publisher.append(ref, deepest, wait=True)
    assert published.outcome is not None and published.outcome.ok
    await rig.publisher.append(ref, user("after"), wait=True)

    async def counted() -> bool:
        return (await rig.reader.read(ref)).counted == 2

    await rig.eventually(counted, what="both messages counted")
    view = await rig.reader.read(ref)
    assert view.messages[0].metadata == {"m": deep(MAX_JSON_DEPTH - 4)}
    flushed = await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, wait=True)
    assert flushed.outcome is not None and flushed.outcome.ok

    # The summarizer read and planned over it (a memory under its target keeps both).
    def ended() -> dict[str, float]:
        family = rig.metrics.registry.get_sample_value
        results = ("applied", "at_target", "nothing_to_do", "failed", "dead_letter")
        found = {
            r: family("memstream_flushes_total", {"strategy": "fifo", "result": r}) for r in results
        }
        return {r: v for r, v in found.items() if v}

    await rig.eventually(ended, what="the flush of the deep message to end")
    assert set(ended()) <= {"applied", "at_target", "nothing_to_do"}, ended()
