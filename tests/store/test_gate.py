"""The call gate of every client (store/gate.py): at most max_connections calls in
flight, the others waiting for their turn; a full client is not Redis being down; on a
single server, one deadline per call (the socket timeout) and no Task per command."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events import Publisher, RedisUnavailableError
from events.envelope import AppendPayload, MemoryName, MessageAppended
from memory import Message, Role
from store import (
    CallGate,
    CircuitState,
    ConnectionsBusyError,
    Keys,
    RedisClient,
    breaker_of,
    connect,
    gate_of,
)


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def other(default_redis_url: str) -> AsyncIterator[RedisClient]:
    """A second client, to unblock the first one's blocked calls."""
    c = connect(default_redis_url)
    yield c
    await c.aclose()


async def test_calls_over_the_limit_wait_for_their_turn(
    default_redis_url: str, other: RedisClient, keys: Keys
) -> None:
    client = connect(default_redis_url, max_connections=2)
    gate = gate_of(client)
    assert gate is not None
    try:
        blocked = [
            asyncio.create_task(client.blpop([keys.ingest(i)], timeout=30)) for i in range(3)
        ]
        await until(lambda: gate.in_flight == 2 and gate.waiting == 1, "two calls in, one waiting")
        assert not any(b.done() for b in blocked)
        for i in range(3):
            await other.rpush(keys.ingest(i), f"v{i}")
        done = await asyncio.wait_for(asyncio.gather(*blocked), 10)
        assert sorted(v for _, v in done) == ["v0", "v1", "v2"]
        assert gate.in_flight == 0 and gate.waiting == 0
        assert len(client.connection_pool._in_use_connections) == 0  # type: ignore[union-attr]
        assert len(client.connection_pool._available_connections) == 2  # type: ignore[union-attr]
    finally:
        await client.aclose()


async def test_a_client_whose_connections_stay_busy_is_not_redis_being_down(
    default_redis_url: str, other: RedisClient, keys: Keys
) -> None:
    client = connect(default_redis_url, max_connections=1, connection_wait=0.2, breaker_threshold=1)
    breaker = breaker_of(client)
    assert breaker is not None
    try:
        blocked = asyncio.create_task(client.blpop([keys.ingest(0)], timeout=30))
        gate = gate_of(client)
        assert gate is not None
        await until(lambda: gate.in_flight == 1, "the blocking call in")
        started = time.monotonic()
        with pytest.raises(ConnectionsBusyError, match="nothing was sent") as busy:
            await client.ping()
        assert 0.2 <= time.monotonic() - started < 5
        assert isinstance(busy.value, RedisConnectionError)  # transient for every caller
        name = MemoryName(resource="customer-support", key="busy")
        event = MessageAppended(
            tenant="acme",
            payload=AppendPayload(memory=name, message=Message(role=Role.USER, content="x")),
        )
        publisher = Publisher(client, keys=keys, default_partitions=1)
        with pytest.raises(RedisUnavailableError, match="nothing was published") as refused:
            await publisher.publish(event)
        assert isinstance(refused.value.__cause__, ConnectionsBusyError)
        assert breaker.state is CircuitState.CLOSED and breaker.opens == 0
        await other.rpush(keys.ingest(0), "v")
        assert tuple(await asyncio.wait_for(blocked, 10)) == (keys.ingest(0), "v")
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_thousand_concurrent_calls_never_run_the_client_out_of_connections(
    redis_url: str, keys: Keys
) -> None:
    client = connect(redis_url)
    breaker = breaker_of(client)
    assert breaker is not None
    try:
        key = f"{keys.namespace}:counter"
        replies = await asyncio.gather(*(client.incr(key) for _ in range(1000)))
        assert sorted(replies) == list(range(1, 1001))
        pipes = []
        for _ in range(1000):
            pipe = client.pipeline(transaction=False)
            pipe.incr(key).get(key)
            pipes.append(pipe.execute())
        assert len(await asyncio.gather(*pipes)) == 1000
        assert await client.get(key) == "2000"
        assert breaker.state is CircuitState.CLOSED and breaker.opens == 0
        await client.delete(key)
    finally:
        await client.aclose()


async def test_a_call_has_one_deadline_and_its_connection_is_closed_when_it_passes(
    default_redis_url: str, other: RedisClient, keys: Keys
) -> None:
    client = connect(default_redis_url, socket_timeout=0.3, breaker_threshold=5)
    breaker = breaker_of(client)
    assert breaker is not None
    try:
        await client.set(keys.ingest(1), "kept")
        for call in (
            lambda: client.blpop([keys.ingest(0)], timeout=5),
            lambda: (
                client.pipeline(transaction=False)
                .get(keys.ingest(1))
                .blpop([keys.ingest(0)], timeout=5)
                .execute()
            ),
        ):
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError, match=r"within 0\.3s"):
                await call()
            assert 0.3 <= time.monotonic() - started < 2.0  # one deadline for the whole call
        assert breaker.last_error.startswith("TimeoutError")  # counted: Redis did not answer
        # The timed-out calls' connections were closed: a value pushed now is not
        # handed to them (Redis keeps it), and later replies are this call's own.
        await other.rpush(keys.ingest(0), "late")
        assert await client.get(keys.ingest(1)) == "kept"
        assert await other.llen(keys.ingest(0)) == 1
        assert breaker.state is CircuitState.CLOSED
    finally:
        await client.delete(keys.ingest(0), keys.ingest(1))
        await client.aclose()


async def test_commands_and_pipelines_start_no_task_of_their_own(
    default_redis_url: str, keys: Keys
) -> None:
    """redis-py wraps each send in asyncio.wait_for when its connections have a socket
    timeout: a Task per command on Python 3.11. The client keeps the deadline without."""
    client = connect(default_redis_url, socket_timeout=5)
    loop = asyncio.get_running_loop()
    started: list[Any] = []
    default = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        started.append(coro)
        if default is not None:
            return default(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    try:
        await client.ping()  # connected
        loop.set_task_factory(counting)
        for i in range(20):
            await client.set(keys.ingest(0), str(i))
            pipe = client.pipeline(transaction=False)
            pipe.get(keys.ingest(0)).incr(keys.ingest(1))
            await pipe.execute()
        loop.set_task_factory(default)
        assert started == []
    finally:
        loop.set_task_factory(default)
        await client.delete(keys.ingest(0), keys.ingest(1))
        await client.aclose()


async def test_a_call_inside_a_call_takes_no_second_turn() -> None:
    """A Cluster pipeline re-sends a command through its client: with every turn taken,
    the nested call must not wait for one (it would wait for itself)."""
    gate = CallGate("nested", limit=1, wait=0.5)

    async def inner() -> str:
        return "inner"

    async def outer() -> str:
        return await gate.call(inner)

    assert await asyncio.wait_for(gate.call(outer), 5) == "inner"
    assert gate.in_flight == 0
