"""Erasing a tenant: everything it left in Redis goes (memories, summaries, backups,
indexes, locks, stream entries, dead letters, outcomes), nothing of another tenant does.

The data is made by the real pipeline (appender, accountant, summarizer); whether
anything of the erased tenant is left is checked by ``tenant_remnants`` and by an
independent dump of every key and value, read node by node on a Cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from events import (
    EndedPayload,
    MessageAppended,
    Receipt,
    WorkflowEnded,
    WorkflowStatus,
    WorkflowTerminated,
    event_json,
)
from events.envelope import AppendPayload, MemoryName
from memory import FlushStrategy, InvalidReferenceError, MemoryRef, Message, Role, partition_for
from processors.summarizer import Summarizer
from store import (
    ApplyBatch,
    Ending,
    Flushes,
    Group,
    Keys,
    Leases,
    MemoryStore,
    MemoryView,
    RedisClient,
    Retention,
    Target,
    ensure_groups,
)
from store.erasure import TenantMatch, erase_tenant, tenant_remnants
from store.inflight import InFlight
from store.lock import DistributedLock, Held
from tests.runtime.conftest import FAST, PARTITIONS, ROOT, TOKENIZERS, Rig, appended, user

WORDS = " ".join(f"word{i}" for i in range(300))  # about 600 tokens a message
#: The CLI, with erase-tenant registered on it if cli.py does not yet.
RUNNER = (
    "from processors import erasecli\n"
    "from processors.cli import main\n"
    "if 'erase-tenant' not in main.commands:\n"
    "    erasecli.register(main)\n"
    "main()\n"
)


# An independent view of the whole namespace: every key and every text it holds.


def _nodes(client: RedisClient) -> list[Redis] | None:
    """A plain client per primary of a Cluster (None for a single server)."""
    if isinstance(client, RedisCluster):
        return [
            Redis(host=n.host, port=n.port, decode_responses=True) for n in client.get_primaries()
        ]
    return None


async def _texts(node: Redis | RedisClient, key: str) -> list[str]:
    kind = await node.type(key)
    if kind == "string":
        return [str(await node.get(key))]
    if kind == "hash":
        return [f"{f}={v}" for f, v in (await node.hgetall(key)).items()]
    if kind == "set":
        return sorted(str(m) for m in await node.smembers(key))
    if kind == "zset":
        return [f"{m}@{s}" for m, s in await node.zrange(key, 0, -1, withscores=True)]
    if kind == "list":
        return [str(i) for i in await node.lrange(key, 0, -1)]
    if kind == "stream":
        return [
            f"{entry_id} " + json.dumps(fields, sort_keys=True)
            for entry_id, fields in await node.xrange(key)
        ]
    if kind == "none":  # expired between SCAN and TYPE
        return []
    raise AssertionError(f"{key}: unexpected type {kind}")


async def dump(client: RedisClient, namespace: str) -> dict[str, list[str]]:
    """Every key of the namespace -> its texts; on a Cluster, SCAN on each primary."""
    nodes = _nodes(client)
    found: dict[str, list[str]] = {}
    for node in nodes if nodes is not None else [client]:
        cursor = 0
        while True:
            cursor, names = await node.scan(cursor, match=f"{namespace}:*", count=1000)
            for name in names:
                found[str(name)] = await _texts(node, str(name))
            if int(cursor) == 0:
                break
    for node in nodes or []:
        await node.aclose()
    return found


def traces(everything: dict[str, list[str]], needles: Iterable[str]) -> list[str]:
    """Where any of ``needles`` shows, in a key's name or in any of its texts."""
    return [
        f"{key}: {needle}"
        for key, texts in everything.items()
        for needle in needles
        if needle in key or any(needle in t for t in texts)
    ]


def streams(everything: dict[str, list[str]]) -> dict[str, list[str]]:
    kinds = ("ingest", "changes", "flush", "dlq", "lifecycle")
    return {k: v for k, v in everything.items() if k.split(":")[1] in kinds}


# The data of one tenant, made through the pipeline.


@dataclass
class Tenant:
    name: str
    secrets: tuple[str, str, str]

    def ref(self, key: str, resource: str = "customer-support") -> MemoryRef:
        return MemoryRef(self.name, resource, key)

    @property
    def refs(self) -> list[MemoryRef]:
        return [self.ref(k) for k in ("conv", "replaced", "backup", "summary", "queued")]


