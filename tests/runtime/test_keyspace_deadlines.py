"""Every key of a memory carries a deadline (DESIGN rule 7), whatever wrote it.

A scenario runs through the real processors (appender, accountant, summarizer, cleanup):
appends, flushes of every strategy (one folding every message of its memory), reads
into a context, a dry run, clears with a backup and a restore, erases, a replace,
deletes, and workflow ends under each cleanup policy; then a repartition moves the
memories. The namespace is scanned before and after the move: every key without a TTL
must be one of the partition-wide keys that live as long as the deployment, listed in
docs/concepts.md ("Keys without a deadline")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memory import FlushStrategy, MemoryRef, ResourceRegistry, partition_for
from processors import opscli
from store import Flushes, Repartitioner
from store.keys import SINGLE_PARTITION_TOPICS, TOPIC_GROUPS
from tests.runtime.conftest import FAST, PARTITIONS, ROOT, TOKENIZERS, Rig, user

WORDS = " ".join(f"word{i}" for i in range(300))  # about 600 tokens a message
DOCS = ROOT / "docs" / "concepts.md"

#: The keys that carry no deadline by design, by kind (what follows the namespace):
#: they belong to the deployment or to a partition, never to one memory.
NO_DEADLINE = {
    "config": r"config",
    "members": r"members:[a-z]+",
    "circuits": r"circuits:[a-z]+",
    "apikeys": r"apikeys",
    "ingest": r"ingest:\{\d+\}",
    "changes": r"changes:\{\d+\}",
    "flush": r"flush:\{\d+\}",
    "dlq": r"dlq:\{\d+\}",
    "lifecycle": r"lifecycle:\{0\}",
    "counters": r"counters:\{\d+\}",
    "pcount": r"pcount:\{\d+\}",
    "fence": r"fence:\{\d+\}:[a-z]+",
    "released": r"released:\{\d+\}:[a-z]+",
    "attempts": r"attempts:\{\d+\}:[a-z]+",
    "held": r"held:\{\d+\}:[a-z]+",
}

RESOURCES = {
    "ks-delete": "cleanup: {on_workflow_end: delete}\npersistence: {ttl: 1h}\n",
    "ks-expire": "cleanup: {on_workflow_end: expire, grace: 1h}\npersistence: {ttl: 2h}\n",
}


def mem(resource: str, key: str) -> MemoryRef:
    return MemoryRef("acme", resource, key)


async def meta(rig: Rig, ref: MemoryRef) -> dict[str, str]:
    p = await rig.reader.partition_of(ref)
    return dict(await rig.client.hgetall(rig.keys.memory(p, ref.memory_id).meta))


async def append(rig: Rig, ref: MemoryRef, text: str, workflow: str | None = None) -> int:
    published = await rig.publisher.append(ref, user(text), workflow_id=workflow, wait=True)
    assert published.outcome is not None and published.outcome.ok, published.outcome
    assert published.outcome.seq is not None
    return published.outcome.seq


async def flush(
    rig: Rig, ref: MemoryRef, strategy: FlushStrategy, *, dry_run: bool = False
) -> None:
    published = await rig.publisher.request_flush(
        ref, strategy=strategy, dry_run=dry_run, wait=True
    )
    assert published.outcome is not None and published.outcome.ok, published.outcome
    field = "last_flush_note" if dry_run else "flushes"

    async def ended() -> bool:
        return field in await meta(rig, ref)

    await rig.eventually(ended, timeout=20, what=f"the {strategy.value} flush of {ref.key}")


async def flushes_of_every_strategy(rig: Rig) -> None:
    resource = rig.registry["customer-support"]
    counter = TOKENIZERS.for_resource(resource)
    for strategy in FlushStrategy:
        ref = mem("customer-support", f"flush-{strategy.value}")
        for i in range(5):  # ~3000 tokens: under the threshold, over the target
            await append(rig, ref, f"{strategy.value} {i} {WORDS}", "wf-keep")
        # Uses recorded for lru / lfu, by a context read and by a read with touch.
        await rig.reader.read_context(ref, resource, counter, budget=1500)
        await rig.reader.read(ref, last=2, touch=True)
        await flush(rig, ref, strategy)
    # Every message folded into one summary: the log is emptied, then written again.
    whole = mem("customer-support", "flush-all")
    await append(rig, whole, " ".join([WORDS] * 5), "wf-keep")
    await flush(rig, whole, FlushStrategy.HYBRID_SUMMARY)
    await flush(rig, mem("customer-support", "flush-fifo"), FlushStrategy.FIFO, dry_run=True)
    # A budget flush: the accountant trips the threshold.
    budget = mem("customer-support", "flush-budget")
    for i in range(7):
        await append(rig, budget, f"budget {i} {WORDS}", "wf-keep")

    async def tripped() -> bool:
        return "flushes" in await meta(rig, budget)

    await rig.eventually(tripped, timeout=20, what="a budget flush")
    await rig.reader.touches_done()


async def erase_a_summarized_message(rig: Rig) -> None:
    ref = mem("customer-support", f"flush-{FlushStrategy.HYBRID_SUMMARY.value}")
    view = await rig.reader.read(ref)
    summary = next(m for m in view.messages if m.is_summary)
    assert summary.covers
    erased = await rig.publisher.erase(ref, summary.covers[0], wait=True)
    assert erased.outcome is not None and erased.outcome.ok, erased.outcome


async def clear_and_restore(rig: Rig, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    ref = mem("customer-support", "backup")
    seqs = [await append(rig, ref, f"kept {i}", "wf-live") for i in range(3)]
    cleared = await rig.publisher.clear(ref, backup=True, wait=True)
    assert cleared.outcome is not None and cleared.outcome.backup, cleared.outcome
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    await opscli.restore(ref, cleared.outcome.backup, 10.0, True)
    assert [str(m.content) for m in (await rig.reader.read(ref)).messages] == [
        f"kept {i}" for i in range(3)
    ]
    # Erase reaches the backup too; a second clear with a backup replaces it.
    erased = await rig.publisher.erase(ref, seqs[0], wait=True)
    assert erased.outcome is not None and erased.outcome.ok
    again = await rig.publisher.clear(ref, backup=True, wait=True)
    assert again.outcome is not None and again.outcome.backup


async def replace_and_delete(rig: Rig) -> None:
    ref = mem("customer-support", "replaced")
    await append(rig, ref, "before")
    replaced = await rig.publisher.replace(ref, [user("after"), user("and more")], wait=True)
    assert replaced.outcome is not None and replaced.outcome.ok
    gone = mem("customer-support", "deleted")
    await append(rig, gone, "soon gone")
    deleted = await rig.publisher.delete(gone, wait=True)
    assert deleted.outcome is not None and deleted.outcome.ok


async def workflows_end(rig: Rig) -> None:
    for i in range(3):
        await append(rig, mem("ks-delete", f"del-{i}"), f"delete me {i}", "wf-del")
        await append(rig, mem("ks-expire", f"exp-{i}"), f"expire me {i}", "wf-exp")
    await append(rig, mem("patient-intake", "intake"), "my knee hurts", "wf-exp")
    await append(rig, mem("ks-expire", "shared"), "from a live one", "wf-live")
    await append(rig, mem("ks-expire", "shared"), "and from one that ends", "wf-exp")
    cleared = await rig.publisher.clear(mem("ks-expire", "exp-0"), backup=True, wait=True)
    assert cleared.outcome is not None and cleared.outcome.backup
    await append(rig, mem("ks-expire", "exp-0"), "again", "wf-exp")
    for workflow in ("wf-del", "wf-exp", "wf-keep"):
        ended = await rig.publisher.workflow_terminated("acme", workflow, wait=True)
        assert ended.outcome is not None and ended.outcome.ok, ended.outcome
    assert not (await rig.reader.read(mem("ks-delete", "del-0"))).exists
    assert "expire_at" in await meta(rig, mem("ks-expire", "exp-1"))
    late = await rig.publisher.append(mem("ks-delete", "del-0"), user("late"), workflow_id="wf-del")
    assert late.receipt is not None  # refused by the appender: a dead letter


async def quiet(rig: Rig) -> bool:
    """Every entry of every stream delivered to its group and acknowledged."""
    for topic in TOPIC_GROUPS:
        partitions = [0] if topic in SINGLE_PARTITION_TOPICS else range(PARTITIONS)
        for p in partitions:
            stream = rig.keys.topic(topic, p)
            if not await rig.client.exists(stream):
                continue
            last = (await rig.client.xinfo_stream(stream))["last-generated-id"]
            for group in await rig.client.xinfo_groups(stream):
                if int(group["pending"]) or group["last-delivered-id"] != last:
                    return False
    return True


async def without_deadline(rig: Rig) -> tuple[dict[str, str], set[str]]:
    """The keys of the namespace without a TTL (name -> type), and every kind seen."""
    ns = rig.keys.namespace
    found: dict[str, str] = {}
    kinds: set[str] = set()
    async for raw in rig.client.scan_iter(match=f"{ns}:*", count=1000):
        name = str(raw)
        rest = name[len(ns) + 1 :]
        kind = rest.split(":", 1)[0]
        kinds.add(f"m:{rest.rsplit(':', 1)[1]}" if kind == "m" else kind)
        if int(await rig.client.pttl(name)) == -1:
            found[name] = str(await rig.client.type(name))
    return found, kinds


@pytest.fixture
async def scenario_rig(rig: Rig, tmp_path: Path) -> Rig:
    for name, body in RESOURCES.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"resource: memory\nid: {name}\nmax_tokens: 100000\n{body}", encoding="utf-8"
        )
    rig.registry = ResourceRegistry.load([ROOT / "memories", tmp_path])
    rig.start_all()
    rig.start_cleanup()
    return rig


async def test_every_key_a_scenario_leaves_has_a_deadline_or_is_partition_wide(
    scenario_rig: Rig, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = scenario_rig
    env = {
        "REDIS_URL": redis_url,
        "MEMSTREAM_NAMESPACE": rig.keys.namespace,
        "MEMSTREAM_RESOURCES": f"{ROOT / 'memories'}:{tmp_path}",
        "MEMSTREAM_STRICT_SCRIPT_KEYS": "1",
    }
    await flushes_of_every_strategy(rig)
    await erase_a_summarized_message(rig)
    await clear_and_restore(rig, monkeypatch, env)
    await replace_and_delete(rig)
    await workflows_end(rig)
    await rig.eventually(lambda: quiet(rig), timeout=30, what="every stream to be processed")
    await rig.stop_all()
    before, _ = await without_deadline(rig)
    # Moving every memory to another partition count keeps every deadline too.
    tool = Repartitioner(rig.client, rig.scripts, rig.keys, member_ttl_ms=FAST.lease_ttl_ms)
    assert (await tool.run(PARTITIONS * 2)).moved > 0

    found, kinds = await without_deadline(rig)
    found |= before
    allowed = re.compile(rf"^{re.escape(rig.keys.namespace)}:(?:{'|'.join(NO_DEADLINE.values())})$")
    undocumented = {name: kind for name, kind in found.items() if not allowed.match(name)}
    assert not undocumented, "keys without a deadline:\n" + "\n".join(
        f"  {name} ({kind})" for name, kind in sorted(undocumented.items())
    )
    # The scenario did reach every kind of key a memory has, and its indexes.
    memory_kinds = {"m:log", "m:meta", "m:tok", "m:tomb", "m:idem", "m:backup"}
    indexes = {"tenant", "resource", "wf", "ended", "out", "lockfence"}
    assert memory_kinds | indexes <= kinds, sorted(kinds)
    whole = mem("customer-support", "flush-all")
    snapshot = await Flushes(rig.scripts, rig.keys).snapshot(
        partition_for(whole.memory_id, PARTITIONS * 2), whole.memory_id
    )
    assert [m.is_summary for m in snapshot.messages] == [True]  # moved, and alone


def test_the_keys_without_a_deadline_are_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert "### Keys without a deadline" in text
    section = text.split("### Keys without a deadline", 1)[1].split("\n#", 1)[0]
    missing = [kind for kind in NO_DEADLINE if f"`ms:{kind}" not in section]
    assert not missing, f"{DOCS}: document the keys {missing} (or give them a deadline)"
