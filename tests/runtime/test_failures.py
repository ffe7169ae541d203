"""What counts as an attempt (DESIGN rule 5) and what does not."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from redis.exceptions import RedisClusterException, ResponseError

from memory import MemoryRef, partition_for
from processors import Batch, Handled
from store import Group, Keys
from tests.conftest import FLAVOURS
from tests.runtime.conftest import PARTITIONS, Rig
from tests.runtime.test_appender_worker import raw_event

REF = MemoryRef.parse("acme/customer-support/failures")
P = partition_for(REF.memory_id, PARTITIONS)


async def add(rig: Rig, text: str) -> str:
    event = json.dumps(raw_event(REF, text))
    return str(await rig.client.xadd(rig.keys.ingest(P), {"event": event}))


class Flaky:
    """Raises ``error`` on the first ``times`` batches, then processes normally."""

    def __init__(self, rig: Rig, error: Exception, times: int) -> None:
        self.inner = rig.appender()
        self.group = self.inner.group
        self.error = error
        self.left = times

    async def process(self, batch: Batch) -> Handled:
        if self.left > 0:
            self.left -= 1
            raise self.error
        return await self.inner.process(batch)


class PoisonedBatch:
    """Fails any batch that holds a 'boom' entry, before looking at single entries: the
    failure is not tied to an entry, so the runtime must find the entry itself."""

    def __init__(self, rig: Rig) -> None:
        self.inner = rig.appender()
        self.group = self.inner.group

    async def process(self, batch: Batch) -> Handled:
        if any("boom" in (e.fields or {}).get("event", "") for e in batch.entries):
            raise ValueError("something in this batch is bad")
        return await self.inner.process(batch)


async def test_redis_failures_never_count_as_attempts(rig: Rig) -> None:
    first = await add(rig, "survives")
    processor = Flaky(rig, RedisClusterException("Redis Cluster cannot be connected"), times=6)
    rig.start("w1", processor)  # type: ignore[arg-type]
    outcome = await rig.reader.wait_applied(P, first, timeout=15)
    assert outcome.status == "applied"
    assert await rig.client.hlen(rig.keys.attempts(P, Group.APPENDER)) == 0
    assert await rig.client.xlen(rig.keys.dlq(P)) == 0


async def test_a_batch_failure_is_narrowed_to_the_entry_that_causes_it(rig: Rig) -> None:
    ids = [await add(rig, text) for text in ("one", "two", "boom", "four")]
    rig.start("w1", PoisonedBatch(rig))  # type: ignore[arg-type]
    outcomes = [await rig.reader.wait_applied(P, i, timeout=20) for i in ids]
    assert [o.status for o in outcomes] == ["applied", "applied", "refused", "applied"]
    assert outcomes[2].reason == "failed"
    assert await rig.contents(REF) == ["one", "two", "four"]
    letters = await rig.client.xrange(rig.keys.dlq(P))
    assert [f["entry"] for _, f in letters] == [ids[2]]
    assert await rig.client.hlen(rig.keys.attempts(P, Group.APPENDER)) == 0


class Recording:
    """The appender, recording the size of every batch it is given."""

    def __init__(self, rig: Rig, fail_on: str | None = None) -> None:
        self.inner = rig.appender()
        self.group = self.inner.group
        self.sizes: list[int] = []
        self.fail_on = fail_on

    async def process(self, batch: Batch) -> Handled:
        self.sizes.append(len(batch.entries))
        if self.fail_on and any(
            self.fail_on in (e.fields or {}).get("event", "") for e in batch.entries
        ):
            raise ValueError("a bad batch")
        return await self.inner.process(batch)


async def test_after_a_takeover_claimed_entries_are_processed_one_at_a_time(rig: Rig) -> None:
    from store import ensure_groups

    await rig.publisher.partitions()
    await ensure_groups(rig.scripts, rig.keys, P)
    claimed = [await add(rig, f"c{i}") for i in range(4)]
    # A worker read these and died (its lease is gone: nothing was handed over cleanly).
    await rig.client.xreadgroup(Group.APPENDER.value, "dead", {rig.keys.ingest(P): ">"}, count=4)
    fresh = [await add(rig, f"n{i}") for i in range(3)]
    processor = Recording(rig)
    rig.start("w1", processor)  # type: ignore[arg-type]
    for entry_id in claimed + fresh:
        assert (await rig.reader.wait_applied(P, entry_id, timeout=10)).status == "applied"
    # One at a time through what was claimed (so a crash is charged to the entry at
    # fault), then batches again.
    assert processor.sizes[:4] == [1, 1, 1, 1]
    assert processor.sizes[4] == 3
    attempts = await rig.client.hgetall(rig.keys.attempts(P, Group.APPENDER))
    assert attempts == {}  # settled entries leave no count behind


async def test_a_failed_batch_stays_narrow_until_past_it(rig: Rig) -> None:
    ids = [await add(rig, text) for text in ("a", "b", "c", "boom", "e")]
    processor = Recording(rig, fail_on="boom")
    rig.start("w1", processor)  # type: ignore[arg-type]
    outcomes = [await rig.reader.wait_applied(P, i, timeout=20) for i in ids]
    assert [o.status for o in outcomes] == ["applied", "applied", "applied", "refused", "applied"]
    # The whole batch failed once; then single entries until past its last entry.
    assert processor.sizes[0] == 5
    assert set(processor.sizes[1:]) == {1}


async def test_a_worker_keeps_its_leases_while_heartbeats_fail(rig: Rig) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    worker = rig.start("w1")
    await rig.eventually(lambda: len(worker.owned) == PARTITIONS, what="all owned")
    fences = {p: s.lease.fence for p, s in worker.owned.items()}

    async def refused(*, leave: bool = False) -> list[str]:
        raise RedisConnectionError("heartbeat refused")

    worker.heartbeat = refused  # type: ignore[method-assign]
    # Longer than the lease TTL (2 s): the leases must have been renewed all along.
    await asyncio.sleep(rig.config.lease_ttl_ms / 1000 * 2)
    assert {p: s.lease.fence for p, s in worker.owned.items()} == fences
    assert not any(s.lost for s in worker.owned.values())
    for p in range(PARTITIONS):
        assert await rig.client.exists(rig.keys.lease(p, Group.APPENDER))


def test_backoff_never_overflows_however_long_redis_is_away() -> None:
    from processors.failures import Backoff

    backoff = Backoff(base=0.05, cap=2.0, tries=5000)
    assert 1.0 <= backoff.next() <= 2.0


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
async def test_refusals_of_redis_inside_scripts_are_never_the_entrys_fault(
    flavour: str, tmp_path: Path, keys: Keys
) -> None:
    from processors.failures import is_entry_fault
    from store import (
        ApplyBatch,
        Leases,
        MemoryStore,
        RedisServerProcess,
        Retention,
        Scripts,
        Target,
        connect,
        ensure_groups,
    )

    server = RedisServerProcess(FLAVOURS[flavour], tmp_path / "oom", appendonly=False)
    server.start()
    client = connect(server.url)
    try:
        scripts = Scripts(client, strict=True)
        await scripts.load()
        await ensure_groups(scripts, keys, 0)
        lease = await Leases(scripts, keys, "appender", 5000).acquire(0, "w1")
        assert lease is not None
        entry = str(await client.xadd(keys.ingest(0), {"event": "{}"}))
        await client.xreadgroup("appender", "w1", {keys.ingest(0): ">"})
        batch = ApplyBatch(keys, 0)
        batch.append(Target(entry, "acme/customer-support/k", 60_000, "ev"), '{"role":"user"}')
        await client.config_set("maxmemory", 1)
        await client.config_set("maxmemory-policy", "noeviction")
        with pytest.raises(ResponseError) as refused:
            await MemoryStore(scripts, keys, Retention()).apply(lease, batch)
        assert not is_entry_fault(refused.value), str(refused.value)
        await client.config_set("maxmemory", 0)
        broken = Scripts(client, extra={"broken": "return nil < 1"})
        await broken.load()
        with pytest.raises(ResponseError) as lua_error:
            await broken("broken", [], [])
        assert is_entry_fault(lua_error.value), str(lua_error.value)
    finally:
        await client.aclose()
        server.stop()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
async def test_a_partition_refused_by_redis_publishes_none_of_its_events(
    flavour: str, tmp_path: Path, keys: Keys
) -> None:
    from events import MessageAppended, Publisher, PublishError
    from events.envelope import AppendPayload, MemoryName
    from memory import Message, Role
    from store import RedisServerProcess, connect

    server = RedisServerProcess(FLAVOURS[flavour], tmp_path / "oom", appendonly=False)
    server.start()
    client = connect(server.url)
    try:
        publisher = Publisher(client, keys=keys, default_partitions=1)
        name = MemoryName(resource="customer-support", key="k")
        events = [
            MessageAppended(
                tenant="acme",
                payload=AppendPayload(memory=name, message=Message(role=Role.USER, content=str(i))),
            )
            for i in range(5)
        ]
        await publisher.publish_many(events[:1])  # groups and scripts are in place
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)
        with pytest.raises(PublishError, match="nothing was published"):
            await publisher.publish_many(events[1:])
        await client.config_set("maxmemory", 0)
        assert await client.xlen(keys.ingest(0)) == 1
    finally:
        await client.aclose()
        server.stop()


class FailsOn:
    """The appender, failing every batch that holds an entry with ``text``."""

    def __init__(self, rig: Rig, text: str) -> None:
        self.inner = rig.appender()
        self.group = self.inner.group
        self.text = text

    async def process(self, batch: Batch) -> Handled:
        if any(self.text in (e.fields or {}).get("event", "") for e in batch.entries):
            raise ValueError("cannot apply this one")
        return await self.inner.process(batch)


async def test_status_names_the_entry_a_partition_is_stuck_on(rig: Rig) -> None:
    from dataclasses import replace

    from processors.status import group_status, render

    config = replace(rig.config, loop=replace(rig.config.loop, max_attempts=50, backoff_max=0.05))
    bad = await add(rig, "stuck-here")
    rig.start("w1", FailsOn(rig, "stuck-here"), config)  # type: ignore[arg-type]

    async def stuck() -> bool:
        status = await group_status(rig.client, rig.scripts, rig.keys, Group.APPENDER, 5000)
        held = status.partitions[P].held
        return held is not None and held.get("attempts", 0) >= 2

    await rig.eventually(stuck, what="the partition reported stuck")
    status = await group_status(rig.client, rig.scripts, rig.keys, Group.APPENDER, 5000)
    row = status.partitions[P]
    assert row.held is not None
    assert (row.held["kind"], row.held["entry"]) == ("failing", bad)
    assert "ValueError('cannot apply this one')" in row.held["error"]
    assert row.held["max_attempts"] == 50
    assert row.most_attempts is not None and row.most_attempts[0] == bad
    text = render(status)
    assert f"stuck at {bad}: failing (attempt" in text
    await rig.stop("w1")
    # Once it is dead-lettered, the partition is no longer reported stuck. The next
    # holder may charge its takeover, then counts its own failure: two more at most.
    counted = int(await rig.client.hget(rig.keys.attempts(P, Group.APPENDER), bad) or 0)
    last = replace(config, loop=replace(config.loop, max_attempts=counted + 2))
    rig.start("w2", FailsOn(rig, "stuck-here"), last)  # type: ignore[arg-type]
    outcome = await rig.reader.wait_applied(P, bad, timeout=20)
    assert (outcome.status, outcome.reason) == ("refused", "failed")
    assert "ValueError('cannot apply this one')" in str(outcome.detail)
    after = await add(rig, "fine")
    assert (await rig.reader.wait_applied(P, after, timeout=10)).status == "applied"
    status = await group_status(rig.client, rig.scripts, rig.keys, Group.APPENDER, 5000)
    assert status.partitions[P].held is None and status.partitions[P].most_attempts is None
