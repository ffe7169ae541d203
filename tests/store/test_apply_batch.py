"""apply_batch.lua: the appender's one fenced step, run against real Redis 6.2 and 7.x."""

from __future__ import annotations

import json

import pytest

from store import (
    ApplyBatch,
    Group,
    Keys,
    Lease,
    LeaseLostError,
    Leases,
    MemoryReader,
    MemoryStore,
    RedisClient,
    Retention,
    Scripts,
    Target,
    ensure_groups,
    ensure_partitions,
)

P = 0
MEM = "acme/customer-support/k1"
TTL = 60_000


@pytest.fixture
async def setup(client: RedisClient, scripts: Scripts, keys: Keys) -> tuple[MemoryStore, Lease]:
    await ensure_partitions(client, keys, 1)
    await ensure_groups(scripts, keys, P)
    lease = await Leases(scripts, keys, Group.APPENDER.value, 10_000).acquire(P, "w1")
    assert lease is not None
    return MemoryStore(scripts, keys, Retention()), lease


async def publish(client: RedisClient, keys: Keys, n: int = 1) -> list[str]:
    """Put n raw entries in the stream and deliver them to consumer w1."""
    ids = [str(await client.xadd(keys.ingest(P), {"event": "{}"})) for _ in range(n)]
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(P): ">"}, count=n)
    return ids


def target(entry_id: str, key: str | None = None, memory: str = MEM) -> Target:
    return Target(entry_id, memory, TTL, f"ev-{entry_id}", idempotency_key=key)


def msg(text: str) -> str:
    return json.dumps({"role": "user", "content": text})


async def contents(client: RedisClient, keys: Keys, memory: str = MEM) -> list[str]:
    members = await client.zrange(keys.memory(P, memory).log, 0, -1)
    return [json.loads(m)["content"] for m in members]


async def test_appends_apply_in_order_with_increasing_sequences(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 3)
    batch = ApplyBatch(keys, P)
    for i, entry_id in enumerate(ids):
        batch.append(target(entry_id), msg(f"m{i}"))
    assert await store.apply(lease, batch) == ["applied"] * 3
    assert await contents(client, keys) == ["m0", "m1", "m2"]
    stored = [json.loads(m) for m in await client.zrange(keys.memory(P, MEM).log, 0, -1)]
    assert [m["seq"] for m in stored] == [1, 2, 3]
    assert [m["entry"] for m in stored] == ids
    assert await client.xpending(keys.ingest(P), Group.APPENDER.value) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    meta = await client.hgetall(keys.memory(P, MEM).meta)
    assert meta["count"] == "3" and meta["gen"] == "1"
    tomb = await client.hgetall(keys.memory(P, MEM).tomb)
    assert tomb["wm"] == ids[-1]
    # One change names the batch's three messages of the memory.
    changes = await client.xrange(keys.changes(P))
    assert [(c[1]["type"], c[1]["seqs"], c[1]["gen"]) for c in changes] == [
        ("appended", "1,2,3", "1")
    ]
    assert "seq" not in changes[0][1] and changes[0][1]["entry"] == ids[-1]


async def test_appended_changes_follow_each_memory_and_generation_in_order(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    """A memory's appends make one change per generation, written before the change
    that starts the next one; a memory with one append keeps the one-message form."""
    store, lease = setup
    other = "acme/customer-support/k2"
    ids = await publish(client, keys, 6)
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0]), msg("a"))
    batch.append(target(ids[1], memory=other), msg("x"))
    batch.append(target(ids[2]), msg("b"))
    batch.command("clear", target(ids[3]))
    batch.append(target(ids[4]), msg("c"))
    batch.append(target(ids[5]), msg("d"))
    assert await store.apply(lease, batch) == ["applied"] * 6
    seqs = {
        m: [json.loads(x)["seq"] for x in await client.zrange(keys.memory(P, m).log, 0, -1)]
        for m in (MEM, other)
    }
    changes = [f for _, f in await client.xrange(keys.changes(P))]
    assert [(f["type"], f["memory"], f["gen"], f.get("seqs") or f.get("seq")) for f in changes] == [
        ("appended", MEM, "1", "1,3"),
        ("cleared", MEM, "3", None),
        ("appended", other, "2", "2"),
        ("appended", MEM, "3", "4,5"),
    ]
    assert seqs == {MEM: [4, 5], other: [2]}


