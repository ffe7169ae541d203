"""Changing the partition count (store/repartition.py, ``memstream repartition``): every
memory keeps its messages, generation, idempotency keys and tombstone; sequences and
generations are never handed out twice; ended workflows stay ended everywhere; dead
letters follow their memory; the tool refuses while anything runs or waits, and an
interrupted run is finished by running it again. Real Redis (6.2, 7.x, a Cluster) and
real workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from events import MessageAppended, PartitionsChangingError, Publisher, event_json
from events.envelope import AppendPayload, MemoryName
from memory import MemoryRef, partition_for
from processors import Appender, Worker
from processors.app import App
from processors.settings import Settings
from store import (
    DeadLetters,
    MemoryReader,
    MemoryStore,
    OutcomeStatus,
    PartitionCountChangedError,
    Repartitioner,
    RepartitionInProgressError,
    RepartitionRefusedError,
    Retention,
    list_memories,
)
from store.repartition import MARK_FROM, MARK_TO
from tests.runtime.conftest import FAST, PARTITIONS, ROOT, Rig, user

RESOURCE = "customer-support"
RUNNER = (
    "from processors import repartcli\n"
    "from processors.cli import main\n"
    "if 'repartition' not in main.commands:\n"
    "    repartcli.register(main)\n"
    "main()\n"
)


def ref(key: str) -> MemoryRef:
    return MemoryRef("acme", RESOURCE, key)


def moving(prefix: str, new: int, count: int = 1) -> list[MemoryRef]:
    """Memories whose partition changes from PARTITIONS to ``new``."""
    found = []
    for i in range(1000):
        r = ref(f"{prefix}{i}")
        if partition_for(r.memory_id, PARTITIONS) != partition_for(r.memory_id, new):
            found.append(r)
            if len(found) == count:
                return found
    raise AssertionError("no such memory")


def tool(rig: Rig) -> Repartitioner:
    return Repartitioner(
        rig.client, rig.scripts, rig.keys, member_ttl_ms=FAST.lease_ttl_ms, poll=0.1
    )


async def drain(rig: Rig, new: int) -> None:
    """Wait until every stream is drained, then stop every worker."""

    async def drained() -> bool:
        problems = await tool(rig).problems(PARTITIONS, new)
        return all("live worker" in p or "leases" in p for p in problems)

    await rig.eventually(drained, timeout=30, what="drained streams")
    await rig.stop_all()


def start(rig: Rig, n: int) -> None:
    """The three partitioned processors, for ``n`` partitions."""
    store = MemoryStore(rig.scripts, rig.keys, Retention())
    rig.start("appender-n", Appender(store, rig.keys, rig.registry, n), partitions=n)
    rig.start("accountant-n", rig.accountant(), partitions=n)
    rig.start("summarizer-n", rig.summarizer(), partitions=n)


def publisher(rig: Rig) -> Publisher:
    return Publisher(rig.client, keys=rig.keys, scripts=rig.scripts)


@dataclass
class Before:
    views: dict[str, tuple[int, list[tuple[int, str]]]]
    seq: int
    gen: int


async def snapshot(rig: Rig, reader: MemoryReader, refs: list[MemoryRef]) -> Before:
    views = {}
    for r in refs:
        view = await reader.read(r)
        views[r.memory_id] = (view.generation, [(m.seq, str(m.content)) for m in view.messages])
    counters = [await rig.client.hgetall(rig.keys.counters(p)) for p in range(PARTITIONS)]
    return Before(
        views,
        max(int(c.get("seq", 0)) for c in counters),
        max(int(c.get("gen", 0)) for c in counters),
    )


async def fill(rig: Rig, refs: list[MemoryRef], messages: int = 3) -> None:
    for r in refs:
        for j in range(messages):
            published = await rig.publisher.append(
                r, user(f"{r.key} says {j}"), idempotency_key=f"{r.key}-{j}", wait=True
            )
            assert published.outcome is not None and published.outcome.ok, published.outcome


async def misplaced(rig: Rig, n: int) -> list[str]:
    """Memory keys outside their memory's partition under ``n`` partitions."""
    wrong = []
    async for name in rig.client.scan_iter(match=f"{rig.keys.namespace}:m:*", count=1000):
        rest = str(name).split(":", 2)[2]  # {p}:<memory id>:<suffix>
        p = int(rest[1 : rest.index("}")])
        memory_id = rest[rest.index(":") + 1 :].rsplit(":", 1)[0]
        if partition_for(memory_id, n) != p:
            wrong.append(str(name))
    return wrong


