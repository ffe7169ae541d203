"""Workflow lifecycle and cleanup, end to end: the cleanup processor sends a terminated
workflow's end into every partition, ordered with appends; each memory it wrote runs its
resource's policy (delete, expire after grace, keep) once no live workflow writes it;
late writes from an ended workflow are refused; the inventory follows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from events import (
    PublishOutcomeUnknownError,
    Receipt,
    TerminatedPayload,
    WorkflowStatus,
    WorkflowTerminated,
)
from memory import MemoryRef, ResourceRegistry, partition_for
from processors import Appender
from processors import appender as appender_module
from store import DeadLetters, Outcome, list_memories
from tests.runtime.conftest import PARTITIONS, ROOT, Rig, user

RESOURCES = {
    "wf-delete": "cleanup: {on_workflow_end: delete}\npersistence: {ttl: 1h}\n",
    "wf-expire": "cleanup: {on_workflow_end: expire, grace: 3s}\npersistence: {ttl: 1h}\n",
    "wf-keep": "persistence: {ttl: 1h}\n",
    "wf-short": "cleanup: {on_workflow_end: keep}\npersistence: {ttl: 2s}\n",
}


@pytest.fixture
async def lifecycle_rig(rig: Rig, tmp_path: Path) -> Rig:
    for name, body in RESOURCES.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"resource: memory\nid: {name}\nmax_tokens: 100000\n{body}"
        )
    rig.registry = ResourceRegistry.load([ROOT / "memories", tmp_path])
    rig.start("appender")
    rig.start_cleanup()
    return rig


def refs(resource: str, prefix: str, n: int, tenant: str = "acme") -> list[MemoryRef]:
    return [MemoryRef(tenant, resource, f"{prefix}-{i}") for i in range(n)]


async def write(rig: Rig, ref: MemoryRef, text: str, workflow: str | None) -> None:
    published = await rig.publisher.append(ref, user(text), workflow_id=workflow, wait=True)
    assert published.outcome is not None and published.outcome.ok, published.outcome


async def listed(rig: Rig, tenant: str, **kwargs: str) -> set[str]:
    return {m.memory_id async for m in list_memories(rig.client, rig.keys, tenant, **kwargs)}


async def end(rig: Rig, workflow: str, tenant: str = "acme") -> None:
    published = await rig.publisher.workflow_terminated(
        tenant, workflow, WorkflowStatus.COMPLETED, wait=True
    )
    assert published.outcome is not None and published.outcome.ok, published.outcome


async def test_delete_policy_runs_when_the_last_writing_workflow_ends(lifecycle_rig: Rig) -> None:
    rig = lifecycle_rig
    own = refs("wf-delete", "own", 8)
    shared = MemoryRef("acme", "wf-delete", "shared")
    other = MemoryRef("acme", "wf-keep", "other")
    for ref in own:
        await write(rig, ref, f"hello {ref.key}", "wf-a")
    await write(rig, shared, "from a", "wf-a")
    await write(rig, shared, "from b", "wf-b")
    await write(rig, other, "keep me", "wf-a")
    ids = {r.memory_id for r in own}
    assert await listed(rig, "acme", workflow="wf-a") == ids | {
        shared.memory_id,
        other.memory_id,
    }
    generations = {r.memory_id: (await rig.reader.read(r)).generation for r in own}

    await end(rig, "wf-a")
    for ref in own:
        view = await rig.reader.read(ref)
        assert not view.exists and view.messages == []
    # Still written by wf-b: stays. A keep resource: stays.
    assert await rig.contents(shared) == ["from a", "from b"]
    assert await rig.contents(other) == ["keep me"]
    assert await listed(rig, "acme", workflow="wf-a") == set()
    assert await listed(rig, "acme", resource="wf-delete") == {shared.memory_id}
    assert await listed(rig, "acme", workflow="wf-b") == {shared.memory_id}

    # A late append from the ended workflow is refused into the dead letters, and does
    # not bring the memory back.
    late = await rig.publisher.append(own[0], user("too late"), workflow_id="wf-a", wait=True)
    assert late.outcome is not None and late.outcome.reason == "workflow_ended"
    assert late.outcome.dead_letter
    assert not (await rig.reader.read(own[0])).exists
    p = partition_for(own[0].memory_id, PARTITIONS)
    letters = await rig.client.xrange(rig.keys.dlq(p))
    assert any(f.get("reason") == "workflow_ended" for _, f in letters)
    # ... to any memory, even one it never wrote.
    fresh = MemoryRef("acme", "wf-keep", "never-written")
    refused = await rig.publisher.append(fresh, user("x"), workflow_id="wf-a", wait=True)
    assert refused.outcome is not None and refused.outcome.reason == "workflow_ended"

    # A live workflow writing a deleted memory starts a new generation.
    await write(rig, own[1], "new life", "wf-c")
    view = await rig.reader.read(own[1])
    assert [str(m.content) for m in view.messages] == ["new life"]
    assert view.generation > generations[own[1].memory_id]

    await end(rig, "wf-b")
    assert not (await rig.reader.read(shared)).exists


async def test_end_is_idempotent_and_a_start_never_undoes_it(lifecycle_rig: Rig) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-keep", "idem")
    await write(rig, ref, "one", "wf-i")
    await end(rig, "wf-i")
    await end(rig, "wf-i")
    started = await rig.publisher.workflow_started("acme", "wf-i", wait=True)
    assert started.outcome is not None and started.outcome.ok
    refused = await rig.publisher.append(ref, user("two"), workflow_id="wf-i", wait=True)
    assert refused.outcome is not None and refused.outcome.reason == "workflow_ended"
    assert await rig.contents(ref) == ["one"]
    # The second end was a duplicate in every partition. Read from the outcomes (the
    # ingest entries may be trimmed already), appender outcomes only.
    outcomes = []
    for p in range(PARTITIONS):
        async for bucket in rig.client.scan_iter(match=f"{rig.keys.namespace}:out:{{{p}}}:*"):
            if str(bucket).count(":") != 3:
                continue  # another group's outcomes
            for text in (await rig.client.hgetall(bucket)).values():
                outcome = Outcome.from_json(str(text))
                detail = str(outcome.detail)
                if detail.startswith("workflow wf-i ended:") or detail.endswith("ended already"):
                    outcomes.append((outcome.status.value, outcome.reason))
    assert sorted(outcomes) == sorted(
        [("applied", None)] * PARTITIONS + [("duplicate", "already_ended")] * PARTITIONS
    )
    # Another tenant's workflow of the same id is not ended.
    theirs = MemoryRef("globex", "wf-keep", "idem")
    await write(rig, theirs, "fine", "wf-i")


async def test_expire_policy_fixes_the_deadline_when_it_runs(lifecycle_rig: Rig) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-expire", "grace")
    revived = MemoryRef("acme", "wf-expire", "revived")
    await write(rig, ref, "one", "wf-e")
    await write(rig, revived, "one", "wf-e")
    p = partition_for(ref.memory_id, PARTITIONS)
    meta = rig.keys.memory(p, ref.memory_id).meta
    assert await rig.client.pttl(meta) > 3_000_000  # the resource's TTL: 1h

    await end(rig, "wf-e")
    left = await rig.client.pttl(meta)
    assert 0 < left <= 3000
    # Writes without a workflow during the grace renew nothing.
    await asyncio.sleep(0.5)
    await write(rig, ref, "two", None)
    assert 0 < await rig.client.pttl(meta) <= left - 400
    assert await rig.contents(ref) == ["one", "two"]
    # A live workflow writing during the grace makes the memory live again.
    await write(rig, revived, "two", "wf-f")
    rp = partition_for(revived.memory_id, PARTITIONS)
    assert await rig.client.pttl(rig.keys.memory(rp, revived.memory_id).meta) > 3_000_000

    await rig.eventually(
        lambda: _gone(rig, ref), timeout=6, what="the memory to expire after its grace"
    )
    assert ref.memory_id not in await listed(rig, "acme", resource="wf-expire")
    assert revived.memory_id in await listed(rig, "acme", resource="wf-expire")
    # What stays is the tombstone.
    k = rig.keys.memory(p, ref.memory_id)
    assert await rig.client.exists(k.tomb) == 1
    assert await rig.client.exists(k.log, k.meta, k.tok, k.backup) == 0


async def _gone(rig: Rig, ref: MemoryRef) -> bool:
    return not (await rig.reader.read(ref)).exists


async def test_end_is_ordered_with_appends(lifecycle_rig: Rig) -> None:
    """Appends published before the termination are applied before the end (and then
    deleted); appends racing the end land before it (deleted with the rest) or after it
    (refused); once the end is applied everywhere, every append is refused; nothing
    comes back."""
    rig = lifecycle_rig
    memories = refs("wf-delete", "burst", 12)
    before = [
        rig.publisher.append(ref, user(f"m{i}"), workflow_id="wf-o")
        for i in range(5)
        for ref in memories
    ]
    receipts = [(await call).receipt for call in before]
    terminated = await rig.publisher.workflow_terminated("acme", "wf-o")
    after = [await rig.publisher.append(ref, user("late"), workflow_id="wf-o") for ref in memories]
    assert terminated.receipt is not None
    await rig.publisher.wait_ended("acme", "wf-o")
    waited = await rig.reader.wait_applied_many(
        [(r.partition, r.entry_id, r.event_id) for r in receipts if r is not None]
    )
    assert all(o.status.value == "applied" for o in waited)
    late = await rig.reader.wait_applied_many(
        [(a.receipt.partition, a.receipt.entry_id, None) for a in after if a.receipt]
    )
    assert {o.reason for o in late} <= {"workflow_ended", None}
    latest = [
        await rig.publisher.append(ref, user("later"), workflow_id="wf-o", wait=True)
        for ref in memories
    ]
    assert {p.outcome.reason for p in latest if p.outcome} == {"workflow_ended"}
    for ref in memories:
        assert not (await rig.reader.read(ref)).exists
    assert await listed(rig, "acme", resource="wf-delete") == set()


async def test_a_workflow_with_many_memories_ends_in_several_calls(
    lifecycle_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = lifecycle_rig
    monkeypatch.setattr(appender_module, "MAX_ENDED_MEMORIES", 2)
    memories = refs("wf-delete", "many", 20)
    for ref in memories:
        await write(rig, ref, "x", "wf-m")
    await write(rig, MemoryRef("acme", "wf-keep", "kept"), "x", "wf-m")
    await end(rig, "wf-m")
    for ref in memories:
        assert not (await rig.reader.read(ref)).exists
    assert await listed(rig, "acme", workflow="wf-m") == set()
    assert await rig.contents(MemoryRef("acme", "wf-keep", "kept")) == ["x"]
    for p in range(PARTITIONS):
        assert await rig.client.exists(rig.keys.workflow_index(p, "acme", "wf-m")) == 0


async def test_replace_from_an_ended_workflow_is_refused(lifecycle_rig: Rig) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-keep", "replaced")
    await write(rig, ref, "one", "wf-r")
    await end(rig, "wf-r")
    published = await rig.publisher.replace(ref, [user("new")], workflow_id="wf-r", wait=True)
    assert published.outcome is not None and published.outcome.reason == "workflow_ended"
    assert await rig.contents(ref) == ["one"]
    # A clear or an erase carrying the workflow id still works (they store nothing).
    cleared = await rig.publisher.clear(ref, workflow_id="wf-r", wait=True)
    assert cleared.outcome is not None and cleared.outcome.ok


async def test_writers_survive_clears_and_replaces(lifecycle_rig: Rig) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-delete", "carried")
    await write(rig, ref, "one", "wf-x")
    await rig.publisher.clear(ref, wait=True)
    await rig.publisher.replace(ref, [user("two")], wait=True)
    assert await rig.contents(ref) == ["two"]
    await end(rig, "wf-x")
    assert not (await rig.reader.read(ref)).exists


async def test_delete_leaves_only_the_tombstone(lifecycle_rig: Rig) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-keep", "deleted")
    await write(rig, ref, "one", "wf-d")
    await write(rig, ref, "two", "wf-d2")
    await rig.publisher.clear(ref, backup=True, wait=True)
    await write(rig, ref, "three", "wf-d")
    deleted = await rig.publisher.delete(ref, wait=True)
    assert deleted.outcome is not None and deleted.outcome.ok
    p = partition_for(ref.memory_id, PARTITIONS)
    k = rig.keys.memory(p, ref.memory_id)
    remaining = await _keys_naming(rig, ref.memory_id)
    assert remaining == {k.tomb, k.idem}
    tomb = await rig.client.hgetall(k.tomb)
    assert set(tomb) == {"wm", "gen", "reset"}
    assert await listed(rig, "acme", workflow="wf-d") == set()


async def _keys_naming(rig: Rig, text: str) -> set[str]:
    """Every key of the test's namespace whose name or value mentions ``text`` (the
    streams and the outcomes excepted: they hold events until retention)."""
    found = set()
    async for key in rig.client.scan_iter(match=f"{rig.keys.namespace}:*", count=1000):
        kind = await rig.client.type(key)
        if kind == "stream" or ":out:" in key:
            continue
        if text in key:
            found.add(key)
            continue
        if kind == "hash":
            blob = json.dumps(await rig.client.hgetall(key))
        elif kind == "zset":
            blob = json.dumps(await rig.client.zrange(key, 0, -1))
        elif kind == "set":
            blob = json.dumps(sorted(await rig.client.smembers(key)))
        elif kind == "string":
            blob = str(await rig.client.get(key))
        else:
            blob = ""
        if text in blob:
            found.add(key)
    return found


async def test_ttl_fallback_removes_a_memory_whose_workflow_never_ends(
    lifecycle_rig: Rig,
) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-short", "forgotten")
    await write(rig, ref, "one", "wf-never")
    p = partition_for(ref.memory_id, PARTITIONS)
    k = rig.keys.memory(p, ref.memory_id)
    index_keys = [
        rig.keys.tenant_index(p, "acme"),
        rig.keys.resource_index(p, "acme", "wf-short"),
        rig.keys.workflow_index(p, "acme", "wf-never"),
    ]
    for key in [k.log, k.meta, k.tok, *index_keys]:
        assert 0 < await rig.client.pttl(key) <= 2000, key
    await asyncio.sleep(2.2)
    assert not (await rig.reader.read(ref)).exists
    assert await listed(rig, "acme", resource="wf-short") == set()
    assert await _keys_naming(rig, ref.memory_id) == {k.tomb, k.idem}
    for key in index_keys:
        assert await rig.client.exists(key) == 0, key


async def test_bad_lifecycle_entries_are_dead_lettered(lifecycle_rig: Rig) -> None:
    rig = lifecycle_rig
    await rig.client.xadd(rig.keys.lifecycle, {"event": "{not json"})
    memory_event = {
        "schema_version": 2,
        "type": "memory.deleted",
        "tenant": "acme",
        "payload": {"memory": {"resource": "wf-keep", "key": "k"}},
    }
    await rig.client.xadd(rig.keys.lifecycle, {"event": json.dumps(memory_event)})
    ok = await rig.publisher.workflow_started("acme", "wf-fine", wait=True)
    assert ok.outcome is not None and ok.outcome.ok

    async def letters() -> list[dict[str, str]]:
        entries = await rig.client.xrange(rig.keys.dlq(0))
        return [f for _, f in entries if f.get("source") == rig.keys.lifecycle]

    async def two() -> bool:
        return len(await letters()) == 2

    await rig.eventually(two, what="two dead letters")
    reasons = sorted(f["reason"] for f in await letters())
    assert reasons == ["not_json", "wrong_stream"]
    # A workflow end addressed to another partition is refused by the appender.
    misrouted = {
        "schema_version": 2,
        "type": "workflow.ended",
        "tenant": "acme",
        "payload": {"workflow_id": "wf-z", "status": "completed", "partition": 3},
    }
    entry = await rig.client.xadd(rig.keys.ingest(1), {"event": json.dumps(misrouted)})
    outcome = await rig.reader.wait_applied(1, entry)
    assert outcome.reason == "misrouted"


async def test_a_lifecycle_dead_letter_replays_to_the_lifecycle_stream(
    lifecycle_rig: Rig,
) -> None:
    rig = lifecycle_rig
    bad = {
        "schema_version": 2,
        "type": "workflow.terminated",
        "tenant": "acme",
        "payload": {"workflow_id": "wf-fix", "status": "exploded"},
    }
    await rig.client.xadd(rig.keys.lifecycle, {"event": json.dumps(bad)})
    letters = DeadLetters(rig.client, rig.scripts, rig.keys)

    async def found() -> list[str]:
        return [d.id for d in await letters.list(0) if d.fields.get("source") == rig.keys.lifecycle]

    await rig.eventually(found, what="the dead letter")
    (letter_id,) = await found()
    # After a fix (here: the letter's event is corrected in place), the replay goes back
    # to the lifecycle stream, where the cleanup processor applies it.
    await rig.client.xdel(rig.keys.dlq(0), letter_id)
    bad["payload"]["status"] = "completed"  # type: ignore[index]
    fixed = await rig.client.xadd(
        rig.keys.dlq(0),
        {"event": json.dumps(bad), "reason": "invalid", "source": rig.keys.lifecycle},
    )
    new_id = await letters.replay(0, fixed)
    assert new_id is not None
    assert await rig.client.xrange(rig.keys.lifecycle, new_id, new_id)
    await rig.publisher.wait_ended("acme", "wf-fix")


def terminated(workflow: str, tenant: str = "acme") -> WorkflowTerminated:
    return WorkflowTerminated(
        tenant=tenant,
        payload=TerminatedPayload(workflow_id=workflow, status=WorkflowStatus.COMPLETED),
    )


async def test_ends_and_appends_in_one_batch_apply_in_stream_order(
    lifecycle_rig: Rig,
) -> None:
    """Entries queued while the appender is down come in one batch: each end is applied
    before the entries after it are decided."""
    rig = lifecycle_rig
    shared = MemoryRef("acme", "wf-delete", "batched")
    flushed = MemoryRef("acme", "wf-delete", "batched-flush")
    await write(rig, shared, "from a", "wf-ba")
    await write(rig, shared, "from b", "wf-bb")
    await write(rig, flushed, "from a", "wf-ba")
    await rig.stop("appender")
    await rig.publisher.end_workflow(terminated("wf-ba"))
    appended = await rig.publisher.append(shared, user("no workflow, between the ends"))
    flush = await rig.publisher.request_flush(flushed)
    await rig.publisher.end_workflow(terminated("wf-bb"))
    await rig.publisher.end_workflow(terminated("wf-bb"))
    rig.start("appender")
    await rig.publisher.wait_ended("acme", "wf-bb")
    assert appended.receipt is not None and flush.receipt is not None
    (applied,) = await rig.reader.wait_applied_many(
        [(appended.receipt.partition, appended.receipt.entry_id, None)]
    )
    assert applied.status.value == "applied"
    # wf-bb's end deleted the shared memory (the append between the ends included).
    assert not (await rig.reader.read(shared)).exists
    # The flush after wf-ba's end found its memory deleted.
    (flush_outcome,) = await rig.reader.wait_applied_many(
        [(flush.receipt.partition, flush.receipt.entry_id, None)]
    )
    assert flush_outcome.reason == "no_such_memory"
    # The second end of wf-bb, in the same partition, is a duplicate.
    p = partition_for(shared.memory_id, PARTITIONS)
    ends = [
        entry_id
        for entry_id, fields in await rig.client.xrange(rig.keys.ingest(p))
        if '"workflow.ended"' in fields["event"] and "wf-bb" in fields["event"]
    ]
    outcomes = [await rig.reader.wait_applied(p, entry_id) for entry_id in ends]
    assert [(o.status.value, o.reason) for o in outcomes] == [
        ("applied", None),
        ("duplicate", "already_ended"),
    ]


async def test_memories_of_an_unloaded_resource_do_not_stall_an_end(
    lifecycle_rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = lifecycle_rig
    monkeypatch.setattr(appender_module, "MAX_ENDED_MEMORIES", 2)
    gone = refs("wf-delete", "unloaded", 12)
    for ref in gone:
        await write(rig, ref, "x", "wf-u")
    # The resource is removed from the workers' files (and reloaded).
    (tmp_path / "wf-delete.yaml").unlink()
    reloaded = ResourceRegistry.load([ROOT / "memories", tmp_path])
    worker, _, _ = rig.running["appender"]
    assert isinstance(worker.processor, Appender)
    worker.processor.registry = reloaded
    await end(rig, "wf-u")
    # No policy is known for them: they are kept (and live by their TTL), no longer
    # written by the workflow; the partitions went on.
    for ref in gone:
        view = await rig.reader.read(ref)
        assert view.exists and not any(k.startswith("wf:") for k in view.meta)
    after = MemoryRef("acme", "wf-keep", "after-unloaded")
    await write(rig, after, "fine", None)


async def test_a_failing_send_of_an_end_is_retried_never_dead_lettered(
    lifecycle_rig: Rig,
) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-delete", "retried-end")
    await write(rig, ref, "x", "wf-f")
    real = rig.publisher.end_workflow
    failures = 0

    async def flaky(event: WorkflowTerminated) -> list[Receipt]:
        nonlocal failures
        if failures < 5:  # more than the loop's max_attempts (3)
            failures += 1
            raise PublishOutcomeUnknownError("the connection broke", idempotency_keys=[])
        return await real(event)

    rig.publisher.end_workflow = flaky  # type: ignore[method-assign]
    await end(rig, "wf-f")
    assert failures == 5
    assert not (await rig.reader.read(ref)).exists
    assert [f for _, f in await rig.client.xrange(rig.keys.dlq(0))] == []
    assert await rig.client.hlen(rig.keys.attempts(0, "cleanup")) == 0


async def test_ls_pages_never_skip_a_memory_when_others_leave_the_index(
    lifecycle_rig: Rig,
) -> None:
    rig = lifecycle_rig
    memories = refs("wf-keep", "paged", 24, tenant="pager")
    for ref in memories:
        await write(rig, ref, "x", "wf-p")
    by_partition: dict[int, list[str]] = {}
    for ref in memories:
        by_partition.setdefault(partition_for(ref.memory_id, PARTITIONS), []).append(ref.memory_id)
    p, ids = max(by_partition.items(), key=lambda item: len(item[1]))
    assert len(ids) >= 4
    listing = list_memories(rig.client, rig.keys, "pager", page=2)
    seen = []
    async for listed in listing:
        seen.append(listed.memory_id)
        if listed.partition == p and len([s for s in seen if s in ids]) == 2:
            # The first page of p is out: what it listed leaves the index (as an expired
            # memory does); the next page must still start after it.
            await rig.client.zrem(rig.keys.tenant_index(p, "pager"), *seen[-2:])
    assert sorted(seen) == sorted(r.memory_id for r in memories)
    writers = {
        m.memory_id
        async for m in list_memories(rig.client, rig.keys, "pager", workflow="wf-p", page=3)
    }
    assert writers == {r.memory_id for r in memories}


async def test_an_end_spelt_with_json_escapes_is_applied_like_any_other(
    lifecycle_rig: Rig,
) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-delete", "escaped")
    await write(rig, ref, "x", "wf-esc")
    p = partition_for(ref.memory_id, PARTITIONS)
    text = (
        '{"schema_version":3,"type":"workflow\\u002eended","tenant":"acme",'
        '"payload":{"workflow_id":"wf-esc","status":"completed","partition":' + str(p) + "}}"
    )
    entry = await rig.client.xadd(rig.keys.ingest(p), {"event": text})
    outcome = await rig.reader.wait_applied(p, entry)
    assert outcome.status.value == "applied", outcome
    assert not (await rig.reader.read(ref)).exists


async def test_a_refused_end_holds_the_lifecycle_stream_until_fixed(
    lifecycle_rig: Rig,
) -> None:
    rig = lifecycle_rig
    ref = MemoryRef("acme", "wf-delete", "held-end")
    await write(rig, ref, "x", "wf-h")
    # A key of the wrong type where partition 2's ingest stream should be.
    parked = rig.keys.ingest(2) + ":parked"  # the same hash tag: one slot
    await rig.client.rename(rig.keys.ingest(2), parked)
    await rig.client.set(rig.keys.ingest(2), "not a stream")
    try:
        await rig.publisher.workflow_terminated("acme", "wf-h")

        async def held() -> bool:
            return bool(await rig.client.get(rig.keys.held(0, "cleanup")))

        await rig.eventually(held, what="the lifecycle stream held back")
        assert "refused the end of workflow wf-h" in str(
            await rig.client.get(rig.keys.held(0, "cleanup"))
        )
        assert [f for _, f in await rig.client.xrange(rig.keys.dlq(0))] == []
    finally:
        await rig.client.delete(rig.keys.ingest(2))
        await rig.client.rename(parked, rig.keys.ingest(2))
    await rig.publisher.wait_ended("acme", "wf-h", timeout=20)
    assert not (await rig.reader.read(ref)).exists
