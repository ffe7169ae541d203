"""Redis clients from a URL: standalone, Cluster, TLS and ACL users.

- ``redis://[user:password@]host:port/db`` and ``unix:///path/to.sock``: one server;
- ``rediss://...``: TLS (certificates through the URL's query, e.g. ``ssl_ca_certs=``);
- ``redis+cluster://host:port`` / ``rediss+cluster://``: a Redis Cluster, found from
  any of its nodes (``cluster=True`` does the same for a plain URL).

ACL users go in the URL's user part; every memstream command then runs as that user.

Every client has its own circuit breaker (``store.breaker``): its commands and pipelines
go through it, so while Redis is unreachable they fail at once with CircuitOpenError.
Before that, they pass its call gate (``store.gate``): at most ``max_connections`` calls
in flight, the others waiting for their turn; on a single server the gate also keeps
the socket timeout, as one deadline per call.
"""

from __future__ import annotations

from collections.abc import Collection, Coroutine
from typing import Any, TypeAlias, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from store.breaker import Breaker, CircuitBreaker, NodeBreakers
from store.errors import ConnectionSetupError
from store.gate import HEADROOM, CallGate

RedisClient: TypeAlias = Redis | RedisCluster

#: Failures of Redis or of the way to it: never the fault of an entry, always retried
#: (with backoff) and never counted as an attempt (DESIGN rule 5).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: Calls a client has in flight at most, unless ``connect`` is told otherwise (redis-py's
#: own pool size).
MAX_CONNECTIONS = 100


class GuardedPipeline(Pipeline):
    """A pipeline whose execution passes its client's gate and breaker."""

    breaker: CircuitBreaker | None = None
    gate: CallGate | None = None

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        def run() -> Coroutine[Any, Any, list[Any]]:
            return super(GuardedPipeline, self).execute(raise_on_error)

        if not self.command_stack:
            return await run()
        if self.gate is not None:
            return await self.gate.call(run, self.breaker)
        if self.breaker is not None:
            return await self.breaker.call(run)
        return await run()


class GuardedRedis(Redis):
    """A client of one Redis server whose every command passes ``gate`` and ``breaker``."""

    breaker: CircuitBreaker | None = None
    gate: CallGate | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        def run() -> Coroutine[Any, Any, Any]:
            return super(GuardedRedis, self).execute_command(*args, **options)  # type: ignore[no-untyped-call]

        if self.gate is not None:
            return await self.gate.call(run, self.breaker)
        if self.breaker is not None:
            return await self.breaker.call(run)
        return await run()

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = GuardedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.breaker = self.breaker
        pipe.gate = self.gate
        return pipe


class GuardedClusterPipeline(ClusterPipeline):
    """A Cluster pipeline whose commands all go to one node runs through that node's
    breaker (memstream's pipelines name the keys of one partition, one hash tag). One
    that spans nodes, names its nodes, or returns errors as results
    (``raise_on_error=False``, so a failure could pass for a reply) is not guarded: each
    of its commands is bounded by the socket timeout."""

    def __init__(self, client: GuardedRedisCluster, transaction: bool | None = None) -> None:
        super().__init__(client, transaction)
        self._guarded = client

    def _queued(self) -> list[tuple[Any, ...]] | None:
        """The commands queued (as the strategy holds them: every way of queueing one
        ends there), or None when one names its nodes or the queue cannot be seen."""
        queue = getattr(self._execution_strategy, "_command_queue", None)
        if not isinstance(queue, list):
            return None
        commands = []
        for command in queue:
            if getattr(command, "kwargs", {}).get("target_nodes") is not None:
                return None
            commands.append(tuple(getattr(command, "args", ())))
        return commands

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        def run() -> Coroutine[Any, Any, list[Any]]:
            return super(GuardedClusterPipeline, self).execute(raise_on_error, allow_redirections)

        queued = self._queued() if raise_on_error else None
        breaker = await self._guarded.breaker_of_all(queued) if queued else None
        gate = self._guarded.gate
        if breaker is None:
            return await (gate.call(run) if gate is not None else run())
        try:
            return await (gate.call(run, breaker) if gate is not None else breaker.call(run))
        finally:
            await self.reset()  # type: ignore[no-untyped-call]  # failing fast, it did not run


