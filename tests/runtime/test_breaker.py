"""The circuit breaker of every Redis client (store/breaker.py) and the deadlines derived
from the lease TTL: what opens it, fail-fast, the half-open trial, recovery, and what
operators see (metrics, ``memstream status``). Outages here are servers that are not
started yet; tests/chaos/test_breaker_outages.py kills and pauses servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events import MessageAppended, PartiallyPublishedError, Publisher, RedisUnavailableError
from events.envelope import AppendPayload, MemoryName
from memory import Message, Role, partition_for
from processors import Settings, Worker
from processors.metrics import Metrics
from processors.status import group_status, render
from store import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ConnectionsBusyError,
    Group,
    Keys,
    RedisClient,
    RedisServerProcess,
    Scripts,
    breaker_of,
    connect,
)
from store.breaker import NodeBreakers
from store.embedded import free_port
from tests.conftest import DEFAULT_FLAVOUR, FLAVOURS, own_server
from tests.runtime.conftest import FAST, PARTITIONS, Rig
from tests.servers import Cluster

MEMSTREAM = str(Path(sys.executable).with_name("memstream"))


def event(text: str) -> MessageAppended:
    name = MemoryName(resource="customer-support", key="breaker")
    return MessageAppended(
        tenant="acme",
        payload=AppendPayload(memory=name, message=Message(role=Role.USER, content=text)),
    )


async def open_breaker(client_breaker: CircuitBreaker) -> None:
    async def refused() -> None:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    for _ in range(client_breaker.threshold):
        with pytest.raises(RedisConnectionError):
            await client_breaker.call(refused)
    assert client_breaker.state is CircuitState.OPEN


async def test_the_breaker_opens_after_the_threshold_then_fails_fast() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}", breaker_threshold=3, breaker_reset=30)
    breaker = breaker_of(client)
    assert breaker is not None
    try:
        for _ in range(3):
            with pytest.raises(RedisConnectionError) as refused:
                await client.ping()
            assert not isinstance(refused.value, CircuitOpenError)
        assert breaker.state is CircuitState.OPEN and breaker.opens == 1
        started = time.perf_counter()
        with pytest.raises(CircuitOpenError, match=r"is open .*next trial in \d+\.\ds") as opened:
            await client.ping()
        pipe = client.pipeline(transaction=False)
        pipe.get("k")
        with pytest.raises(CircuitOpenError):
            await pipe.execute()
        assert time.perf_counter() - started < 0.05
        assert isinstance(opened.value, RedisConnectionError)  # transient for every caller
        assert 29 < opened.value.retry_in <= 30
    finally:
        await client.aclose()


async def test_redis_answers_never_open_the_breaker(default_redis_url: str, keys: Keys) -> None:
    client = connect(default_redis_url, breaker_threshold=1)
    breaker = breaker_of(client)
    assert breaker is not None
    try:
        with pytest.raises(NoScriptError):
            await client.evalsha("0" * 40, 0)
        await client.xgroup_create(keys.ingest(0), "g", id="0", mkstream=True)
        with pytest.raises(ResponseError, match="BUSYGROUP"):
            await client.xgroup_create(keys.ingest(0), "g", id="0", mkstream=True)
        assert breaker.state is CircuitState.CLOSED and breaker.opens == 0
        await client.delete(keys.ingest(0))
    finally:
        await client.aclose()


async def test_a_client_out_of_connections_is_not_redis_being_down() -> None:
    """redis-py's "Too many connections" and the call gate's ConnectionsBusyError come
    before anything is sent: they neither open the breaker nor pass for a trial that
    reached Redis."""
    breaker = CircuitBreaker("busy", threshold=1, reset_seconds=0.1)

    async def exhausted() -> None:
        raise MaxConnectionsError("Too many connections")

    async def busy() -> None:
        raise ConnectionsBusyError("busy", 1, 0.1)

    for _ in range(3):
        for call in (exhausted, busy):
            with pytest.raises(RedisConnectionError):
                await breaker.call(call)
    assert breaker.state is CircuitState.CLOSED and breaker.opens == 0
    await open_breaker(breaker)
    deadline = time.monotonic() + 5
    while breaker.state is not CircuitState.HALF_OPEN:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    for call in (exhausted, busy):
        with pytest.raises(RedisConnectionError):
            await breaker.call(call)
        assert breaker.state is CircuitState.HALF_OPEN  # no answer from Redis: still a trial


async def test_one_trial_goes_through_when_half_open_and_its_success_closes(
    server_factory: list[RedisServerProcess], tmp_path: Path
) -> None:
    port = free_port()
    client = connect(f"redis://127.0.0.1:{port}", breaker_threshold=2, breaker_reset=0.5)
    breaker = breaker_of(client)
    assert breaker is not None
    try:
        for _ in range(2):
            with pytest.raises(RedisConnectionError):
                await client.ping()
        assert breaker.state is CircuitState.OPEN
        own_server(server_factory, tmp_path, port=port)  # Redis is back
        await asyncio.sleep(0.6)
        assert breaker.state.label == "half-open"
        replies = await asyncio.gather(*(client.ping() for _ in range(5)), return_exceptions=True)
        assert replies.count(True) == 1, replies
        assert all(
            isinstance(r, CircuitOpenError) and "trial call is in flight" in str(r)
            for r in replies
            if r is not True
        )
        assert breaker.state.label == "closed"
        assert await asyncio.gather(*(client.ping() for _ in range(5))) == [True] * 5
        assert breaker.opens == 1
    finally:
        await client.aclose()


async def test_a_node_that_left_the_cluster_no_longer_counts_in_the_state() -> None:
    """A failed master replaced by its replica keeps its open breaker, but the client's
    state is that of the nodes the cluster has now; its openings stay counted."""
    breakers = NodeBreakers("redis+cluster://test", threshold=2, reset_seconds=30)
    nodes = {"10.0.0.1:7000", "10.0.0.2:7001"}
    breakers.live = lambda: nodes
    await open_breaker(breakers.for_node("10.0.0.1:7000"))
    assert breakers.for_node("10.0.0.2:7001").state is CircuitState.CLOSED
    assert breakers.state is CircuitState.OPEN and breakers.retry_in() > 0
    nodes = {"10.0.0.2:7001", "10.0.0.3:7002"}  # the first one left
    assert breakers.state is CircuitState.CLOSED and breakers.retry_in() == 0
    assert breakers.opens == 1
    await open_breaker(breakers.for_node(NodeBreakers.ANY))  # calls that name no node
    assert breakers.state is CircuitState.OPEN


async def test_a_call_inside_a_call_is_part_of_it_even_as_the_trial() -> None:
    """A cluster pipeline re-sends a MOVED command through the client: the nested call
    must not be refused as a second trial, nor counted twice."""
    breaker = CircuitBreaker("nested", threshold=1, reset_seconds=0.1)

    async def broken() -> None:
        raise RedisConnectionError("down")

    with pytest.raises(RedisConnectionError):
        await breaker.call(broken)
    assert breaker.state is CircuitState.OPEN
    await asyncio.sleep(0.15)

    async def inner() -> str:
        return "inner"

    async def outer() -> str:
        return await breaker.call(inner)

    assert await breaker.call(outer) == "inner"  # the trial, with a call inside it
    assert breaker.state is CircuitState.CLOSED and breaker.opens == 1


async def test_a_publisher_fails_fast_then_recovers_by_itself(
    server_factory: list[RedisServerProcess], tmp_path: Path, keys: Keys
) -> None:
    port = free_port()
    client = connect(f"redis://127.0.0.1:{port}", breaker_threshold=2, breaker_reset=0.5)
    publisher = Publisher(client, keys=keys, default_partitions=2)
    try:
        for _ in range(2):
            with pytest.raises(RedisUnavailableError):
                await publisher.publish(event("lost"))
        started = time.perf_counter()
        with pytest.raises(RedisUnavailableError, match=r"circuit breaker .* is open") as failed:
            await publisher.publish(event("lost"))
        assert time.perf_counter() - started < 0.05
        assert isinstance(failed.value.__cause__, CircuitOpenError)
        own_server(server_factory, tmp_path, port=port)
        back = time.monotonic()
        while True:
            try:
                published = await publisher.publish(event("kept"))
                break
            except RedisUnavailableError:
                assert time.monotonic() - back < 5, "the publisher did not recover"
                await asyncio.sleep(0.05)
        assert published.receipt is not None
        assert time.monotonic() - back < 1.5  # the reset time (0.5s) and a trial
        assert sum([await client.xlen(keys.ingest(p)) for p in range(2)]) == 1
    finally:
        await client.aclose()


async def test_metrics_show_the_state_and_the_openings() -> None:
    metrics = Metrics()
    breaker = CircuitBreaker("redis://example:6379", threshold=2, reset_seconds=0.2)
    metrics.watch_circuit(breaker)

    def value(name: str) -> str:
        line = next(
            line
            for line in generate_latest(metrics.registry).decode().splitlines()
            if line.startswith(name + "{")
        )
        assert 'client="redis://example:6379"' in line
        return line.rsplit(" ", 1)[1]

    assert value("memstream_circuit_state") == "0.0"
    await open_breaker(breaker)
    assert value("memstream_circuit_state") == "2.0"
    assert value("memstream_circuit_opens_total") == "1.0"
    await asyncio.sleep(0.25)
    assert value("memstream_circuit_state") == "1.0"

    async def ok() -> bool:
        return True

    assert await breaker.call(ok)
    assert value("memstream_circuit_state") == "0.0"
    assert value("memstream_circuit_opens_total") == "1.0"


async def test_status_shows_each_workers_circuit(rig: Rig, redis_url: str) -> None:
    client = connect(redis_url, breaker_reset=0.1)
    breaker = breaker_of(client)
    assert breaker is not None
    stop = asyncio.Event()
    try:
        scripts = Scripts(client, strict=True)
        await scripts.load()
        await open_breaker(breaker)
        opened_at = breaker.last_opened_at
        assert opened_at is not None
        await asyncio.sleep(0.15)
        assert await client.ping()  # the trial: it closes the breaker
        worker = Worker(client, scripts, rig.keys, rig.appender(), PARTITIONS, FAST, "w-opened")
        task = asyncio.create_task(worker.run(stop))
        rig.start("w-fresh")
        at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(opened_at))
        expected = {
            f"w-opened: circuit: closed (opened once, last at {at})",
            "w-fresh: circuit: closed (never opened)",
        }
        await rig.eventually(
            lambda: _status_lines(client, scripts, rig.keys, expected),
            what="both workers' breaker records",
        )
        stop.set()
        await asyncio.wait_for(task, 10)
        status = await group_status(client, scripts, rig.keys, Group.APPENDER, 2000)
        assert set(status.circuits) == {"w-fresh"}  # a worker that left took its record
        assert not await client.hexists(rig.keys.circuits("appender"), "w-opened")
    finally:
        stop.set()
        await client.aclose()


async def _status_lines(client: RedisClient, scripts: Scripts, keys: Keys, lines: set[str]) -> bool:
    status = await group_status(client, scripts, keys, Group.APPENDER, 2000)
    return lines <= set(render(status).splitlines())


def test_status_says_in_one_line_when_redis_cannot_be_reached() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
    env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [MEMSTREAM, "status"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: Redis: ") and "connecting to 127.0.0.1" in lines[0]


def test_the_socket_timeout_derives_from_the_lease_ttl() -> None:
    assert Settings(lease_ttl=10).socket_timeout == pytest.approx(10 / 3)
    assert Settings(lease_ttl=30).socket_timeout == pytest.approx(10)
    assert Settings(lease_ttl=120, heartbeat=5).socket_timeout == 15
    with pytest.raises(ValidationError, match="socket timeout"):
        Settings(lease_ttl=6, block=2)
    assert Settings(breaker_threshold=3, breaker_reset="2s").breaker_reset == 2


def keyed(text: str, partition: int, partitions: int) -> MessageAppended:
    """An append to a memory of ``partition``."""
    for i in range(10_000):
        if partition_for(f"acme/customer-support/m{i}", partitions) == partition:
            name = MemoryName(resource="customer-support", key=f"m{i}")
            message = Message(role=Role.USER, content=text)
            return MessageAppended(
                tenant="acme", payload=AppendPayload(memory=name, message=message)
            )
    raise AssertionError(f"no key of partition {partition}")


async def check_pipelines(
    client: RedisClient, other: RedisClient, paused: str, healthy: str
) -> None:
    """Pipelines to one node go through its breaker: their failures open it, and then
    they fail fast; pipelines to the other masters work on. ``paused`` and ``healthy``
    are keys of the paused master and of another one; ``other`` is a client whose
    breaker is still closed."""
    for _ in range(2):  # the failures of pipelines count
        pipe = other.pipeline(transaction=False)
        pipe.get(paused)
        started = time.monotonic()
        with pytest.raises((RedisConnectionError, RedisTimeoutError)) as failed:
            await pipe.execute()
        assert not isinstance(failed.value, CircuitOpenError)
        assert time.monotonic() - started > 0.4  # it waited for the socket timeout
    breakers = breaker_of(other)
    assert isinstance(breakers, NodeBreakers)
    by_node = breakers.nodes
    node_of = other.get_node_from_key  # type: ignore[union-attr]
    assert by_node[node_of(paused).name].state is CircuitState.OPEN
    assert by_node[node_of(paused).name].opens == 1
    for c in (other, client):
        pipe = c.pipeline(transaction=False)
        pipe.set(paused, "p")
        pipe.get(paused)
        started = time.monotonic()
        with pytest.raises(CircuitOpenError):
            await pipe.execute()
        assert time.monotonic() - started < 0.1  # failing fast
        # The same pipeline, emptied by the failure, to another master.
        pipe.set(healthy, "h")
        pipe.get(healthy)
        assert await pipe.execute() == [True, "h"]
    # The other master's breaker took the successful pipelines and stays closed.
    assert breakers.nodes[node_of(healthy).name].state is CircuitState.CLOSED


async def publish_over_the_masters(
    publisher: Publisher, client: RedisClient, keys: Keys, owner: dict[int, int], paused: int
) -> set[int]:
    """A batch over every partition while master ``paused`` hangs and its breaker is
    open: the other masters' partitions are published, the paused one's not sent. The
    partitions not sent."""
    parts = len(owner)
    batch = [keyed("mixed", p, parts) for p in range(parts)]
    with pytest.raises(PartiallyPublishedError) as partial:
        await publisher.publish_many(batch)
    down = {p for p in range(parts) if owner[p] == paused}
    assert down and len(down) < parts, owner
    assert {r.partition for r in partial.value.published} == set(range(parts)) - down
    assert {i for i, _ in partial.value.failed} == down  # batch[i] is partition i
    assert all("not published" in why for _, why in partial.value.failed)
    for p in set(range(parts)) - down:
        assert await client.xlen(keys.ingest(p)) == 2
    # Only the paused master's partitions: nothing was sent, and it says so.
    with pytest.raises(RedisUnavailableError, match="nothing was published"):
        await publisher.publish_many([keyed("down", p, parts) for p in sorted(down)])
    return down


@pytest.mark.cluster
@pytest.mark.timeout(120)
async def test_on_a_cluster_one_unreachable_master_fails_fast_alone(
    tmp_path: Path, keys: Keys
) -> None:
    """A breaker per node: while one master is paused, its slots fail fast and the
    other masters' slots keep working; a batch over several masters publishes what
    goes to the others and names what was not sent."""
    cluster = Cluster(FLAVOURS[DEFAULT_FLAVOUR], tmp_path / "cluster")
    cluster.start()
    client = connect(cluster.url, socket_timeout=0.5, breaker_threshold=2, breaker_reset=30)
    other = connect(cluster.url, socket_timeout=0.5, breaker_threshold=2, breaker_reset=30)
    parts = 6
    publisher = Publisher(client, keys=keys, default_partitions=parts)
    try:
        await client.initialize()  # type: ignore[union-attr]
        await other.initialize()  # type: ignore[union-attr]
        owner = {p: client.get_node_from_key(keys.ingest(p)).port for p in range(parts)}  # type: ignore[union-attr]
        # Before the pause: scripts loaded, streams made and the count read (for 5 s).
        await publisher.publish_many([keyed("warm", p, parts) for p in range(parts)])
        served = {}  # master port -> a key it serves
        for i in range(1000):
            node = client.get_node_from_key(f"k{i}")  # type: ignore[union-attr]
            served.setdefault(node.port, f"k{i}")
            if len(served) == 3:
                break
        paused_port = owner[0]
        healthy = sorted(set(served) - {paused_port})
        paused = cluster.node(paused_port)
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            for _ in range(2):
                with pytest.raises((RedisConnectionError, RedisTimeoutError)):
                    await client.set(served[paused_port], "x")
            started = time.monotonic()
            with pytest.raises(CircuitOpenError):
                await client.set(served[paused_port], "x")
            assert time.monotonic() - started < 0.1  # failing fast
            for port in healthy:  # the others are not affected
                assert await client.set(served[port], "y")
                assert await client.get(served[port]) == "y"
            breaker = breaker_of(client)
            assert breaker is not None and breaker.state is CircuitState.OPEN
            assert breaker.opens == 1

            await check_pipelines(client, other, served[paused_port], served[healthy[0]])
            down = await publish_over_the_masters(publisher, client, keys, owner, paused_port)
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        # Nothing of the failed publishes reached the paused master (asked through a
        # new client: this one's breaker for it stays open).
        fresh = connect(cluster.url)
        try:
            for p in down:
                assert await fresh.xlen(keys.ingest(p)) == 1
        finally:
            await fresh.aclose()
    finally:
        await client.aclose()
        await other.aclose()
        cluster.stop()
