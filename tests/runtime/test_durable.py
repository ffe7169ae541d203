"""Durable publishes: ``Publisher(durable=N)`` returns only once N replicas have the
events (Redis WAIT on the connection that wrote them), else raises NotDurableError while
the events stay published on the master. A plain publish never waits for a replica."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from events import (
    NotDurableError,
    PartiallyPublishedError,
    Publisher,
    PublishError,
    RequestLimits,
)
from memory import MemoryRef, Message, ResourceRegistry, Role
from processors import Appender, Worker
from processors.settings import Settings
from store import (
    Keys,
    MemoryStore,
    RedisClient,
    RedisServerProcess,
    Retention,
    Scripts,
    connect,
    ensure_partitions,
)
from tests.conftest import own_server
from tests.runtime.conftest import FAST, ROOT, appended, memory_in
from tests.servers import Cluster

PARTITIONS = 8
TIMEOUT = 0.3


def user(text: str) -> Message:
    return Message(role=Role.USER, content=text)


def ref_in(partition: int, tag: str) -> MemoryRef:
    return memory_in(partition, tag, PARTITIONS)


@contextmanager
def stopped(server: RedisServerProcess) -> Iterator[None]:
    """The server paused (SIGSTOP): it keeps its connections but answers nothing."""
    server.kill(signal.SIGSTOP)
    try:
        yield
    finally:
        server.kill(signal.SIGCONT)


def wait_linked(replica: RedisServerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with redis.Redis(port=replica.port, decode_responses=True) as r:
            if r.info("replication").get("master_link_status") == "up":
                return
        time.sleep(0.1)
    raise AssertionError(f"the replica on {replica.port} never linked to its master")


@pytest.fixture
async def primary_with_replica(
    server_factory: list[RedisServerProcess], tmp_path: Path
) -> AsyncIterator[tuple[RedisServerProcess, RedisServerProcess, RedisClient]]:
    primary = own_server(server_factory, tmp_path, appendonly=False)
    replica = own_server(
        server_factory,
        tmp_path,
        appendonly=False,
        extra_args=["--replicaof", "127.0.0.1", str(primary.port)],
    )
    wait_linked(replica)
    client = connect(primary.url)
    yield primary, replica, client
    await client.aclose()


def publisher(client: RedisClient, keys: Keys, durable: int = 0) -> Publisher:
    return Publisher(
        client,
        keys=keys,
        default_partitions=PARTITIONS,
        durable=durable,
        durable_timeout=TIMEOUT,
    )


async def test_a_durable_publish_waits_for_the_replica_and_raises_without_it(
    primary_with_replica: tuple[RedisServerProcess, RedisServerProcess, RedisClient], keys: Keys
) -> None:
    _, replica, client = primary_with_replica
    durable, plain = publisher(client, keys, durable=1), publisher(client, keys)
    ref = ref_in(0, "d")
    await durable.append(ref, user("replicated"), idempotency_key="k1")
    with redis.Redis(port=replica.port, decode_responses=True) as r:
        assert r.xlen(keys.ingest(0)) == 1, "a durable publish returned before the replica had it"

    with stopped(replica):
        started = time.monotonic()
        with pytest.raises(NotDurableError) as raised:
            await durable.append(ref, user("not confirmed"), idempotency_key="k2")
        waited = time.monotonic() - started
        # The plain publish does not wait for the replica.
        await asyncio.wait_for(plain.append(ref, user("plain"), idempotency_key="k3"), TIMEOUT)
    error = raised.value
    assert isinstance(error, PublishError)
    assert TIMEOUT <= waited < TIMEOUT + 2, waited
    assert (error.replicas, error.required) == (0, 1)
    assert [r.idempotency_key for r in error.unconfirmed] == ["k2"]
    assert error.published == error.unconfirmed
    assert "are published on the Redis master" in str(error)
    assert "same idempotency keys is safe" in str(error)
    # The events are published on the master all the same.
    assert await client.xlen(keys.ingest(0)) == 3
    wait_linked(replica)
    await durable.append(ref, user("again"), idempotency_key="k2")  # publishing again is safe


async def test_a_durable_batch_counts_every_partition_and_more_replicas_than_exist_fail(
    primary_with_replica: tuple[RedisServerProcess, RedisServerProcess, RedisClient], keys: Keys
) -> None:
    _, _, client = primary_with_replica
    refs = [ref_in(p, f"b{p}-") for p in range(3)]
    batch = Publisher(client, keys=keys, default_partitions=PARTITIONS, durable=1)
    # One event per partition, in one pipeline that ends with one WAIT.
    published = await batch.publish_many([appended(ref, f"m{i}") for i, ref in enumerate(refs)])
    assert [p.receipt.partition for p in published if p.receipt] == [0, 1, 2]
    two = publisher(client, keys, durable=2)
    with pytest.raises(NotDurableError) as raised:
        await two.append(refs[0], user("one replica only"))
    assert (raised.value.replicas, raised.value.required) == (1, 2)


def test_durable_settings_are_checked() -> None:
    assert Settings(durable_replicas=1, durable_timeout="2s").durable_timeout == 2.0
    assert Settings().durable_replicas == 0
    with pytest.raises(ValueError, match="durable_timeout"):
        Settings(durable_replicas=1, durable_timeout="5s")  # over the 3.3s socket timeout
    with pytest.raises(ValueError):
        Settings(durable_replicas=-1)
    with pytest.raises(ValueError, match="durable"):
        Publisher(connect("redis://127.0.0.1:1"), durable=-1)


@pytest.mark.cluster
@pytest.mark.timeout(120)
async def test_a_durable_publish_on_a_cluster_waits_for_the_replica_of_its_master(
    replicated_cluster: Cluster, keys: Keys
) -> None:
    cluster = replicated_cluster
    cluster.wait_healthy(60)
    client = connect(cluster.url)
    try:
        durable, plain = publisher(client, keys, durable=1), publisher(client, keys)
        await plain.partitions()
        await client.ping()
        assert hasattr(client, "get_node_from_key")
        owner = client.get_node_from_key(keys.ingest(0))  # type: ignore[union-attr]
        assert owner is not None
        master = next(m for m in cluster.masters_now() if m.port == int(owner.port))
        replica = cluster.node(cluster.replicas_of(master)[0].port)
        elsewhere = next(
            p
            for p in range(PARTITIONS)
            if int(client.get_node_from_key(keys.ingest(p)).port) != master.port  # type: ignore[union-attr]
        )
        ref, other = ref_in(0, "c"), ref_in(elsewhere, "o")

        latency: dict[str, list[float]] = {"plain": [], "durable": []}
        for i in range(40):
            for name, pub in (("plain", plain), ("durable", durable)):
                started = time.perf_counter()
                await pub.append(ref, user(f"{name}{i}"))
                latency[name].append(time.perf_counter() - started)
        p50 = {k: statistics.median(v) * 1000 for k, v in latency.items()}
        print(
            f"\np50 publish latency on the cluster: plain {p50['plain']:.2f} ms, "
            f"durable=1 {p50['durable']:.2f} ms"
        )

        with stopped(replica):
            with pytest.raises(NotDurableError) as raised:
                await durable.append(ref, user("unconfirmed"), idempotency_key="u1")
            await plain.append(ref, user("plain while stopped"))
            # Another master's replica is up: its partitions stay durable.
            await durable.append(other, user("elsewhere"))
        assert raised.value.unconfirmed[0].partition == 0
        assert raised.value.replicas == 0
        wait_linked(replica)
        await durable.append(ref, user("confirmed again"), idempotency_key="u1")
    finally:
        await client.aclose()
    cluster.wait_healthy(60)


async def waits(client: RedisClient) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def test_the_appender_waits_for_the_replica_after_each_batch(
    primary_with_replica: tuple[RedisServerProcess, RedisServerProcess, RedisClient], keys: Keys
) -> None:
    """Each batch is followed by a WAIT on the connection that applied it; without the
    replica the batch is still applied (after the timeout) and counted unconfirmed."""
    _, replica, client = primary_with_replica
    scripts = Scripts(client)
    await scripts.load()
    await ensure_partitions(client, keys, PARTITIONS)
    store = MemoryStore(scripts, keys, Retention(), replicas=1, replica_timeout=TIMEOUT)
    registry = ResourceRegistry.load([ROOT / "memories"])
    appender = Appender(store, keys, registry, PARTITIONS)
    worker = Worker(client, scripts, keys, appender, PARTITIONS, FAST, worker_id="durable")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    plain = publisher(client, keys)
    try:
        before = await waits(client)
        ref = ref_in(1, "w")
        applied = await plain.append(ref, user("replicated"), wait=True)
        assert applied.outcome is not None and applied.outcome.ok
        assert await waits(client) > before
        assert store.unconfirmed == 0
        with stopped(replica):
            late = await plain.append(ref, user("unconfirmed"), wait=True, timeout=10)
            # The outcome is recorded by the batch itself; its WAIT is still running.
            for _ in range(50):
                if store.unconfirmed:
                    break
                await asyncio.sleep(0.05)
        assert late.outcome is not None and late.outcome.ok
        assert store.unconfirmed >= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_a_partly_published_durable_batch_names_what_the_replicas_did_not_confirm(
    primary_with_replica: tuple[RedisServerProcess, RedisServerProcess, RedisClient], keys: Keys
) -> None:
    _, replica, client = primary_with_replica
    durable = Publisher(
        client,
        keys=keys,
        default_partitions=PARTITIONS,
        durable=1,
        durable_timeout=TIMEOUT,
        limits=RequestLimits(max_backlog=2),
    )
    full, free = ref_in(1, "full-"), ref_in(2, "free-")
    await publisher(client, keys).publish_many([appended(full, "a"), appended(full, "b")])
    with stopped(replica), pytest.raises(PartiallyPublishedError) as partial:
        await durable.publish_many([appended(full, "refused"), appended(free, "unconfirmed")])
    error = partial.value
    assert [r.partition for r in error.published] == [2]
    assert error.unconfirmed == error.published
    assert "not confirmed by the replicas" in str(error)
