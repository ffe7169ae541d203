"""The appender under the partitioned runtime, in-process, against real Redis."""

from __future__ import annotations

import json

from events import MessageAppended, PartiallyPublishedError, Publisher, event_json
from events.envelope import AppendPayload, MemoryName
from memory import MemoryRef, partition_for
from store import Group, LeaseHolder, StreamEntry, WaitTimeoutError
from tests.runtime.conftest import PARTITIONS, Rig, user

REF = MemoryRef.parse("acme/customer-support/conv-1")


def raw_event(ref: MemoryRef, text: str, **overrides: object) -> dict[str, object]:
    event = MessageAppended(
        tenant=ref.tenant,
        payload=AppendPayload(
            memory=MemoryName(resource=ref.resource, key=ref.key), message=user(text)
        ),
    )
    data: dict[str, object] = json.loads(event_json(event))
    data.update(overrides)
    return data


async def xadd(rig: Rig, ref: MemoryRef, event: object) -> str:
    p = partition_for(ref.memory_id, PARTITIONS)
    text = event if isinstance(event, str) else json.dumps(event)
    return str(await rig.client.xadd(rig.keys.ingest(p), {"event": text}))


async def test_published_messages_are_applied_in_order(rig: Rig) -> None:
    rig.start("w1")
    refs = [MemoryRef.parse(f"acme/customer-support/conv-{i}") for i in range(8)]
    for n in range(5):
        await rig.publisher.publish_many(
            [MessageAppended(tenant="acme", payload=_payload(r, f"{r.key}:{n}")) for r in refs]
        )
    last = await rig.publisher.append(refs[0], user("last"), wait=True)
    assert last.outcome is not None and last.outcome.status == "applied"
    for r in refs:
        await rig.eventually(lambda r=r: _count(rig, r, 5 + (r == refs[0])), what=f"{r}")
        assert (await rig.contents(r))[:5] == [f"{r.key}:{n}" for n in range(5)]


def _payload(ref: MemoryRef, text: str) -> AppendPayload:
    return AppendPayload(memory=MemoryName(resource=ref.resource, key=ref.key), message=user(text))


async def _count(rig: Rig, ref: MemoryRef, n: int) -> bool:
    return (await rig.reader.read(ref)).count == n


async def test_publish_wait_reports_refusals_with_their_reason(rig: Rig) -> None:
    rig.start("w1")
    unknown = MemoryRef.parse("acme/no-such-resource/x")
    published = await rig.publisher.append(unknown, user("hi"), wait=True)
    assert published.outcome is not None
    assert published.outcome.status == "refused"
    assert published.outcome.reason == "unknown_resource"
    assert published.outcome.dead_letter


async def test_bad_events_are_dead_lettered_and_the_partition_keeps_flowing(rig: Rig) -> None:
    rig.start("w1", rig.appender(max_event_bytes=4096))
    p = partition_for(REF.memory_id, PARTITIONS)
    other = next(
        MemoryRef.parse(f"acme/customer-support/k{i}")
        for i in range(100)
        if partition_for(f"acme/customer-support/k{i}", PARTITIONS) != p
    )
    bad = {
        "not_json": "{nope",
        "unsupported_version": raw_event(REF, "old", schema_version=0),
        "missing_field": {k: v for k, v in raw_event(REF, "x").items() if k != "payload"},
        "unknown_type": raw_event(REF, "x", type="message.exploded"),
        "oversized": raw_event(REF, "x" * 5000),
        "invalid": raw_event(REF, "x", tenant="bad tenant!"),
        "wrong_stream": {
            "schema_version": 2,
            "type": "workflow.started",
            "tenant": "acme",
            "event_id": "wf",
            "payload": {"workflow_id": "wf-1"},
        },
    }
    expected: dict[str, str] = {}
    for reason, event in bad.items():
        expected[await xadd(rig, REF, event)] = reason
        expected[await xadd(rig, REF, raw_event(REF, f"after {reason}"))] = "applied"
    misrouted = raw_event(other, "misrouted")
    misrouted_id = str(await rig.client.xadd(rig.keys.ingest(p), {"event": json.dumps(misrouted)}))
    expected[misrouted_id] = "misrouted"
    expected[str(await rig.client.xadd(rig.keys.ingest(p), {"no_event_field": "x"}))] = (
        "missing_field"
    )
    for entry_id, reason in expected.items():
        outcome = await rig.reader.wait_applied(p, entry_id, timeout=10)
        if reason == "applied":
            assert outcome.status == "applied", (entry_id, outcome)
        else:
            assert (outcome.status, outcome.reason) == ("refused", reason), (entry_id, outcome)
    letters = await rig.client.xrange(rig.keys.dlq(p))
    assert sorted(f["reason"] for _, f in letters) == sorted(
        r for r in expected.values() if r != "applied"
    )
    assert all(f["detail"] and f["entry"] in expected for _, f in letters)
    assert await rig.contents(REF) == [f"after {r}" for r in bad]