async def test_redelivered_entries_at_or_below_the_watermark_are_skipped(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 2)
    first = ApplyBatch(keys, P)
    first.append(target(ids[0]), msg("a"))
    first.append(target(ids[1]), msg("b"))
    await store.apply(lease, first)
    again = ApplyBatch(keys, P)
    again.append(target(ids[0]), msg("a"))
    again.append(target(ids[1]), msg("b"))
    assert await store.apply(lease, again) == ["skipped", "skipped"]
    assert await contents(client, keys) == ["a", "b"]
    reader = MemoryReader(client, store._scripts, keys)
    outcome = await reader.outcome(P, ids[0])
    assert outcome is not None and outcome.status == "applied" and outcome.seq == 1


async def test_a_repeated_idempotency_key_is_applied_once(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 3)
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0], key="k"), msg("once"))
    batch.append(target(ids[1], key="k"), msg("once"))
    await store.apply(lease, batch)
    later = ApplyBatch(keys, P)
    later.append(target(ids[2], key="k"), msg("once"))
    assert await store.apply(lease, later) == ["duplicate"]
    assert await contents(client, keys) == ["once"]


async def test_the_idempotency_key_survives_a_delete(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 3)
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0], key="k"), msg("x"))
    batch.command("delete", target(ids[1]))
    batch.append(target(ids[2], key="k"), msg("x"))
    assert await store.apply(lease, batch) == ["applied", "applied", "duplicate"]
    assert not await client.exists(keys.memory(P, MEM).log, keys.memory(P, MEM).meta)
    assert await client.hget(keys.memory(P, MEM).tomb, "reset") == ids[1]


async def test_a_stale_lease_changes_nothing(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 1)
    stale = Lease(P, lease.group, "0:someone:else")
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0]), msg("never"))
    with pytest.raises(LeaseLostError):
        await store.apply(stale, batch)
    assert await contents(client, keys) == []
    pending = await client.xpending(keys.ingest(P), Group.APPENDER.value)
    assert pending["pending"] == 1


async def test_generations_change_on_clear_replace_delete_and_recreation(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 6)
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0]), msg("a"))
    batch.command("clear", target(ids[1]))
    batch.replace(target(ids[2]), [msg("r1"), msg("r2")])
    batch.command("delete", target(ids[3]))
    batch.append(target(ids[4]), msg("again"))
    batch.append(target(ids[5]), msg("more"))
    await store.apply(lease, batch)
    reader = MemoryReader(client, store._scripts, keys)
    gens = [(await reader.outcome(P, i)).gen for i in ids]  # type: ignore[union-attr]
    assert gens[0] < gens[1] < gens[2] < gens[3] < gens[4] == gens[5]
    stored = [json.loads(m) for m in await client.zrange(keys.memory(P, MEM).log, 0, -1)]
    assert [m["content"] for m in stored] == ["again", "more"]
    assert all(m["gen"] == gens[4] for m in stored)
    # Sequence numbers are never reused, not even across a delete.
    assert [m["seq"] for m in stored] == [4, 5]


async def test_a_replay_before_the_last_reset_is_refused_into_the_dead_letters(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 3)
    batch = ApplyBatch(keys, P)
    batch.command("clear", target(ids[1]))
    await store.apply(lease, batch)
    replay = ApplyBatch(keys, P)
    replay.append(Target(ids[2], MEM, TTL, "ev", idempotency_key="r", replay_of=ids[0]), msg("old"))
    assert await store.apply(lease, replay) == ["refused"]
    letters = await client.xrange(keys.dlq(P))
    assert letters[0][1]["reason"] == "replay_before_reset"
    assert await contents(client, keys) == []


async def test_dead_letter_and_erased_ops_are_acknowledged_with_outcomes(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 2)
    batch = ApplyBatch(keys, P)
    batch.dead_letter(ids[0], reason="not_json", detail="bad", event="{", source="s")
    batch.erased(ids[1])
    assert await store.apply(lease, batch) == ["refused", "erased"]
    reader = MemoryReader(client, store._scripts, keys)
    refused = await reader.outcome(P, ids[0])
    assert refused is not None and refused.reason == "not_json" and refused.dead_letter
    erased = await reader.outcome(P, ids[1])
    assert erased is not None and erased.status == "erased"
    letter = (await client.xrange(keys.dlq(P)))[0][1]
    assert letter["event"] == "{" and letter["entry"] == ids[0]
    assert (await client.xpending(keys.ingest(P), Group.APPENDER.value))["pending"] == 0