def _secret(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def _workflow() -> str:
    """A new workflow id of acme's that is kept as it is: no digits, so no redaction
    pattern of the resources (phone numbers, say) makes a pseudonym of it."""
    return "wf-acme-" + uuid.uuid4().hex[:12].translate(str.maketrans("0123456789", "ghijklmnop"))


async def _counted(rig: Rig, ref: MemoryRef) -> bool:
    view = await rig.reader.read(ref)
    return view.exists and view.counted == view.count


async def _summarized(rig: Rig, ref: MemoryRef) -> bool:
    return any(m.is_summary for m in (await rig.reader.read(ref)).messages)


async def build(rig: Rig, t: Tenant) -> None:
    """Appends (some by a workflow), a replace, a clear with a backup, a summary, dead
    letters, a held lock and a lifecycle event: with the three processors running."""
    a, b, c = t.secrets
    workflow = f"wf-{t.name}"
    conv = t.ref("conv")
    await rig.publisher.append(conv, user(f"my code is {a}"), workflow_id=workflow, wait=True)
    await rig.publisher.append(conv, user("plain"), wait=True)
    await rig.publisher.replace(
        t.ref("replaced"), [Message(role=Role.SYSTEM, content=f"remember {b}"), user(c)], wait=True
    )
    backup = t.ref("backup")
    await rig.publisher.append(backup, user(f"backed up {a}"), workflow_id=workflow, wait=True)
    cleared = await rig.publisher.clear(backup, backup=True, wait=True)
    assert cleared.outcome is not None and cleared.outcome.backup
    summary = t.ref("summary")
    for i in range(5):
        await rig.publisher.append(summary, user(f"{b} m{i}. {WORDS}"), wait=True)
    await rig.eventually(lambda: _counted(rig, summary), timeout=20, what="the accountant")
    await rig.publisher.request_flush(summary, strategy=FlushStrategy.HYBRID_SUMMARY, wait=True)
    await rig.eventually(lambda: _summarized(rig, summary), timeout=20, what="a summary")
    # Dead letters: an unknown resource, a misrouted event, an event that is not JSON.
    refused = await rig.publisher.append(t.ref("x", "no-such-resource"), user(c), wait=True)
    assert refused.outcome is not None and not refused.outcome.ok
    p = partition_for(conv.memory_id, PARTITIONS)
    misrouted = MessageAppended(
        tenant=t.name,
        payload=AppendPayload(
            memory=MemoryName(resource="customer-support", key="conv"), message=user(a)
        ),
    )
    wrong = rig.keys.ingest((p + 1) % PARTITIONS)
    await rig.client.xadd(wrong, {"event": event_json(misrouted)})
    await rig.client.xadd(wrong, {"event": f'{{"tenant": "{t.name}", "secret": "{c}", broken'})
    await rig.client.xadd(
        rig.keys.lifecycle,
        {
            "event": json.dumps(
                {
                    "schema_version": 2,
                    "type": "workflow.terminated",
                    "event_id": uuid.uuid4().hex,
                    "tenant": t.name,
                    "payload": {"workflow_id": workflow, "status": "completed"},
                }
            )
        },
    )
    held = await DistributedLock(rig.scripts, rig.keys).acquire(f"flush:{conv.memory_id}", 60)
    assert held is not None


async def leave_waiting(rig: Rig, tenants: tuple[Tenant, ...]) -> None:
    """With the accountant and the summarizer stopped: entries left in changes and flush;
    then with the appender stopped too, one left in ingest."""
    for t in tenants:
        queued = t.ref("queued")
        await rig.publisher.append(queued, user(f"waiting {t.secrets[0]}"), wait=True)
        await rig.publisher.request_flush(queued, strategy=FlushStrategy.FIFO, wait=True)
    await rig.stop("appender")
    for t in tenants:
        await rig.publisher.append(t.ref("queued"), user(f"never applied {t.secrets[1]}"))
        # A workflow this tenant ended (the cleanup processor's index), seeded directly.
        p = partition_for(t.ref("conv").memory_id, PARTITIONS)
        await rig.client.zadd(rig.keys.ended(p, t.name), {"wf-old": 9_999_999_999_999})


async def views(rig: Rig, t: Tenant) -> list[MemoryView]:
    return [await rig.reader.read(ref) for ref in t.refs]


def named(everything: dict[str, list[str]], tenant: str) -> dict[str, list[str]]:
    """The keys named for ``tenant``: its memories' keys and locks, its indexes."""
    return {k: v for k, v in everything.items() if f"{tenant}/" in k or k.endswith(f":{tenant}")}


async def test_erasing_a_tenant_leaves_nothing_of_it_and_all_of_the_other(
    rig: Rig, namespace: str
) -> None:
    erased_t = Tenant("zeta-corp", (_secret("pelican"), _secret("orchid"), _secret("quartz")))
    kept = Tenant("omega-inc", (_secret("walrus"), _secret("juniper"), _secret("basalt")))
    rig.start_all()
    for t in (erased_t, kept):
        await build(rig, t)
    await rig.stop("accountant")
    await rig.stop("summarizer")
    await leave_waiting(rig, (erased_t, kept))
    await rig.stop_all()

    before = await dump(rig.client, namespace)
    needles = (erased_t.name, *erased_t.secrets)
    # The scan sees the tenant everywhere it should (a check that can fail).
    assert {n for n in needles if traces(before, [n])} == set(needles)
    a_keys = {k.split(":", 1)[1].split(":", 1)[0] for k in named(before, erased_t.name)}
    assert {"m", "lock", "lockfence", "ended"} <= a_keys, a_keys
    suffixes = {k.rsplit(":", 1)[1] for k in named(before, erased_t.name) if ":m:" in k}
    assert {"log", "meta", "tomb", "idem", "tok", "backup"} <= suffixes
    assert await tenant_remnants(rig.client, rig.keys, erased_t.name)
    kept_views = await views(rig, kept)

    erased = await erase_tenant(rig.scripts, rig.keys, erased_t.name, partitions=PARTITIONS, page=3)

    # Everything of the tenant was found: entries of every stream kind, keys, outcomes.
    assert erased.ingest >= 1 and erased.changes >= 1 and erased.flush >= 1
    assert erased.dlq >= 3 and erased.lifecycle == 1
    assert erased.keys == len(named(before, erased_t.name))
    assert erased.outcomes >= 1
    assert await tenant_remnants(rig.client, rig.keys, erased_t.name) == []
    after = await dump(rig.client, namespace)
    assert traces(after, needles) == []
    # The other tenant: its memories read the same, its keys and entries are untouched.
    assert await views(rig, kept) == kept_views
    assert named(after, kept.name) == named(before, kept.name)
    assert traces(after, [kept.name, *kept.secrets]) == traces(before, [kept.name, *kept.secrets])
    expected = {k: [e for e in v if erased_t.name not in e] for k, v in streams(before).items()}
    assert streams(after) == expected
    shared = {k for k in before if k.split(":")[1] in ("config", "counters", "fence")}
    assert shared and shared <= set(after)
    # Untouched, but for the sweep mark the ingest sweep leaves in the counters.
    assert all([t for t in after[k] if not t.startswith("swept=")] == before[k] for k in shared)
    assert any(t.startswith("swept=") for k in shared if ":counters:" in k for t in after[k])

    # The workers carry on: the other tenant's waiting events are applied, and nothing of
    # the erased one comes back.
    rig.start_all()
    queued = kept.ref("queued")
    await rig.eventually(
        lambda: _has(rig, queued, f"never applied {kept.secrets[1]}"), what="the waiting append"
    )
    await rig.eventually(lambda: _counted(rig, queued), what="the accountant")
    await rig.stop_all()
    assert traces(await dump(rig.client, namespace), needles) == []
    assert await tenant_remnants(rig.client, rig.keys, erased_t.name) == []
    assert not (await rig.reader.read(erased_t.ref("queued"))).exists


async def _has(rig: Rig, ref: MemoryRef, text: str) -> bool:
    return text in await rig.contents(ref)


async def test_erasing_acme_leaves_acme2_intact(rig: Rig, namespace: str) -> None:
    # Nothing trimmed: every entry stays in ingest with its outcome, acme's after the others'.
    rig.start("appender", config=replace(FAST, loop=replace(FAST.loop, trim_interval=3600)))
    tenants = ("acme2", "acme.x", "acme")
    entries: dict[str, list[Receipt]] = {t: [] for t in tenants}
    for tenant in tenants:
        ref = MemoryRef(tenant, "customer-support", "k")
        unknown = MemoryRef(tenant, "no-such-resource", "k")
        for published in (
            await rig.publisher.append(ref, user(f"hi from {tenant}"), workflow_id="w", wait=True),
            await rig.publisher.append(unknown, user("x"), wait=True),
        ):
            assert published.receipt is not None
            entries[tenant].append(published.receipt)
        lock = DistributedLock(rig.scripts, rig.keys)
        assert await lock.acquire(f"flush:{ref.memory_id}", 60) is not None
        p = partition_for(ref.memory_id, PARTITIONS)
        await rig.client.zadd(rig.keys.ended(p, tenant), {"w-old": 9_999_999_999_999})
    await rig.stop_all()
    before = await dump(rig.client, namespace)
    others = {t: await rig.reader.read(MemoryRef(t, "customer-support", "k")) for t in tenants[:2]}
    for tenant in tenants:
        assert len(await _outcomes(rig, entries[tenant])) == 2

    erased = await erase_tenant(rig.scripts, rig.keys, "acme", partitions=PARTITIONS, page=1)

    assert erased.keys == len(named(before, "acme")) >= 7
    assert erased.ingest == 2 and erased.dlq == 1 and erased.outcomes >= 2
    assert await _outcomes(rig, entries["acme"]) == []
    after = await dump(rig.client, namespace)
    assert await tenant_remnants(rig.client, rig.keys, "acme") == []
    assert not (await rig.reader.read(MemoryRef("acme", "customer-support", "k"))).exists
    for tenant, view in others.items():
        assert await rig.reader.read(MemoryRef(tenant, "customer-support", "k")) == view
        assert named(after, tenant) == named(before, tenant)
        assert len(await _outcomes(rig, entries[tenant])) == 2
        assert await tenant_remnants(rig.client, rig.keys, tenant)
    assert set(before) - set(after) == set(named(before, "acme"))
    # A partition whose ingest lost entries gets its sweep mark, in its counters.
    assert all(":counters:" in k for k in set(after) - set(before))


async def _outcomes(rig: Rig, receipts: list[Receipt]) -> list[str]:
    """The outcomes recorded for these entries that are still there."""
    found = [
        await rig.client.hget(rig.keys.outcomes(r.partition, r.entry_id), r.entry_id)
        for r in receipts
    ]
    return [str(o) for o in found if o is not None]


async def test_the_outcomes_of_a_workflows_end_go_with_its_tenant(rig: Rig, namespace: str) -> None:
    """A workflow ended before the erasure: its lifecycle entry and its ends in the
    ingest streams are settled and trimmed, and only their outcomes, which name the
    workflow, are left of it."""
    workflow = _workflow()
    rig.start("appender")
    rig.start_cleanup()
    ref = MemoryRef("acme", "customer-support", "ended-before")
    await rig.publisher.append(ref, user("x"), workflow_id=workflow, wait=True)
    await rig.publisher.workflow_terminated("acme", workflow, wait=True)

    async def trimmed() -> bool:
        return traces(streams(await dump(rig.client, namespace)), [workflow]) == []

    await rig.eventually(trimmed, what="the ends to be trimmed")
    await rig.stop_all()
    left = traces(await dump(rig.client, namespace), [workflow])
    assert len([t for t in left if ":out:" in t]) == PARTITIONS + 1, left

    await erase_tenant(rig.scripts, rig.keys, "acme", partitions=PARTITIONS)

    assert traces(await dump(rig.client, namespace), [workflow]) == []
    assert await tenant_remnants(rig.client, rig.keys, "acme") == []


async def test_a_batch_read_before_the_erasure_and_applied_after_it_brings_nothing_back(
    rig: Rig,
) -> None:
    """The appender read a batch of the tenant's entries, then the erasure swept the
    streams and the keys, then the batch is applied (the interleaving of a slow
    appender): its entries are gone, so they are settled as erased, and another
    tenant's entry in the same batch is applied."""
    ref = MemoryRef("acme", "customer-support", "inflight")
    p = partition_for(ref.memory_id, PARTITIONS)
    other = next(
        r
        for i in range(10_000)
        if partition_for(
            (r := MemoryRef("acme2", "customer-support", f"k{i}")).memory_id, PARTITIONS
        )
        == p
    )
    await ensure_groups(rig.scripts, rig.keys, p)
    lease = await Leases(rig.scripts, rig.keys, Group.APPENDER.value, 10_000).acquire(p, "w1")
    assert lease is not None
    ingest = rig.keys.ingest(p)
    ended = WorkflowEnded(
        tenant="acme",
        payload=EndedPayload(workflow_id="wf-1", status=WorkflowStatus.COMPLETED, partition=p),
    )
    texts = [
        event_json(appended(ref, "secret-inflight")),
        event_json(appended(MemoryRef("acme", "no-such-resource", "k"), "secret-letter")),
        event_json(appended(other, "kept")),
        event_json(ended),
    ]
    ids = [str(await rig.client.xadd(ingest, {"event": t})) for t in texts]
    await rig.client.xreadgroup(Group.APPENDER.value, "w1", {ingest: ">"}, count=len(ids))
    # The batch as the appender builds it from what it read.
    batch = ApplyBatch(rig.keys, p)
    batch.append(
        Target(ids[0], ref.memory_id, 60_000, "ev-0", workflow="wf-1"),
        json.dumps({"role": "user", "content": "secret-inflight"}),
    )
    batch.dead_letter(
        ids[1],
        reason="unknown_resource",
        detail="no memory resource 'no-such-resource'",
        event=texts[1],
        source=ingest,
        memory_id="acme/no-such-resource/k",
    )
    batch.append(
        Target(ids[2], other.memory_id, 60_000, "ev-2"),
        json.dumps({"role": "user", "content": "kept"}),
    )
    memory = Target("", ref.memory_id, 60_000, "")
    batch.ended(Ending(ids[3], "ev-3", "acme", "wf-1", [memory]))

    erased = await erase_tenant(rig.scripts, rig.keys, "acme", partitions=PARTITIONS)
    assert erased.ingest == 3

    store = MemoryStore(rig.scripts, rig.keys, Retention())
    assert await store.apply(lease, batch) == ["erased", "erased", "applied", "erased"]
    assert await tenant_remnants(rig.client, rig.keys, "acme") == []
    assert not (await rig.reader.read(ref)).exists
    assert await rig.contents(other) == ["kept"]
    pending = await rig.client.xpending(ingest, Group.APPENDER.value)
    assert pending["pending"] == 0
    for entry_id in (ids[0], ids[1], ids[3]):
        outcome = await rig.reader.outcome(p, entry_id)
        assert outcome is not None and outcome.status == "erased"


# The cleanup processor at work during the erasure.


def _in_partition(tenant: str, p: int) -> MemoryRef:
    return next(
        ref
        for i in range(10_000)
        if partition_for(
            (ref := MemoryRef(tenant, "customer-support", f"later{i}")).memory_id, PARTITIONS
        )
        == p
    )


async def _drained(rig: Rig) -> None:
    """Every ingest entry published so far is settled: an append published now to each
    partition is applied after them (stream order)."""
    for p in range(PARTITIONS):
        published = await rig.publisher.append(_in_partition("acme2", p), user("x"), wait=True)
        assert published.outcome is not None and published.outcome.ok, published.outcome


@dataclass
class HeldEnd:
    """The cleanup processor's step of sending a workflow's end, held at its start until
    ``release`` is set; ``sent`` is what it sent, once it has."""

    reached: asyncio.Event
    release: asyncio.Event
    sent: list[Receipt]


def hold_ends(rig: Rig) -> HeldEnd:
    real = rig.publisher.end_workflow
    held = HeldEnd(asyncio.Event(), asyncio.Event(), [])

    async def end_workflow(event: WorkflowTerminated) -> list[Receipt]:
        held.reached.set()
        await held.release.wait()
        receipts = await real(event)
        held.sent.extend(receipts)
        return receipts

    rig.publisher.end_workflow = end_workflow  # type: ignore[method-assign]
    return held


async def _lifecycle_settled(rig: Rig) -> bool:
    """The cleanup group holds no pending entry of the lifecycle stream."""
    return int((await rig.client.xpending(rig.keys.lifecycle, Group.CLEANUP.value))["pending"]) == 0


async def test_an_end_the_cleanup_processor_sends_during_the_erasure_leaves_nothing(
    rig: Rig, namespace: str
) -> None:
    """The cleanup processor read the tenant's workflow.terminated before the erasure and
    sends its end into the ingest streams while the erasure runs: the erasure waits for
    that step, then sweeps what it sent."""
    workflow = _workflow()
    ref = MemoryRef("acme", "customer-support", "ended-during-erasure")
    kept = MemoryRef("acme2", "customer-support", "kept")
    rig.start("appender")
    rig.start_cleanup()
    await rig.publisher.append(ref, user("hello"), workflow_id=workflow, wait=True)
    await rig.publisher.append(kept, user("keep me"), wait=True)
    held = hold_ends(rig)
    terminated = await rig.publisher.workflow_terminated("acme", workflow)
    assert terminated.receipt is not None
    await asyncio.wait_for(held.reached.wait(), 10)

    seen: list[list[InFlight]] = []

    def waiting(found: list[InFlight]) -> None:
        seen.append(found)
        held.release.set()  # the erasure waits for the step: let it go on

    erasure = asyncio.create_task(
        erase_tenant(rig.scripts, rig.keys, "acme", partitions=PARTITIONS, waiting=waiting)
    )
    erasure.add_done_callback(lambda _: held.release.set())
    erased = await erasure

    assert len(held.sent) == PARTITIONS, "the erasure finished before the end was sent"
    entry = terminated.receipt.entry_id
    assert seen == [[InFlight(rig.keys.lifecycle, "cleanup", "cleanup", (entry,))]]
    assert erased.lifecycle == 1 and erased.unsettled == ()
    await _drained(rig)
    assert await _lifecycle_settled(rig)
    assert await tenant_remnants(rig.client, rig.keys, "acme") == []
    assert traces(await dump(rig.client, namespace), [workflow, "acme/"]) == []
    assert await rig.contents(kept) == ["keep me"]


async def test_an_erasure_does_not_wait_for_a_dead_cleanup_worker_and_its_heir_sends_nothing(
    rig: Rig, namespace: str
) -> None:
    """A cleanup worker read the tenant's workflow.terminated and died (its lease gone,
    the entry pending for it): the erasure removes the entry without waiting, and the
    next holder settles it as erased without sending the end anywhere."""
    workflow = _workflow()
    await ensure_groups(rig.scripts, rig.keys, 0)
    terminated = await rig.publisher.workflow_terminated("acme", workflow)
    assert terminated.receipt is not None
    entry = terminated.receipt.entry_id
    read = await rig.client.xreadgroup(
        Group.CLEANUP.value, "dead-worker", {rig.keys.lifecycle: ">"}, count=10
    )
    assert read and [str(i) for i, _ in read[0][1]] == [entry]

    # It would wait a minute for the dead worker's entry: it waits for none.
    erased = await asyncio.wait_for(
        erase_tenant(rig.scripts, rig.keys, "acme", partitions=PARTITIONS, wait=60), 20
    )

    assert erased.lifecycle == 1 and erased.unsettled == ()
    # The entry is gone, its id still pending for the dead worker: an id, no data.
    assert await rig.client.xrange(rig.keys.lifecycle) == []
    pending = await rig.client.xpending_range(rig.keys.lifecycle, Group.CLEANUP.value, "-", "+", 10)
    assert [(str(p["message_id"]), str(p["consumer"])) for p in pending] == [(entry, "dead-worker")]
    assert await tenant_remnants(rig.client, rig.keys, "acme") == []
    assert traces(await dump(rig.client, namespace), [workflow]) == []

    rig.start("appender")
    held = hold_ends(rig)
    held.release.set()
    rig.start_cleanup()
    await rig.eventually(lambda: _lifecycle_settled(rig), what="the heir to settle it")
    await _drained(rig)
    assert held.sent == [] and not held.reached.is_set()
    outcome = await rig.reader.outcome(0, entry, group=Group.CLEANUP)
    assert outcome is not None and outcome.status == "erased", outcome
    assert await tenant_remnants(rig.client, rig.keys, "acme") == []
    assert traces(await dump(rig.client, namespace), [workflow, "acme/"]) == []


async def test_remnants_are_found_in_every_kind_of_value(rig: Rig) -> None:
    ns = rig.keys.namespace
    mentions = {
        f"{ns}:x:{{0}}:string": "memory acme/customer-support/k",
        f"{ns}:x:{{0}}:hash": '{"tenant": "acme", "type": "x"}',
        f"{ns}:x:{{1}}:set": "acme\\/customer-support\\/k",
        f"{ns}:x:{{2}}:zset": "see acme/r/k",
        f"{ns}:x:{{3}}:list": "acme/r/k",
        f"{ns}:x:{{3}}:stream": '{"event": "{\\"tenant\\":\\"acme\\"}"}',
        f"{ns}:x:{{0}}:acme": "nothing in it",
    }
    for tenant in ("acme", "acme2"):
        for name, value in mentions.items():
            key = name.replace(":x:", f":x-{tenant}-:") if tenant == "acme2" else name
            text = value.replace("acme", tenant)
            kind = name.rsplit(":", 1)[1]
            if kind == "hash":
                await rig.client.hset(key, "f", text)
            elif kind == "set":
                await rig.client.sadd(key, text)
            elif kind == "zset":
                await rig.client.zadd(key, {text: 1})
            elif kind == "list":
                await rig.client.rpush(key, "other", text)
            elif kind == "stream":
                await rig.client.xadd(key, {"event": text})
            else:
                await rig.client.set(key.replace(":acme", f":{tenant}"), text)
    found = await tenant_remnants(rig.client, rig.keys, "acme")
    assert sorted(f.split(" ", 1)[0].rstrip(":") for f in found) == sorted(mentions), found
    assert all("acme2" not in f for f in found)


@pytest.mark.parametrize(
    ("name", "owned"),
    [
        ("ms:m:{3}:acme/customer-support/k:log", True),
        ("ms:m:{3}:acme/customer-support/k~0123:backup", True),
        ("ms:tenant:{0}:acme", True),
        ("ms:resource:{1}:acme/customer-support", True),
        ("ms:wf:{2}:acme/flow/1", True),
        ("ms:ended:{0}:acme", True),
        ("ms:lock:{flush:acme/customer-support/k}", True),
        ("ms:lockfence:{flush:acme/customer-support/k}", True),
        ("ms:m:{3}:acme2/customer-support/k:log", False),
        ("ms:m:{3}:xacme/customer-support/k:log", False),
        ("ms:tenant:{0}:acme2", False),
        ("ms:resource:{1}:acme2/customer-support", False),
        ("ms:lock:{flush:acme2/customer-support/k}", False),
        ("ms:lease:{0}:acme", False),
        ("ms:members:acme", False),
        ("ms:counters:{0}", False),
        ("ms:config", False),
        ("ms:ingest:{0}", False),
        ("other:m:{3}:acme/customer-support/k:log", False),
        ("ms:x:m:{3}:acme/customer-support/k:log", False),
    ],
)
def test_only_the_tenants_own_keys_are_its(name: str, owned: bool) -> None:
    assert TenantMatch.of(Keys("ms"), "acme").owns_key(name) is owned


@pytest.mark.parametrize(
    ("name", "lock"),
    [
        ("ms:m:{3}:acme/customer-support/k:log", "flush:acme/customer-support/k"),
        ("ms:m:{3}:acme/customer-support/k~0123:backup", "flush:acme/customer-support/k~0123"),
        ("ms:lock:{flush:acme/customer-support/k}", "flush:acme/customer-support/k"),
        ("ms:lockfence:{flush:acme/customer-support/k}", "flush:acme/customer-support/k"),
        ("ms:tenant:{0}:acme", ""),
        ("ms:ended:{0}:acme", ""),
    ],
)
def test_the_lock_of_each_of_the_tenants_keys_is_named(name: str, lock: str) -> None:
    assert TenantMatch.of(Keys("ms"), "acme").lock_name(name) == lock


def test_events_and_texts_of_the_tenant_are_told_from_others() -> None:
    match = TenantMatch.of(Keys("ms"), "acme")
    assert match.owns_event('{"tenant": "acme", "type": "x"}')
    assert match.owns_event('{"tenant": "\\u0061cme"}')
    assert not match.owns_event('{"tenant": "acme2", "note": "acme/x/y"}')
    assert match.owns_event('{"tenant":"acme", broken')
    assert not match.owns_event('{"tenant":"acme2", broken')
    assert match.mentions('{"detail":"memory acme\\/customer-support\\/k"}')
    assert not match.mentions("memory acme2/customer-support/k, or xacme/r/k")
    assert match.owns_letter({"memory": "acme/r/k", "event": "garbage"})
    assert not match.owns_letter({"memory": "acme2/r/k", "event": '{"tenant": "acme2"}'})
    for bad in ("", "*", "a/b", "a:b", "{0}"):
        with pytest.raises(InvalidReferenceError):
            TenantMatch.of(Keys("ms"), bad)


# The command line.


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
    )
    return subprocess.run(
        [sys.executable, "-c", RUNNER, "erase-tenant", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def test_the_cli_needs_yes_then_prints_the_counts(
    rig: Rig, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    rig.start("appender")
    ref = MemoryRef("acme", "customer-support", "cli")
    await rig.publisher.append(ref, user("forget me"), wait=True)
    await rig.publisher.append(
        MemoryRef("acme2", "customer-support", "cli"), user("keep"), wait=True
    )
    await rig.stop_all()
    before = await dump(rig.client, namespace)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _cli(redis_url, namespace, tmp_path, *args)

    refused = await asyncio.to_thread(run, "acme")
    assert refused.returncode == 2, refused.stderr
    assert "--yes" in refused.stderr and "acme" in refused.stderr
    assert await dump(rig.client, namespace) == before
    invalid = await asyncio.to_thread(run, "no/such", "--yes")
    assert invalid.returncode == 2 and "TENANT" in invalid.stderr

    done = await asyncio.to_thread(run, "acme", "--yes", "--json", "--verify")
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["tenant"] == "acme" and counts["remnants"] == []
    assert counts["keys"] == len(named(before, "acme")) > 0
    assert set(counts["entries"]) == {"ingest", "changes", "flush", "dlq", "lifecycle"}
    assert counts["outcomes"] >= 0
    assert not (await rig.reader.read(ref)).exists
    assert (await rig.reader.read(MemoryRef("acme2", "customer-support", "cli"))).count == 1

    # What erasure does not know is still found by --verify (exit 1, listed).
    stray = f"{namespace}:stray:acme"
    await rig.client.set(stray, "left behind")
    found = await asyncio.to_thread(run, "acme", "--yes", "--verify")
    assert found.returncode == 1 and f"remains: {stray}" in found.stderr, found.stderr
    await rig.client.delete(stray)
    again = await asyncio.to_thread(run, "acme", "--yes", "--verify")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("erased tenant acme: 0 stream entries")
    assert "verified" in again.stdout


class HeldLock(DistributedLock):
    """Takes a lock only once ``release`` is set (``reached``: it was asked for one)."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(rig.scripts, rig.keys)
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def acquire(self, name: str, ttl: float, *, wait: float = 0.0) -> Held | None:
        self.reached.set()
        await self.release.wait()
        return await super().acquire(name, ttl, wait=wait)


async def _flushes_settled(rig: Rig) -> bool:
    for p in range(PARTITIONS):
        pending = await rig.client.xpending(rig.keys.flush(p), Group.SUMMARIZER.value)
        if int(pending["pending"]):
            return False
    return True


async def test_a_flush_the_summarizer_read_before_the_erasure_leaves_no_lock(
    rig: Rig, namespace: str
) -> None:
    """The summarizer read a flush request of the tenant's memory before the erasure and
    takes the memory's lock (a new fence key) once the erasure removed the memory: the
    erasure waits for that flush, then removes the lock again."""
    lock = HeldLock(rig)
    flushes = Flushes(rig.scripts, rig.keys)
    rig.start("appender")
    rig.start("summarizer", Summarizer(flushes, rig.registry, TOKENIZERS, lock=lock))
    ref = MemoryRef("acme", "customer-support", "flushed")
    for i in range(3):
        await rig.publisher.append(ref, user(f"message {i}"), wait=True)
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, wait=True)
    await asyncio.wait_for(lock.reached.wait(), 10)

    seen: list[list[InFlight]] = []

    def waiting(found: list[InFlight]) -> None:
        seen.append(found)
        lock.release.set()

    erasure = asyncio.create_task(
        erase_tenant(rig.scripts, rig.keys, "acme", partitions=PARTITIONS, waiting=waiting)
    )
    erasure.add_done_callback(lambda _: lock.release.set())
    erased = await erasure
    await rig.eventually(lambda: _flushes_settled(rig), what="the flush to end")

    p = partition_for(ref.memory_id, PARTITIONS)
    assert [[(f.stream, f.group) for f in found] for found in seen] == [
        [(rig.keys.flush(p), "summarizer")]
    ]
    assert erased.flush == 1 and erased.unsettled == ()
    assert await tenant_remnants(rig.client, rig.keys, "acme") == []
    assert traces(await dump(rig.client, namespace), ["acme/"]) == []


async def test_the_cli_says_when_it_gave_up_waiting_for_the_cleanup_processor(
    rig: Rig, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    workflow = _workflow()
    rig.start("appender")
    rig.start_cleanup()
    held = hold_ends(rig)
    terminated = await rig.publisher.workflow_terminated("acme", workflow)
    assert terminated.receipt is not None
    entry = terminated.receipt.entry_id
    await asyncio.wait_for(held.reached.wait(), 10)

    gave_up = await asyncio.to_thread(
        _cli, redis_url, namespace, tmp_path, "acme", "--yes", "--verify", "--wait", "0.5"
    )
    assert gave_up.returncode == 1, gave_up.stderr
    in_flight = f"cleanup worker cleanup: 1 entry of {rig.keys.lifecycle}"
    assert (
        f"waiting up to 0.5s for what processors read before an erasure removed it: "
        f"{in_flight}\n" in gave_up.stderr
    )
    assert f"still in flight after 0.5s: {in_flight} ({entry})." in gave_up.stderr
    assert "run erase-tenant again" in gave_up.stderr and "verified" not in gave_up.stdout
    # Run again while the step is still in flight: it waits for it too (and gives up).
    as_json = await asyncio.to_thread(
        _cli, redis_url, namespace, tmp_path, "acme", "--yes", "--json", "--wait", "0"
    )
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["unsettled"] == [
        {"stream": rig.keys.lifecycle, "group": "cleanup", "worker": "cleanup", "entries": [entry]}
    ]

    # The step goes on after the erasure: its end names the tenant again, as announced.
    held.release.set()
    await rig.eventually(lambda: _lifecycle_settled(rig), what="the cleanup step")
    await _drained(rig)
    assert len(held.sent) == PARTITIONS
    assert await tenant_remnants(rig.client, rig.keys, "acme")
    again = await asyncio.to_thread(
        _cli, redis_url, namespace, tmp_path, "acme", "--yes", "--verify"
    )
    assert again.returncode == 0, again.stderr
    assert "verified" in again.stdout and "waiting" not in again.stderr
    assert traces(await dump(rig.client, namespace), [workflow, "acme/"]) == []