async def test_a_newer_schema_version_holds_the_partition_and_is_reported(rig: Rig) -> None:
    rig.start("w1")
    p = partition_for(REF.memory_id, PARTITIONS)
    newer = await xadd(rig, REF, raw_event(REF, "from the future", schema_version=5))
    after = await xadd(rig, REF, raw_event(REF, "after"))
    held_key = rig.keys.held(p, Group.APPENDER)
    await rig.eventually(lambda: rig.client.exists(held_key), what="the hold report")
    held = json.loads(str(await rig.client.get(held_key)))
    assert held["entry"] == newer and "newer" in held["reason"]
    try:
        await rig.reader.wait_applied(p, after, timeout=0.5)
    except WaitTimeoutError as e:
        assert "held back" in str(e)
    else:
        raise AssertionError("an entry behind a held one was applied")
    assert await rig.contents(REF) == []
    assert await rig.client.xlen(rig.keys.dlq(p)) == 0
    # The operator removes the entry (or upgrades the workers): the partition resumes.
    await rig.client.xdel(rig.keys.ingest(p), newer)
    outcome = await rig.reader.wait_applied(p, after, timeout=10)
    assert outcome.status == "applied"
    erased = await rig.reader.outcome(p, newer)
    assert erased is not None and erased.status == "erased"
    await rig.eventually(lambda: _not(rig.client.exists(held_key)), what="hold cleared")


async def _not(awaitable: object) -> bool:
    return not await awaitable  # type: ignore[misc]


class Exploding:
    """An appender whose processing raises for messages saying 'boom'."""

    def __init__(self, rig: Rig) -> None:
        self.inner = rig.appender()
        self.group = self.inner.group
        self.calls = 0

    async def process(self, batch):  # type: ignore[no-untyped-def]
        self.calls += 1
        original = self.inner._prepare

        def prepare(ops, entry: StreamEntry, partition: int, found) -> None:  # type: ignore[no-untyped-def]
            if entry.fields and "boom" in entry.fields.get("event", ""):
                raise RuntimeError("boom")
            original(ops, entry, partition, found)

        self.inner._prepare = prepare  # type: ignore[method-assign]
        try:
            return await self.inner.process(batch)
        finally:
            self.inner._prepare = original  # type: ignore[method-assign]


async def test_a_failing_entry_holds_back_its_partition_then_is_dead_lettered(rig: Rig) -> None:
    p = partition_for(REF.memory_id, PARTITIONS)
    before = await xadd(rig, REF, raw_event(REF, "before"))
    boom = await xadd(rig, REF, raw_event(REF, "boom"))
    after = await xadd(rig, REF, raw_event(REF, "after"))
    processor = Exploding(rig)
    rig.start("w1", processor)  # type: ignore[arg-type]
    outcome = await rig.reader.wait_applied(p, boom, timeout=15)
    assert (outcome.status, outcome.reason) == ("refused", "failed")
    assert "boom" in str(outcome.detail)
    assert (await rig.reader.wait_applied(p, after, timeout=10)).status == "applied"
    assert (await rig.reader.outcome(p, before)).status == "applied"  # type: ignore[union-attr]
    assert await rig.contents(REF) == ["before", "after"]
    letters = await rig.client.xrange(rig.keys.dlq(p))
    assert [f["reason"] for _, f in letters] == ["failed"]
    assert int(letters[0][1]["attempts"]) == rig.config.loop.max_attempts
    assert not await rig.client.hexists(rig.keys.attempts(p, Group.APPENDER), boom)