@dataclass
class Scenario:
    """Memories made through the pipeline with 4 partitions, before a change to ``new``."""

    new: int
    refs: list[MemoryRef]
    gone: MemoryRef  # deleted: a tombstone only, and a dead letter from before
    gone_entry: str  # the entry of an event applied to it before its delete
    backed: MemoryRef  # cleared with a backup
    backup: str
    skewed: MemoryRef  # its watermark is ahead of every stream's clock
    before: Before


async def scenario(rig: Rig, new: int) -> Scenario:
    refs = [ref(f"m{i}") for i in range(16)]
    gone, backed, skewed = (moving(name, new)[0] for name in ("gone", "backed", "skewed"))
    rig.start_all()
    rig.start_cleanup()
    await fill(rig, [*refs, backed, skewed])
    for r in refs[:4]:
        await rig.publisher.append(r, user("from a workflow"), workflow_id="wf-live", wait=True)
    applied = await rig.publisher.append(gone, user("to delete"), idempotency_key="g-1", wait=True)
    assert applied.receipt is not None
    letter = await rig.publisher.append(gone, user("no"), agent_id="quality-reviewer", wait=True)
    assert letter.outcome is not None and letter.outcome.reason == "read_only"
    deleted = await rig.publisher.delete(gone, wait=True)
    assert deleted.outcome is not None and deleted.outcome.ok
    cleared = await rig.publisher.clear(backed, backup=True, wait=True)
    assert cleared.outcome is not None and cleared.outcome.backup
    ended = await rig.publisher.workflow_terminated("acme", "wf-end", wait=True)
    assert ended.outcome is not None and ended.outcome.ok
    before = await snapshot(rig, rig.reader, refs)
    await drain(rig, new)
    # A watermark from a partition whose server clock ran ahead (another Cluster node):
    # it means nothing in the stream of the memory's new partition.
    old = rig.keys.memory(partition_for(skewed.memory_id, PARTITIONS), skewed.memory_id)
    await rig.client.hset(old.tomb, "wm", "99999999999999-0")
    return Scenario(
        new, refs, gone, applied.receipt.entry_id, backed, cleared.outcome.backup, skewed, before
    )


async def check_memories(rig: Rig, s: Scenario, reader: MemoryReader, fresh: Publisher) -> None:
    for r in [*s.refs, s.skewed]:
        view = await reader.read(r)
        assert view.partition == partition_for(r.memory_id, s.new)
        if r in s.refs:
            got = (view.generation, [(m.seq, str(m.content)) for m in view.messages])
            assert got == s.before.views[r.memory_id], r
        # Applied before the move: still applied once.
        again = await fresh.append(r, user("repeat"), idempotency_key=f"{r.key}-1", wait=True)
        assert again.outcome is not None and again.outcome.status is OutcomeStatus.DUPLICATE
        # New sequences come after every sequence handed out before the move.
        more = await fresh.append(r, user("after the move"), wait=True)
        assert more.outcome is not None and more.outcome.status is OutcomeStatus.APPLIED, r
        assert more.outcome.seq is not None and more.outcome.seq > s.before.seq
        assert more.outcome.gen == view.generation
        assert [str(m.content) for m in (await reader.read(r)).messages][-1] == "after the move"
    # A memory created now gets a generation never handed out before.
    created = await fresh.append(ref("brand-new"), user("hi"), wait=True)
    assert created.outcome is not None and (created.outcome.gen or 0) > s.before.gen