async def test_every_data_key_gets_the_deadline_and_the_tombstone_outlives_it(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 1)
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0], key="k"), msg("a"))
    await store.apply(lease, batch)
    k = keys.memory(P, MEM)
    # All four TTLs read in one atomic step: two round trips could be far apart under load.
    log_ttl, meta_ttl, tomb_ttl, idem_ttl = await client.eval(
        "return {redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]),"
        " redis.call('PTTL', KEYS[3]), redis.call('PTTL', KEYS[4])}",
        *(4, k.log, k.meta, k.tomb, k.idem),
    )
    assert 0 < log_ttl <= TTL and abs(log_ttl - meta_ttl) < 50
    assert tomb_ttl > TTL + Retention().tombstone_ms - 1000
    assert abs(tomb_ttl - idem_ttl) < 50
    assert await client.pttl(keys.counters(P)) == -1


async def test_a_flush_request_is_forwarded_only_for_an_existing_memory(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 3)
    batch = ApplyBatch(keys, P)
    batch.command("flush", target(ids[0]), {"dry_run": "0"})
    batch.append(target(ids[1]), msg("a"))
    batch.command("flush", target(ids[2]), {"strategy": "fifo"})
    assert await store.apply(lease, batch) == ["refused", "applied", "applied"]
    requests = await client.xrange(keys.flush(P))
    assert len(requests) == 1
    assert requests[0][1]["memory"] == MEM and requests[0][1]["strategy"] == "fifo"
    assert await client.xlen(keys.dlq(P)) == 0


async def test_a_restore_brings_the_backup_back_under_its_sequences_in_a_new_generation(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 5)
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0]), msg("a"))
    batch.append(target(ids[1]), msg("b"))
    batch.command("clear", target(ids[2]), backup=True)
    batch.append(target(ids[3]), msg("after the clear"))
    # Decided from the stored backup: never after another op of its memory in a call.
    with pytest.raises(ValueError, match="first op of its memory"):
        batch.restore(target(ids[4]), ids[2])
    assert await store.apply(lease, batch) == ["applied"] * 4
    k = keys.memory(P, MEM)
    backed_up = await client.zrange(k.backup, 0, -1, withscores=True)
    seen = len(await client.xrange(keys.changes(P)))
    restore = ApplyBatch(keys, P)
    restore.restore(target(ids[4]), ids[2])
    restore.append(target(str(await client.xadd(keys.ingest(P), {"event": "{}"}))), msg("c"))
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(P): ">"})
    assert await store.apply(lease, restore) == ["applied", "applied"]
    gen = int(await client.hget(k.meta, "gen"))
    stored = [json.loads(m) for m in await client.zrange(k.log, 0, -1)]
    assert [m["content"] for m in stored] == ["a", "b", "c"]
    assert [m["seq"] for m in stored[:2]] == [int(s) for _, s in backed_up] == [1, 2]
    assert stored[2]["seq"] == 4 and {m["gen"] for m in stored} == {gen}
    assert [m["entry"] for m in stored] == [ids[0], ids[1], stored[2]["entry"]]
    assert await client.hget(k.meta, "count") == "3"
    assert await client.hget(k.tomb, "reset") == ids[4]
    changes = [f for _, f in (await client.xrange(keys.changes(P)))[seen:]]
    # The restored messages and the append after them, in one generation: one change.
    assert [(f["type"], f["seqs"], f["gen"]) for f in changes] == [("appended", "1,2,4", str(gen))]


