"""Backpressure: a stream over the backlog bound refuses new events with a typed error
(nothing published), a publisher may wait for it to drain, and workflow ends still get
through."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from events import (
    BacklogFullError,
    PartiallyPublishedError,
    Publisher,
    PublishError,
    PublishOutcomeUnknownError,
    RedisUnavailableError,
    RequestLimits,
)
from memory import MemoryRef
from processors.app import App
from processors.settings import Settings
from tests.runtime.conftest import PARTITIONS, ROOT, Rig, appended, memory_in, user

BOUND = 5


def bounded(rig: Rig, bound: int = BOUND, wait: float = 0.0) -> Publisher:
    return Publisher(
        rig.client,
        keys=rig.keys,
        scripts=rig.scripts,
        default_partitions=PARTITIONS,
        limits=RequestLimits(max_backlog=bound),
        backlog_wait=wait,
    )


def ref_in(partition: int, tag: str) -> MemoryRef:
    return memory_in(partition, tag, PARTITIONS)


async def test_a_full_stream_refuses_with_a_typed_error_and_publishes_nothing(rig: Rig) -> None:
    publisher, ref = bounded(rig), ref_in(1, "full")
    for i in range(BOUND):
        await publisher.append(ref, user(f"m{i}"))
    with pytest.raises(BacklogFullError) as refused:
        await publisher.append(ref, user("one too many"))
    assert (refused.value.partition, refused.value.held) == (1, BOUND)
    assert "MEMSTREAM_MAX_BACKLOG" in str(refused.value)
    assert await rig.client.xlen(rig.keys.ingest(1)) == BOUND
    # A batch that would pass the bound is refused whole, not cut.
    other = ref_in(2, "batch")
    await publisher.publish_many([appended(other, f"b{i}") for i in range(BOUND - 1)])
    with pytest.raises(BacklogFullError):
        await publisher.publish_many([appended(other, "x"), appended(other, "y")])
    assert await rig.client.xlen(rig.keys.ingest(2)) == BOUND - 1


async def test_once_the_appender_drains_the_stream_publishing_resumes(rig: Rig) -> None:
    publisher, ref = bounded(rig), ref_in(0, "drain")
    for i in range(BOUND):
        await publisher.append(ref, user(f"m{i}"))
    with pytest.raises(BacklogFullError):
        await publisher.append(ref, user("refused"))
    rig.start("w1")
    await rig.eventually(
        lambda: _held(rig, 0, lambda n: n == 0), what="the applied entries trimmed"
    )
    published = await publisher.append(ref, user("accepted"), wait=True)
    assert published.outcome is not None and published.outcome.ok
    assert await rig.contents(ref) == [*(f"m{i}" for i in range(BOUND)), "accepted"]


async def _held(rig: Rig, p: int, ok: object) -> bool:
    n = int(await rig.client.xlen(rig.keys.ingest(p)))
    return bool(ok(n))  # type: ignore[operator]


async def test_a_publisher_with_backlog_wait_waits_for_the_drain(rig: Rig) -> None:
    publisher, ref = bounded(rig, wait=20.0), ref_in(3, "wait")
    for i in range(BOUND):
        await publisher.append(ref, user(f"m{i}"))
    waiting = asyncio.create_task(publisher.append(ref, user("patient"), wait=True))
    await asyncio.sleep(0.5)
    assert not waiting.done(), "the publish must wait while the stream is full"
    rig.start("w1")
    published = await asyncio.wait_for(waiting, 30)
    assert published.outcome is not None and published.outcome.ok
    assert (await rig.contents(ref))[-1] == "patient"


async def test_a_batch_over_two_partitions_publishes_where_there_is_room(rig: Rig) -> None:
    publisher = bounded(rig)
    full, free = ref_in(1, "p1-"), ref_in(2, "p2-")
    for i in range(BOUND):
        await publisher.append(full, user(f"m{i}"))
    with pytest.raises(PartiallyPublishedError) as partial:
        await publisher.publish_many([appended(full, "no room"), appended(free, "room")])
    assert [r.partition for r in partial.value.published] == [2]
    assert partial.value.failed[0][0] == 0 and "backlog" in partial.value.failed[0][1]
    assert await rig.client.xlen(rig.keys.ingest(2)) == 1


async def test_the_lifecycle_stream_is_bounded(rig: Rig) -> None:
    publisher = bounded(rig, bound=2)
    await publisher.workflow_started("acme", "wf-1")
    await publisher.workflow_started("acme", "wf-2")
    with pytest.raises(BacklogFullError) as refused:
        await publisher.workflow_terminated("acme", "wf-1")
    assert rig.keys.lifecycle in str(refused.value)
    assert await rig.client.xlen(rig.keys.lifecycle) == 2


async def test_the_cleanup_processor_sends_workflow_ends_to_full_streams(
    rig: Rig, redis_url: str
) -> None:
    """Ends must get through: the appenders apply them, which drains the streams."""
    settings = Settings(
        redis_url=redis_url,
        namespace=rig.keys.namespace,
        partitions=PARTITIONS,
        max_backlog=2,
        resources=str(ROOT / "memories"),
    )
    async with App(settings) as app:
        full = app.publisher()
        for p in range(PARTITIONS):
            ref = ref_in(p, "end")
            await full.publish_many([appended(ref, "a"), appended(ref, "b")])
        with pytest.raises(BacklogFullError):
            await full.append(ref_in(0, "end"), user("c"))
        await full.workflow_terminated("acme", "wf-full")
        stop = asyncio.Event()
        cleanup = await app.cleanup(rig.registry)
        task = asyncio.create_task(cleanup.run(stop))
        try:
            await rig.eventually(
                lambda: _held(rig, 0, lambda n: n == 3), what="the end sent to a full stream"
            )
            for p in range(PARTITIONS):
                assert await rig.client.xlen(rig.keys.ingest(p)) == 3
            rig.start("w1")
            await full.wait_ended("acme", "wf-full", timeout=20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)


async def test_a_failure_after_part_of_a_batch_was_published_says_so(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Partition 2's events are published, partition 1 is full and waited for; then
    Redis becomes unreachable: the error must not say that nothing was published."""
    publisher = bounded(rig, wait=5.0)
    full, free = ref_in(1, "pf-"), ref_in(2, "pr-")
    for i in range(BOUND):
        await publisher.append(full, user(f"m{i}"))
    rounds = 0
    send = publisher._pipeline

    async def failing_later(*args: object, **kwargs: object) -> object:
        nonlocal rounds
        rounds += 1
        if rounds > 1:
            raise RedisUnavailableError("Redis is unreachable, nothing was published: gone")
        return await send(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(publisher, "_pipeline", failing_later)
    with pytest.raises(PartiallyPublishedError) as partial:
        await publisher.publish_many([appended(full, "waits"), appended(free, "goes")])
    assert [r.partition for r in partial.value.published] == [2]
    assert partial.value.failed == [(0, partial.value.failed[0][1])]
    assert "not published" in partial.value.failed[0][1]
    assert await rig.client.xlen(rig.keys.ingest(2)) == 1


@pytest.mark.parametrize("with_published", [False, True])
async def test_an_unanswered_partition_is_never_reported_as_not_published(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, with_published: bool
) -> None:
    """Partition 2's node ran the script but its reply was lost (a timeout: outcome
    unknown), partition 1 is full and waited for, then Redis becomes unreachable. What
    was sent to partition 2 may be published: the error must say so, never "nothing
    was published" or "not published" for it."""
    publisher = bounded(rig, wait=5.0)
    full, lost, free = ref_in(1, "uf-"), ref_in(2, "ul-"), ref_in(3, "ur-")
    for i in range(BOUND):
        await publisher.append(full, user(f"m{i}"))
    rounds = 0
    send = publisher._pipeline

    async def reply_lost_then_down(
        routed: object, by_partition: object, partitions: list[int], lifecycle: bool
    ) -> tuple[list[object], list[int]]:
        nonlocal rounds
        rounds += 1
        if rounds > 1:
            raise RedisUnavailableError("Redis is unreachable, nothing was published: gone")
        replies, counts = await send(routed, by_partition, partitions, lifecycle)  # type: ignore[arg-type]
        replies[partitions.index(2)] = RedisTimeoutError("Timeout reading from the node")
        return replies, counts

    monkeypatch.setattr(publisher, "_pipeline", reply_lost_then_down)
    batch = [appended(full, "waits"), appended(lost, "sent, no reply")]
    if with_published:
        batch.append(appended(free, "goes"))
        with pytest.raises(PartiallyPublishedError) as partial:
            await publisher.publish_many(batch)
        assert [r.partition for r in partial.value.published] == [3]
        reasons = dict(partial.value.failed)
        assert reasons[1].startswith("outcome unknown, Redis failed"), reasons
        assert reasons[0].startswith("not published"), reasons
        assert partial.value.transient  # nothing was refused: publish again later
    else:
        with pytest.raises(PublishOutcomeUnknownError) as unknown:
            await publisher.publish_many(batch)
        assert "nothing was published" not in str(unknown.value)
    assert await rig.client.xlen(rig.keys.ingest(2)) == 1  # it was, in fact, published


async def test_a_batch_larger_than_the_bound_is_refused_as_too_large(rig: Rig) -> None:
    publisher, ref = bounded(rig), ref_in(1, "huge")
    with pytest.raises(PublishError, match="more than its stream may hold") as refused:
        await publisher.publish_many([appended(ref, f"m{i}") for i in range(BOUND + 1)])
    assert not isinstance(refused.value, BacklogFullError)
    assert await rig.client.xlen(rig.keys.ingest(1)) == 0