async def check_tombstone(rig: Rig, s: Scenario, reader: MemoryReader, fresh: Publisher) -> None:
    """Repeats and late replays do not bring a deleted memory back; its dead letter
    followed it."""
    gone = s.gone
    dup = await fresh.append(gone, user("to delete"), idempotency_key="g-1", wait=True)
    assert dup.outcome is not None and dup.outcome.status is OutcomeStatus.DUPLICATE
    q = partition_for(gone.memory_id, s.new)
    name = MemoryName(resource=RESOURCE, key=gone.key)
    late = MessageAppended(tenant="acme", payload=AppendPayload(memory=name, message=user("x")))
    fields = {"event": event_json(late), "replay_of": s.gone_entry, "replay_key": "0" * 40}
    entry = str(await rig.client.xadd(rig.keys.ingest(q), fields))  # type: ignore[arg-type]
    outcome = await reader.wait_applied(q, entry)
    assert (outcome.status, outcome.reason) == (OutcomeStatus.REFUSED, "replay_before_reset")
    assert not (await reader.read(gone)).exists
    letters = DeadLetters(rig.client, rig.scripts, rig.keys)
    found = [d for d in await letters.list() if d.fields.get("memory") == gone.memory_id]
    assert [(d.partition, d.reason) for d in found if d.reason == "read_only"] == [(q, "read_only")]


async def check_indexes(rig: Rig, s: Scenario, fresh: Publisher) -> None:
    """Backups, inventory and workflow indexes, ended workflows."""
    k = rig.keys.memory(partition_for(s.backed.memory_id, s.new), s.backed.memory_id)
    assert await rig.client.hget(k.tomb, "backup") == s.backup
    assert await rig.client.zcard(k.backup) == 3
    listed = [x async for x in list_memories(rig.client, rig.keys, "acme")]
    assert {x.memory_id for x in listed} >= {r.memory_id for r in s.refs}
    assert all(x.partition == partition_for(x.memory_id, s.new) for x in listed)
    by_wf = [x async for x in list_memories(rig.client, rig.keys, "acme", workflow="wf-live")]
    assert sorted(x.memory_id for x in by_wf) == sorted(r.memory_id for r in s.refs[:4])
    # A workflow that ended before the move stays ended in every partition.
    for q in range(s.new):
        target = next(
            ref(f"w{i}") for i in range(1000) if partition_for(f"acme/{RESOURCE}/w{i}", s.new) == q
        )
        refused = await fresh.append(target, user("late"), workflow_id="wf-end", wait=True)
        assert refused.outcome is not None and refused.outcome.reason == "workflow_ended", q


@pytest.mark.parametrize("new", [7, 2])
async def test_memories_survive_a_change_of_the_partition_count(rig: Rig, new: int) -> None:
    s = await scenario(rig, new)

    done = await tool(rig).run(new)

    assert (done.old, done.new, done.resumed) == (PARTITIONS, new, False)
    assert done.moved > 0 and done.kept > 0 and done.letters == 1
    assert done.moved + done.kept == len(s.refs) + 3
    config = await rig.client.hgetall(rig.keys.config)
    assert config["partitions"] == str(new) and MARK_TO not in config and MARK_FROM not in config
    assert await misplaced(rig, new) == []
    for p in range(new, PARTITIONS):  # the partitions that went have no streams left
        assert not await rig.client.exists(rig.keys.ingest(p), rig.keys.dlq(p))
    start(rig, new)
    reader, fresh = MemoryReader(rig.client, rig.scripts, rig.keys), publisher(rig)
    assert await reader.partitions() == new
    await check_memories(rig, s, reader, fresh)
    await check_tombstone(rig, s, reader, fresh)
    await check_indexes(rig, s, fresh)


async def test_it_refuses_while_workers_live_or_streams_wait(rig: Rig) -> None:
    rig.start("appender")
    await rig.publisher.append(ref("a"), user("hi"), wait=True)
    with pytest.raises(RepartitionRefusedError) as refused:
        await tool(rig).run(7)
    assert any("appender: 1 live worker(s)" in p for p in refused.value.problems)
    assert any("leases still held" in p for p in refused.value.problems)
    await rig.stop_all()
    # The change events the accountant has not read, and new events nobody applied.
    await rig.publisher.append(ref("a"), user("waiting"))
    with pytest.raises(RepartitionRefusedError) as refused:
        await tool(rig).run(7)
    text = "\n".join(refused.value.problems)
    assert "not yet delivered to group appender" in text
    assert "not yet delivered to group accountant" in text
    config = await rig.client.hgetall(rig.keys.config)
    assert config == {"partitions": str(PARTITIONS)}

    # With a wait, it goes on once the processors drained and were stopped.
    rig.start_all()
    seen: list[list[str]] = []
    run = asyncio.create_task(tool(rig).run(7, wait=60, on_wait=seen.append))
    await drain(rig, 7)
    done = await asyncio.wait_for(run, 30)
    assert done.new == 7 and seen
    assert [
        str(m.content)
        for m in (await MemoryReader(rig.client, rig.scripts, rig.keys).read(ref("a"))).messages
    ] == ["hi", "waiting"]