async def test_entries_an_erasure_removed_after_they_were_read_are_settled_as_erased(
    setup: tuple[MemoryStore, Lease], client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 4)
    marked = [keys.ingest(P), keys.counters(P)]
    # erase_entries removes and raises the sweep mark in one step; the mark only grows.
    assert await scripts("erase_entries", marked, [ids[2]]) == 1
    assert await scripts("erase_entries", marked, [ids[1]]) == 1
    assert await client.hget(keys.counters(P), "swept") == ids[2]
    batch = ApplyBatch(keys, P)
    for i, entry_id in enumerate(ids):
        batch.append(target(entry_id), msg(f"m{i}"))
    # Entries at or below the mark are looked up: the ones still there are applied.
    assert await store.apply(lease, batch) == ["applied", "erased", "erased", "applied"]
    assert await contents(client, keys) == ["m0", "m3"]
    pending = await client.xpending(keys.ingest(P), Group.APPENDER.value)
    assert pending["pending"] == 0
    reader = MemoryReader(client, scripts, keys)
    outcome = await reader.outcome(P, ids[1])
    assert outcome is not None and outcome.status == "erased" and outcome.event_id == f"ev-{ids[1]}"


async def ttls(client: RedisClient, keys: Keys) -> dict[str, int]:
    """The PTTL of every key of the memory, read in one atomic step."""
    k = keys.memory(P, MEM)
    names = ("log", "meta", "tomb", "idem", "tok")
    found = await client.eval(
        "local t = {} for i, k in ipairs(KEYS) do t[i] = redis.call('PTTL', k) end return t",
        len(names),
        *(getattr(k, n) for n in names),
    )
    return dict(zip(names, [int(x) for x in found], strict=True))


async def test_a_deadline_is_renewed_once_it_moved_by_a_twentieth_of_the_ttl(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    k = keys.memory(P, MEM)

    async def append(text: str, key: str) -> None:
        (entry_id,) = await publish(client, keys, 1)
        batch = ApplyBatch(keys, P)
        batch.append(target(entry_id, key=key), msg(text))
        assert await store.apply(lease, batch) == ["applied"]

    await append("a", "k-a")
    first = int(await client.hget(k.meta, "deadline") or 0)
    assert first > 0
    # Soon after: nothing is renewed (the deadline moved by less than TTL/20 = 3 s), and
    # every key still has the memory's deadline (none was created without one).
    await append("b", "k-b")
    assert int(await client.hget(k.meta, "deadline") or 0) == first
    left = await ttls(client, keys)
    assert all(v > 0 for v in left.values()), left
    assert abs(left["log"] - left["meta"]) < 50 and abs(left["tok"] - left["meta"]) < 50
    assert left["meta"] <= TTL
    # As if the last renewal were long ago: the next write renews every key in full.
    stale = first - TTL // 2
    await client.hset(k.meta, "deadline", stale)
    for key in (k.log, k.meta, k.tok):
        await client.pexpireat(key, stale)
    await append("c", "k-c")
    renewed = int(await client.hget(k.meta, "deadline") or 0)
    assert renewed > first
    left = await ttls(client, keys)
    assert min(left["log"], left["meta"], left["tok"]) > TTL - 5_000, left
    assert left["tomb"] > TTL + Retention().tombstone_ms - 5_000
    assert await contents(client, keys) == ["a", "b", "c"]
    assert (await client.hgetall(k.meta))["count"] == "3"


async def test_a_batch_takes_its_sequences_at_once_and_skips_none(
    setup: tuple[MemoryStore, Lease], client: RedisClient, keys: Keys
) -> None:
    store, lease = setup
    ids = await publish(client, keys, 5)
    batch = ApplyBatch(keys, P)
    batch.append(target(ids[0], key="same"), msg("a"))
    batch.append(target(ids[1], key="same"), msg("dup"))  # a duplicate takes no sequence
    batch.replace(target(ids[2], memory="acme/customer-support/k2"), [msg("r1"), msg("r2")])
    batch.dead_letter(ids[3], reason="invalid", detail="x", event="{}", source="s")
    batch.append(target(ids[4]), msg("b"))
    assert await store.apply(lease, batch) == [
        "applied",
        "duplicate",
        "applied",
        "refused",
        "applied",
    ]
    one = [json.loads(m)["seq"] for m in await client.zrange(keys.memory(P, MEM).log, 0, -1)]
    two = [
        json.loads(m)["seq"]
        for m in await client.zrange(keys.memory(P, "acme/customer-support/k2").log, 0, -1)
    ]
    assert (one, two) == ([1, 4], [2, 3])
    assert await client.hget(keys.counters(P), "seq") == "4"
    assert (await client.hgetall(keys.memory(P, MEM).meta))["last_seq"] == "4"
