"""A script, then ``WAIT`` for replicas, on one connection: WAIT counts the replicas that
received the writes of its own connection, and cannot run inside a script. Used by
durable publishes and by the appender when it waits for replicas after each batch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.exceptions import ClusterDownError, MovedError, NoScriptError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from store.breaker import NodeBreakers
from store.connection import TRANSIENT_ERRORS, RedisClient, breaker_of, gate_of
from store.scripts import Scripts

log = logging.getLogger(__name__)

#: MOVED replies followed before giving up (a failover moving a slot twice is rare).
MAX_REDIRECTS = 3


class _Stack:
    """Commands for one connection of a Cluster node (``Scripts.queue`` adds its
    EVALSHA here as it would to a pipeline)."""

    def __init__(self) -> None:
        self._args: list[tuple[Any, ...]] = []

    def evalsha(self, *args: Any) -> None:
        self._args.append(("EVALSHA", *args))

    def wait(self, replicas: int, timeout_ms: int) -> None:
        self._args.append(("WAIT", replicas, timeout_ms))

    def commands(self) -> list[PipelineCommand]:
        """Fresh commands (each holds its own result)."""
        return [PipelineCommand(i, *args) for i, args in enumerate(self._args)]


async def run_then_wait(
    client: RedisClient,
    scripts: Scripts,
    name: str,
    keys: Sequence[str],
    args: Sequence[str | int | float],
    replicas: int,
    timeout_ms: int,
) -> tuple[Any, int]:
    """Run the script ``name``, then ``WAIT replicas timeout_ms``, on one connection of
    the server (of a Cluster: of the master that owns ``keys[0]``'s slot). Returns the
    script's reply (an exception object when it failed) and how many replicas
    confirmed. A MOVED reply (a failover moved the slot; the script did not run) is
    followed to the new master; a NOSCRIPT reply loads the scripts and runs it again."""
    for loaded in (False, True):
        if isinstance(client, RedisCluster):
            reply, waited = await _on_owner(client, scripts, name, keys, args, replicas, timeout_ms)
        else:
            reply, waited = await _on_server(
                client, scripts, name, keys, args, replicas, timeout_ms
            )
        if loaded or not isinstance(reply, NoScriptError):
            break
        await scripts.load()  # Redis lost its scripts (a restart, a failover): once more
    return reply, waited


async def _on_server(
    client: RedisClient,
    scripts: Scripts,
    name: str,
    keys: Sequence[str],
    args: Sequence[str | int | float],
    replicas: int,
    timeout_ms: int,
) -> tuple[Any, int]:
    pipe = client.pipeline(transaction=False)  # one connection for both commands
    scripts.queue(pipe, name, keys, args)
    pipe.wait(replicas, timeout_ms)
    reply, waited = await pipe.execute(raise_on_error=False)
    return reply, _confirmed(waited)


async def _on_owner(
    cluster: RedisCluster,
    scripts: Scripts,
    name: str,
    keys: Sequence[str],
    args: Sequence[str | int | float],
    replicas: int,
    timeout_ms: int,
) -> tuple[Any, int]:
    stack = _Stack()
    scripts.queue(stack, name, keys, args)
    stack.wait(replicas, timeout_ms)
    breaker = breaker_of(cluster)
    gate = gate_of(cluster)
    reply: Any = None
    for _ in range(MAX_REDIRECTS):
        await cluster.initialize()
        node = cluster.get_node_from_key(keys[0])
        if node is None:
            raise ClusterDownError(f"no Cluster node serves {keys[0]}")
        commands = stack.commands()
        guard = breaker.for_node(node.name) if isinstance(breaker, NodeBreakers) else breaker

        def run() -> Awaitable[bool]:
            return node.execute_pipeline(commands)  # noqa: B023

        try:
            if gate is not None:
                await gate.call(run, guard)
            elif guard is not None:
                await guard.call(run)
            else:
                await run()
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # As the cluster client does: read the slots again before the next call.
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await cluster.nodes_manager.initialize()
            raise
        reply, waited = commands[0].result, commands[1].result
        if isinstance(reply, MovedError):
            await cluster.nodes_manager.move_slot(reply)
            continue
        return reply, _confirmed(waited)
    return reply, 0


def _confirmed(waited: Any) -> int:
    """The replicas WAIT counted; a refused WAIT (an ACL user without +wait) is logged
    as what it is, and counts none."""
    if isinstance(waited, int):
        return waited
    log.error("Redis refused WAIT (%s): nothing can be confirmed by replicas", waited)
    return 0