async def test_processors_do_not_start_during_or_after_a_change(rig: Rig, redis_url: str) -> None:
    migration = await tool(rig).begin(7)
    assert migration is not None and (migration.old, migration.new) == (PARTITIONS, 7)
    worker = rig.start("appender")
    with pytest.raises(RepartitionInProgressError, match="changing to 7"):
        await asyncio.wait_for(rig.running.pop("appender")[2], 10)
    assert worker.members == [] and not worker.owned
    settings = Settings(redis_url=redis_url, namespace=rig.keys.namespace)
    async with App(settings) as app:
        with pytest.raises(RepartitionInProgressError, match="repartition 7 --yes"):
            await app.partitions()
    # Another count is refused until this change is finished.
    with pytest.raises(RepartitionRefusedError, match="repartition 7 --yes"):
        await tool(rig).run(5)
    assert (await tool(rig).run(7)).resumed
    # A worker built for the old count refuses to run with the new one.
    rig.start("stale")
    with pytest.raises(RepartitionInProgressError, match="now 7, not the 4"):
        await asyncio.wait_for(rig.running.pop("stale")[2], 10)


async def test_an_interrupted_change_is_finished_by_running_it_again(rig: Rig) -> None:
    refs = [ref(f"i{i}") for i in range(12)]
    rig.start_all()
    await fill(rig, refs, 2)
    before = await snapshot(rig, rig.reader, refs)
    await drain(rig, 7)
    t = tool(rig)
    migration = await t.begin(7)
    assert migration is not None
    partial = await t.migrate(migration, only={0, 1})
    assert partial.moved > 0
    # A memory half copied when the run stopped: its log is in both partitions.
    half = next(
        r
        for r in refs
        if partition_for(r.memory_id, PARTITIONS) >= 2
        and partition_for(r.memory_id, 7) != partition_for(r.memory_id, PARTITIONS)
    )
    src = rig.keys.memory(partition_for(half.memory_id, PARTITIONS), half.memory_id)
    dst = rig.keys.memory(partition_for(half.memory_id, 7), half.memory_id)
    await rig.client.zadd(dst.log, dict(await rig.client.zrange(src.log, 0, -1, withscores=True)))
    await rig.client.hset(dst.tomb, "wm", "1-1")
    assert await rig.client.hget(rig.keys.config, "partitions") == str(PARTITIONS)

    done = await t.run(7)

    assert done.resumed and (done.old, done.new) == (PARTITIONS, 7)
    assert done.moved + partial.moved >= 1 and await misplaced(rig, 7) == []
    start(rig, 7)
    reader, fresh = MemoryReader(rig.client, rig.scripts, rig.keys), publisher(rig)
    for r in refs:
        view = await reader.read(r)
        assert (view.generation, [(m.seq, str(m.content)) for m in view.messages]) == before.views[
            r.memory_id
        ]
        assert view.watermark != "1-1"
        more = await fresh.append(r, user("next"), wait=True)
        assert more.outcome is not None and more.outcome.ok and (more.outcome.seq or 0) > before.seq