async def test_a_new_holder_takes_over_every_pending_entry_of_a_dead_one(rig: Rig) -> None:
    p = partition_for(REF.memory_id, PARTITIONS)
    await rig.publisher.partitions()
    ids = [await xadd(rig, REF, raw_event(REF, f"m{i}")) for i in range(5)]
    # A worker that read the entries and died before applying them.
    from store import ensure_groups

    await ensure_groups(rig.scripts, rig.keys, p)
    await rig.client.xreadgroup(Group.APPENDER.value, "dead", {rig.keys.ingest(p): ">"}, count=3)
    rig.start("w2")
    for entry_id in ids:
        assert (await rig.reader.wait_applied(p, entry_id, timeout=10)).status == "applied"
    assert await rig.contents(REF) == [f"m{i}" for i in range(5)]
    consumers = await rig.client.xinfo_consumers(rig.keys.ingest(p), Group.APPENDER.value)
    assert "dead" not in {c["name"] for c in consumers}


async def test_an_entry_that_keeps_killing_its_worker_is_dead_lettered(rig: Rig) -> None:
    p = partition_for(REF.memory_id, PARTITIONS)
    await rig.publisher.partitions()
    from store import ensure_groups

    await ensure_groups(rig.scripts, rig.keys, p)
    killer = await xadd(rig, REF, raw_event(REF, "killer"))
    fine = await xadd(rig, REF, raw_event(REF, "fine"))
    await rig.client.xreadgroup(Group.APPENDER.value, "dead", {rig.keys.ingest(p): ">"}, count=1)
    # Two earlier takeovers already counted (max_attempts is 3): this claim is the last.
    await rig.client.hset(rig.keys.attempts(p, Group.APPENDER), killer, 2)
    rig.start("w2")
    outcome = await rig.reader.wait_applied(p, killer, timeout=10)
    assert (outcome.status, outcome.reason) == ("refused", "attempts_exhausted")
    assert (await rig.reader.wait_applied(p, fine, timeout=10)).status == "applied"
    assert await rig.contents(REF) == ["fine"]


async def test_workers_split_the_partitions_and_rebalance_when_one_leaves(rig: Rig) -> None:
    a = rig.start("a")
    await rig.eventually(lambda: len(a.owned) == PARTITIONS, what="a owns everything")
    b = rig.start("b")

    def split() -> bool:
        return (
            bool(a.owned)
            and bool(b.owned)
            and not (set(a.owned) & set(b.owned))
            and set(a.owned) | set(b.owned) == set(range(PARTITIONS))
        )

    await rig.eventually(split, what="an even split")
    b_fences = {p: s.lease.fence for p, s in b.owned.items()}
    await rig.stop("b")
    # A graceful stop releases its leases at once: no waiting for them to expire. (a may
    # already have taken one back, so check the release record, not that the key is gone.)
    for p, fence in b_fences.items():
        assert await rig.client.get(rig.keys.released(p, Group.APPENDER)) == str(fence)
        holder = await rig.client.get(rig.keys.lease(p, Group.APPENDER))
        assert holder is None or LeaseHolder(holder, 0).worker != "b"
    await rig.eventually(lambda: len(a.owned) == PARTITIONS, timeout=5, what="a takes all back")
    published = await rig.publisher.append(REF, user("still flowing"), wait=True)
    assert published.outcome is not None and published.outcome.status == "applied"