class GuardedRedisCluster(RedisCluster):
    """A Redis Cluster client whose every command goes through the breaker of the node
    that serves it (``breaker.for_node``), so one master that cannot be reached does not
    make the others fail fast; so does a pipeline whose commands all go to one node."""

    breaker: NodeBreakers | None = None
    gate: CallGate | None = None

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return GuardedClusterPipeline(self, transaction)  # type: ignore[abstract]

    async def breaker_of_all(self, commands: list[tuple[Any, ...]]) -> CircuitBreaker | None:
        """The breaker of the one node every command goes to, or None (no breaker, the
        slots not known yet, commands for several nodes or for none)."""
        if self.breaker is None or not self.nodes_manager.slots_cache:
            return None
        names = set()
        try:
            for args in commands:
                if _keyless_script(args):  # it goes to a random node
                    return None
                names.add(self.nodes_manager.get_node_from_slot(await self._slot_of(args)).name)
        except Exception:  # a keyless command, a slot not covered, ...
            return None
        return self.breaker.for_node(names.pop()) if len(names) == 1 else None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        def run() -> Coroutine[Any, Any, Any]:
            return super(GuardedRedisCluster, self).execute_command(*args, **kwargs)

        breaker = await self._breaker_for(args, kwargs) if self.breaker is not None else None
        if self.gate is not None:
            return await self.gate.call(run, breaker)
        if breaker is not None:
            return await breaker.call(run)
        return await run()

    async def _breaker_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CircuitBreaker:
        assert self.breaker is not None
        target = kwargs.get("target_nodes")
        if isinstance(target, ClusterNode):
            return self.breaker.for_node(target.name)
        if target is None and args and self.nodes_manager.slots_cache:
            try:
                slot = await self._slot_of(args)
                node = self.nodes_manager.get_node_from_slot(slot)
            except Exception:  # a keyless command, slots not known yet, ...
                pass  # then the breaker of calls that name no node
            else:
                return self.breaker.for_node(node.name)
        return self.breaker.for_node(NodeBreakers.ANY)

    async def _slot_of(self, args: tuple[Any, ...]) -> int:
        """The slot a command goes to, without asking Redis: XREAD and XREADGROUP (whose
        keys redis-py would look up with COMMAND GETKEYS) by their first stream."""
        command = str(args[0]).upper()
        if command in ("XREAD", "XREADGROUP"):
            words = [str(a).upper() for a in args]
            return self.keyslot(args[words.index("STREAMS") + 1])
        return await self._determine_slot(*args)


def _keyless_script(args: tuple[Any, ...]) -> bool:
    """A script or function call that names no key."""
    command = str(args[0]).upper() if args else ""
    scripts = ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO")
    return command in scripts and (len(args) < 3 or str(args[2]) == "0")


def breaker_of(client: RedisClient) -> Breaker | None:
    """The circuit breaker of a client made by ``connect`` (None for another client)."""
    return getattr(client, "breaker", None)


def gate_of(client: RedisClient) -> CallGate | None:
    """The call gate of a client made by ``connect`` (None for another client)."""
    return getattr(client, "gate", None)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in _CLUSTER_SCHEMES


def connect(
    url: str,
    *,
    cluster: bool | None = None,
    socket_timeout: float = 15.0,
    connect_timeout: float = 3.0,
    max_connections: int | None = None,
    connection_wait: float | None = None,
    breaker_threshold: int = 5,
    breaker_reset: float = 5.0,
) -> RedisClient:
    """A client for ``url``; responses are decoded as UTF-8 strings.

    ``socket_timeout`` bounds every call, a command or a whole pipeline (blocking reads
    use shorter blocks than it). At most ``max_connections`` calls (100 by default) are
    in flight at once; the others wait for their turn, for up to ``connection_wait``
    seconds (by default the socket timeout), then fail with ConnectionsBusyError, which
    is not a failure of Redis. After ``breaker_threshold`` failures to reach Redis in a
    row, commands fail at once with CircuitOpenError for ``breaker_reset`` seconds, then
    one trial call goes through.
    The client never re-sends a command by itself: a script that ran but whose reply was
    lost must not run twice behind the caller's back (MOVED and ASK redirections are
    still followed). Callers retry with backoff, and the scripts are idempotent.
    Bytes that are not UTF-8 (a producer in another language can write any) decode as
    lone surrogates instead of failing the read, so they can be dead-lettered.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConnectionSetupError(
            f"invalid Redis URL {url!r}: expected redis://host:port, rediss://..., "
            f"unix:///path or redis+cluster://host:port"
        )
    use_cluster = cluster if cluster is not None else scheme in _CLUSTER_SCHEMES
    plain_url = f"{_CLUSTER_SCHEMES.get(scheme, scheme)}://{rest}"
    limit = max_connections if max_connections is not None else MAX_CONNECTIONS
    wait = connection_wait if connection_wait is not None else socket_timeout
    if limit < 1 or wait < 0:
        raise ConnectionSetupError("max_connections must be at least 1, connection_wait >= 0")
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "retry": Retry(NoBackoff(), 0),
        # One server: the gate keeps the timeout, one timer per call (store.gate).
        "socket_timeout": socket_timeout if use_cluster else None,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": 30,
        "max_connections": limit + HEADROOM,
    }
    name = describe(url)
    try:
        if use_cluster:
            if plain_url.startswith("unix://"):
                raise ConnectionSetupError("a Redis Cluster cannot be reached over a unix socket")
            many = cast(GuardedRedisCluster, GuardedRedisCluster.from_url(plain_url, **options))
            many.breaker = NodeBreakers(name, breaker_threshold, breaker_reset)
            many.gate = CallGate(name, limit, wait)

            def nodes_now() -> Collection[str]:  # the cache is replaced on a refresh
                return many.nodes_manager.nodes_cache.keys()

            many.breaker.live = nodes_now
            return many
        single = cast(GuardedRedis, GuardedRedis.from_url(plain_url, **options))
    except ValueError as e:
        raise ConnectionSetupError(f"invalid Redis URL {url!r}: {e}") from e
    single.breaker = CircuitBreaker(name, breaker_threshold, breaker_reset)
    single.gate = CallGate(name, limit, wait, deadline=socket_timeout)
    return single


def describe(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    auth, host = rest.rsplit("@", 1)
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in auth else user}@{host}"