async def test_an_event_published_with_the_old_count_is_replayed_to_its_partition(
    rig: Rig,
) -> None:
    """A producer in another language that still routes with 4 partitions."""
    assert (await tool(rig).run(7)).new == 7
    start(rig, 7)
    target = moving("stale", 7)[0]
    entry = await raw_publish(rig, target, "sent with 4 partitions", PARTITIONS)
    p = partition_for(target.memory_id, PARTITIONS)
    refused = await rig.reader.wait_applied(p, entry)
    assert refused.reason == "misrouted", refused
    letter = refused.dead_letter
    assert letter is not None
    letters = DeadLetters(rig.client, rig.scripts, rig.keys)
    routed = await letters.replay_routed(p, letter)
    q = partition_for(target.memory_id, 7)
    assert routed is not None and routed[0] == q
    reader = MemoryReader(rig.client, rig.scripts, rig.keys)
    outcome = await reader.wait_applied(q, routed[1])
    assert outcome.status is OutcomeStatus.APPLIED, outcome
    assert [str(m.content) for m in (await reader.read(target)).messages] == [
        "sent with 4 partitions"
    ]
    assert await letters.list(p) == [] and await letters.list(q) == []


def _cli(
    redis_url: str, namespace: str, state: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if not (k.startswith("MEMSTREAM_") or k == "REDIS_URL")
    }
    env.update(
        REDIS_URL=redis_url,
        MEMSTREAM_NAMESPACE=namespace,
        MEMSTREAM_RESOURCES=str(ROOT / "memories"),
        MEMSTREAM_STATE_DIR=str(state),
        MEMSTREAM_LEASE_TTL="5",
    )
    return subprocess.run(
        [sys.executable, "-c", RUNNER, "repartition", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def test_the_cli_needs_yes_refuses_while_running_then_changes_the_count(
    rig: Rig, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    refs = [ref(f"c{i}") for i in range(6)]
    rig.start_all()
    await fill(rig, refs, 2)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _cli(redis_url, namespace, tmp_path, *args)

    no = await asyncio.to_thread(run, "7")
    assert no.returncode == 2 and "--yes" in no.stderr
    busy = await asyncio.to_thread(run, "7", "--yes")
    assert busy.returncode == 3, busy.stderr
    assert "refused" in busy.stderr and "live worker" in busy.stderr
    await drain(rig, 7)
    done = await asyncio.to_thread(run, "7", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["old"], summary["new"]) == (PARTITIONS, 7)
    assert summary["moved"] + summary["kept"] == len(refs) and summary["moved"] > 0
    again = await asyncio.to_thread(run, "7", "--yes")
    assert again.returncode == 0 and "7 already" in again.stdout
    reader = MemoryReader(rig.client, rig.scripts, rig.keys)
    for r in refs:
        assert (await reader.read(r)).count == 2


async def raw_publish(rig: Rig, memory: MemoryRef, text: str, count: int) -> str:
    """What a producer in another language does: XADD an event routed with ``count``
    (it checks nothing), as the contract describes."""
    event = MessageAppended(
        tenant=memory.tenant,
        idempotency_key=f"raw-{text}",
        partitions=count,
        payload=AppendPayload(
            memory=MemoryName(resource=memory.resource, key=memory.key), message=user(text)
        ),
    )
    p = partition_for(memory.memory_id, count)
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
        await rig.client.xgroup_create(rig.keys.ingest(p), "appender", "0", mkstream=True)
    return str(await rig.client.xadd(rig.keys.ingest(p), {"event": event_json(event)}))


async def test_events_published_meanwhile_to_a_partition_that_goes_are_forwarded(
    rig: Rig,
) -> None:
    t = tool(rig)
    migration = await t.begin(2)
    assert migration is not None
    # A producer still using 4 partitions publishes to partition 3 during the change.
    target = next(
        ref(f"f{i}")
        for i in range(1000)
        if partition_for(f"acme/{RESOURCE}/f{i}", PARTITIONS) == 3
        and partition_for(f"acme/{RESOURCE}/f{i}", 2) == 1
    )
    await raw_publish(rig, target, "during the change", PARTITIONS)
    done = await t.run(2)
    assert done.resumed and done.forwarded == 1
    assert not await rig.client.exists(rig.keys.ingest(3))
    start(rig, 2)
    reader = MemoryReader(rig.client, rig.scripts, rig.keys)

    async def applied() -> bool:
        return (await reader.read(target)).count == 1

    await rig.eventually(applied, what="the forwarded event applied")

    # After the change, a producer still using 4 partitions: run it again to forward.
    await raw_publish(rig, target, "after the change", PARTITIONS)
    assert await rig.client.exists(rig.keys.ingest(3))
    swept = await t.run(2)
    assert (swept.old, swept.new, swept.moved, swept.forwarded) == (2, 2, 0, 1)
    assert not await rig.client.exists(rig.keys.ingest(3))

    async def both() -> bool:
        return (await reader.read(target)).count == 2

    await rig.eventually(both, what="the second forwarded event applied")


async def test_an_sdk_publisher_that_read_the_old_count_publishes_with_the_new_one(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its cached count is refused by the partition itself (the publish script checks
    the partition's count), so it reads the count again and routes with it: no event
    of the SDK is ever stranded or misrouted by a change, however fast the change."""
    monkeypatch.setattr("events.publisher.PARTITIONS_TTL", 3600.0)
    stale = publisher(rig)
    assert await stale.partitions() == PARTITIONS
    await tool(rig).run(2)
    target = next(
        ref(f"s{i}") for i in range(1000) if partition_for(f"acme/{RESOURCE}/s{i}", PARTITIONS) == 3
    )
    published = await stale.append(target, user("after"))
    assert published.receipt is not None
    assert published.receipt.partition == partition_for(target.memory_id, 2)
    assert await stale.partitions() == 2


async def test_producers_and_readers_refuse_during_a_change_and_follow_it_after(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("events.publisher.PARTITIONS_TTL", 0.0)
    monkeypatch.setattr("store.reader.PARTITIONS_TTL", 0.0)
    producer, reader = publisher(rig), MemoryReader(rig.client, rig.scripts, rig.keys)
    memory = ref("follow")
    assert await producer.partitions() == PARTITIONS
    t = tool(rig)
    assert await t.begin(6) is not None
    with pytest.raises(PartitionsChangingError, match="changing to 6"):
        await producer.append(memory, user("refused"))
    with pytest.raises(RepartitionInProgressError, match="changing to 6"):
        await reader.read(memory)
    await t.run(6)
    published = await producer.append(memory, user("after"))
    assert published.receipt is not None
    assert published.receipt.partition == partition_for(memory.memory_id, 6)
    assert await reader.partition_of(memory) == partition_for(memory.memory_id, 6)


async def test_a_dead_letter_follows_its_memory_through_two_changes(rig: Rig) -> None:
    memory_id = next(
        f"acme/{RESOURCE}/k{i}"
        for i in range(10_000)
        if len({partition_for(f"acme/{RESOURCE}/k{i}", n) for n in (4, 8, 16)}) == 3
    )
    letter = {"event": "{}", "reason": "read_only", "memory": memory_id, "entry": "1-0"}
    await rig.client.xadd(rig.keys.dlq(partition_for(memory_id, PARTITIONS)), letter)
    letters = DeadLetters(rig.client, rig.scripts, rig.keys)
    for n in (8, 16):
        await tool(rig).run(n)
        found = [(d.partition, d.fields["memory"]) for d in await letters.list()]
        assert found == [(partition_for(memory_id, n), memory_id)], n


async def test_a_worker_paused_through_a_change_never_works_on_the_old_count(rig: Rig) -> None:
    """Paused past its lease and membership (like SIGSTOP), a worker of the old count
    wakes after the change: it takes no lease, so it can neither apply an event of a new
    producer (dead-lettering it ``misrouted``) nor recreate a moved memory."""
    moved = next(
        MemoryRef("acme", RESOURCE, f"k{i}")
        for i in range(10_000)
        if partition_for(f"acme/{RESOURCE}/k{i}", 4) != partition_for(f"acme/{RESOURCE}/k{i}", 6)
    )
    stale = rig.start("stale")
    rig.start("accountant", rig.accountant())
    rig.start("summarizer", rig.summarizer())
    assert (await rig.publisher.append(moved, user("before"), wait=True)).outcome is not None

    async def drained() -> bool:
        problems = await tool(rig).problems(PARTITIONS, 6)
        return all("live worker" in p or "leases" in p for p in problems)

    await rig.eventually(drained, timeout=30, what="the streams drained")
    await rig.stop("accountant")
    await rig.stop("summarizer")
    gate = asyncio.Event()
    tick = stale._tick

    async def paused() -> None:
        await gate.wait()
        await tick()

    stale._tick = paused  # type: ignore[method-assign]
    await tool(rig).run(6, wait=30)
    fresh = Publisher(rig.client, keys=rig.keys, scripts=rig.scripts)
    new = await fresh.append(moved, user("after"))
    gate.set()  # the paused worker wakes up
    _, _, task = rig.running.pop("stale")
    with pytest.raises(PartitionCountChangedError, match="is now 6, not the 4"):
        await asyncio.wait_for(task, 20)
    old = rig.keys.memory(partition_for(moved.memory_id, 4), moved.memory_id)
    assert not await rig.client.exists(old.log, old.meta)
    assert new.receipt is not None
    assert await rig.reader.outcome(new.receipt.partition, new.receipt.entry_id) is None
    # A worker of the new count applies it.
    store = MemoryStore(rig.scripts, rig.keys, Retention())
    appender = Appender(store, rig.keys, rig.registry, 6)
    worker = Worker(rig.client, rig.scripts, rig.keys, appender, 6, FAST, worker_id="new")
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        outcome = await fresh.wait_applied(new.receipt, timeout=20)
        assert outcome.ok, outcome
        assert [str(m.content) for m in (await fresh.reader.read(moved)).messages] == [
            "before",
            "after",
        ]
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)


async def raw(rig: Rig, memory_id: str, p: int) -> dict[str, object]:
    """Every key of a memory in partition ``p``, by its suffix: contents and whether it
    expires (the tombstone without its watermark)."""
    c, keys = rig.client, rig.keys.memory(p, memory_id)
    found: dict[str, object] = {}
    for key in keys.all():
        kind = str(await c.type(key))
        if kind == "zset":
            value: object = await c.zrange(key, 0, -1, withscores=True)
        elif kind == "hash":
            value = {f: v for f, v in (await c.hgetall(key)).items() if f != "wm"}
        else:
            assert kind == "none", key
            continue
        found[key.rsplit(":", 1)[1]] = (value, int(await c.pttl(key)) > 0)
    return found


async def test_a_memory_larger_than_a_page_moves_whole(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its keys are read page by page (ZSCAN, HSCAN): every member and field arrives,
    with the TTLs."""
    big = moving("big", 7)[0]
    # Small hashes are one page whatever the COUNT: make the token counts a hash table.
    setting = "hash-max-ziplist-entries"  # an alias of hash-max-listpack-entries in 7
    was = (await rig.client.config_get(setting))[setting]
    await configure_every_node(rig, setting, "16")
    try:
        await move_a_large_memory(rig, big, monkeypatch)
    finally:
        await configure_every_node(rig, setting, was)


async def configure_every_node(rig: Rig, setting: str, value: str) -> None:
    client = rig.client
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():
            await client.config_set(setting, value, target_nodes=node)  # type: ignore[call-arg]
    else:
        await client.config_set(setting, value)


async def move_a_large_memory(rig: Rig, big: MemoryRef, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.start_all()
    name = MemoryName(resource=RESOURCE, key=big.key)
    events = [
        MessageAppended(
            tenant="acme",
            payload=AppendPayload(memory=name, message=user(f"message {i}")),
            idempotency_key=f"big-{i}",
        )
        for i in range(300)
    ]
    published = await rig.publisher.publish_many(events)
    assert published[-1].receipt is not None
    p = partition_for(big.memory_id, PARTITIONS)
    await rig.reader.wait_applied(p, published[-1].receipt.entry_id)
    await drain(rig, 7)
    before = await raw(rig, big.memory_id, p)
    assert len(before["log"][0]) == 300 and len(before["tok"][0]) >= 300  # type: ignore[index]
    monkeypatch.setattr("store.repartition.SCAN_COUNT", 7)  # many pages per key

    await tool(rig).run(7)

    q = partition_for(big.memory_id, 7)
    assert await raw(rig, big.memory_id, q) == before
    assert await raw(rig, big.memory_id, p) == {}
    k = rig.keys.memory(q, big.memory_id)
    stream = await rig.client.xinfo_stream(rig.keys.ingest(q))
    assert await rig.client.hget(k.tomb, "wm") == str(stream["last-generated-id"])
    assert str(await rig.client.object("encoding", k.tok)) == "hashtable"  # HSCAN paged