async def test_a_cancelled_worker_hands_its_partitions_over_with_new_fences(rig: Rig) -> None:
    a = rig.start("a")
    await rig.eventually(lambda: len(a.owned) == PARTITIONS, what="a owns everything")
    fences = {p: s.lease.fence for p, s in a.owned.items()}
    await rig.cancel("a")
    b = rig.start("b")
    await rig.eventually(lambda: len(b.owned) == PARTITIONS, timeout=10, what="takeover")
    assert all(b.owned[p].lease.fence > fences[p] for p in fences)
    published = await rig.publisher.append(REF, user("after the handover"), wait=True)
    assert published.outcome is not None and published.outcome.status == "applied"


async def test_graceful_shutdown_releases_leases_and_leaves_the_membership(rig: Rig) -> None:
    a = rig.start("a")
    await rig.eventually(lambda: len(a.owned) == PARTITIONS, what="a owns everything")
    await rig.stop("a")
    for p in range(PARTITIONS):
        assert not await rig.client.exists(rig.keys.lease(p, Group.APPENDER))
    assert await rig.client.zcard(rig.keys.members(Group.APPENDER)) == 0


async def test_acknowledged_entries_are_trimmed_from_the_ingest_stream(rig: Rig) -> None:
    rig.start("a")
    p = partition_for(REF.memory_id, PARTITIONS)
    for i in range(20):
        await rig.publisher.append(REF, user(f"m{i}"))
    last = await rig.publisher.append(REF, user("last"), wait=True)
    assert last.outcome is not None
    await rig.eventually(lambda: _at_most(rig, p, 1), timeout=10, what="the ingest stream trimmed")
    assert len(await rig.contents(REF)) == 21


async def _at_most(rig: Rig, p: int, n: int) -> bool:
    return int(await rig.client.xlen(rig.keys.ingest(p))) <= n


async def test_publish_many_returns_entry_ids_in_publish_order(rig: Rig) -> None:
    refs = [MemoryRef.parse(f"acme/customer-support/c{i}") for i in range(10)]
    published = await rig.publisher.publish_many(
        [MessageAppended(tenant="acme", payload=_payload(r, r.key)) for r in refs]
    )
    assert [p.receipt.partition for p in published] == [
        partition_for(r.memory_id, PARTITIONS) for r in refs
    ]
    for r, p in zip(refs, published, strict=True):
        entry = await rig.client.xrange(
            rig.keys.ingest(p.receipt.partition), p.receipt.entry_id, p.receipt.entry_id
        )
        assert json.loads(entry[0][1]["event"])["payload"]["message"]["content"] == r.key


async def test_a_second_publisher_sees_the_stored_partition_count(rig: Rig) -> None:
    other = Publisher(rig.client, keys=rig.keys, scripts=rig.scripts, default_partitions=99)
    assert await other.partitions() == PARTITIONS


async def test_a_batch_partly_refused_by_redis_names_what_was_published(rig: Rig) -> None:
    refs = [MemoryRef.parse(f"acme/customer-support/part-{i}") for i in range(12)]
    partitions = {partition_for(r.memory_id, PARTITIONS) for r in refs}
    assert len(partitions) > 1
    await rig.publisher.partitions()
    broken = partition_for(refs[0].memory_id, PARTITIONS)
    await rig.publisher.publish_many(
        [MessageAppended(tenant="acme", payload=_payload(r, "x")) for r in refs]
    )
    # The stream of one partition is replaced by a string: XADD there fails (WRONGTYPE).
    await rig.client.delete(rig.keys.ingest(broken))
    await rig.client.set(rig.keys.ingest(broken), "not a stream")
    events = [MessageAppended(tenant="acme", payload=_payload(r, "y")) for r in refs]
    try:
        await rig.publisher.publish_many(events)
    except PartiallyPublishedError as e:
        failed = {i for i, _ in e.failed}
        assert failed == {
            i for i, r in enumerate(refs) if partition_for(r.memory_id, PARTITIONS) == broken
        }
        assert len(e.published) == len(refs) - len(failed)
        assert all(r.partition != broken for r in e.published)
        assert "WRONGTYPE" in str(e)
    else:
        raise AssertionError("a refused XADD went unreported")
