"""A circuit breaker per Redis client: after ``threshold`` transport failures in a row
(connection refused or broken, timeouts), calls fail at once with CircuitOpenError
instead of each waiting for its own timeout; after ``reset_seconds`` one trial call goes
through (half-open), and its success closes the circuit again.

Only failures to reach Redis count. A reply of Redis, an error reply too (NOSCRIPT, OOM,
BUSYGROUP, LOADING, a wrong password), proves it reachable. A client whose connections
are all busy (redis-py's "Too many connections", the call gate's ConnectionsBusyError)
sent nothing and learnt nothing about Redis: that counts neither way. The states and their
transitions are purgatory's; this module feeds it the outcome of each call, lets one
trial through at a time and reports the state.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, TypeVar

from purgatory.domain.messages.events import ContextChanged
from purgatory.domain.model import HALF_OPENED, OPENED, Context, OpenedState
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    MaxConnectionsError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from store.gate import ConnectionsBusyError

if TYPE_CHECKING:
    from store.connection import RedisClient
    from store.keys import Keys
    from store.scripts import Scripts

T = TypeVar("T")

#: Failures to reach Redis: they open the circuit.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)
#: Subclasses of ConnectionError that are replies of Redis: it is reachable.
_ANSWERS: tuple[type[BaseException], ...] = (
    BusyLoadingError,
    AuthenticationError,
    AuthorizationError,
)
#: Subclasses of ConnectionError raised before anything was sent, by this client: they
#: say nothing about Redis.
_UNSENT: tuple[type[BaseException], ...] = (MaxConnectionsError, ConnectionsBusyError)


class CircuitState(IntEnum):
    """The values of the ``memstream_circuit_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class CircuitOpenError(RedisConnectionError):
    """Redis failed ``threshold`` times in a row: calls fail at once until a trial call
    gets through. Nothing was sent. A ConnectionError, so every caller treats it as a
    transient failure."""

    def __init__(self, name: str, retry_in: float, detail: str) -> None:
        super().__init__(
            f"circuit breaker for {name} is open ({detail}): nothing was sent; "
            f"next trial in {retry_in:.1f}s"
        )
        self.name = name
        self.retry_in = retry_in


def is_transport_failure(error: BaseException) -> bool:
    return isinstance(error, TRANSPORT_ERRORS) and not isinstance(
        error, (*_ANSWERS, *_UNSENT, CircuitOpenError)
    )


#: The breakers whose call the current task is inside of.
_ACTIVE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "memstream_active_breakers", default=frozenset()
)


def _check(threshold: int, reset_seconds: float) -> None:
    if threshold < 1 or reset_seconds <= 0:
        raise ValueError("a circuit breaker needs a threshold >= 1 and a reset time > 0")


class CircuitBreaker:
    """The breaker of one client. One event loop uses it (as it does the client)."""

    def __init__(self, name: str, threshold: int = 5, reset_seconds: float = 5.0) -> None:
        _check(threshold, reset_seconds)
        self.name = name
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self._context = Context(name, threshold, reset_seconds)
        self._trial = False
        self.opens = 0
        self.last_opened_at: float | None = None  # wall clock (seconds since the epoch)
        self.last_error = ""
        self._listeners: list[Callable[[CircuitState], None]] = []

    def add_listener(self, listener: Callable[[CircuitState], None]) -> None:
        """Called with the new state at every transition (closed, half-open, open)."""
        self._listeners.append(listener)

    @property
    def state(self) -> CircuitState:
        """Open until the reset time has passed, then half-open (the next call is the
        trial) until a trial succeeds or fails."""
        context = self._context
        if context.state == OPENED:
            if time.time() >= (context.opened_at or 0.0) + self.reset_seconds:
                return CircuitState.HALF_OPEN
            return CircuitState.OPEN
        if context.state == HALF_OPENED:
            return CircuitState.HALF_OPEN
        return CircuitState.CLOSED

    def retry_in(self) -> float:
        opened = self._context.opened_at
        if self._context.state != OPENED or opened is None:
            return 0.0
        return max(0.0, opened + self.reset_seconds - time.time())

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call through the breaker. A call made while another call of
        this breaker runs in the same task (a cluster pipeline re-sending a command
        after MOVED goes through the client again) is part of that call: it passes
        through, and is not counted twice."""
        active = _ACTIVE.get()
        if id(self) in active:
            return await fn()
        token = _ACTIVE.set(active | {id(self)})
        try:
            return await self._call(fn)
        finally:
            _ACTIVE.reset(token)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        trial = self._enter()
        try:
            result = await fn()
        except asyncio.CancelledError:
            raise  # says nothing about Redis
        except BaseException as e:
            if is_transport_failure(e):
                self.last_error = f"{type(e).__name__}: {e}"
                self._context.handle_exception(e)
            elif not isinstance(e, (*_UNSENT, CircuitOpenError)):
                self._context.handle_end_request()  # Redis answered (an error reply)
            self._drain()
            raise
        else:
            self._context.handle_end_request()
            self._drain()
            return result
        finally:
            if trial:
                self._trial = False

    def _enter(self) -> bool:
        """Let a call through, or raise CircuitOpenError; True for the trial call."""
        context = self._context
        try:
            context.handle_new_request()
        except OpenedState:
            self._drain()
            raise CircuitOpenError(self.name, self.retry_in(), self._why()) from None
        self._drain()
        if context.state != HALF_OPENED:
            return False
        if self._trial:
            raise CircuitOpenError(self.name, 0.0, "a trial call is in flight")
        self._trial = True
        return True

    def _why(self) -> str:
        last = f"; last: {self.last_error}" if self.last_error else ""
        return f"{self.threshold} failures in a row{last}"

    def _drain(self) -> None:
        """Take purgatory's events: count openings, tell the listeners."""
        messages = self._context.messages
        while messages:
            message = messages.pop(0)
            if not isinstance(message, ContextChanged):
                continue
            if message.state == OPENED:
                self.opens += 1
                self.last_opened_at = message.opened_at or time.time()
                new = CircuitState.OPEN
            elif message.state == HALF_OPENED:
                new = CircuitState.HALF_OPEN
            else:
                new = CircuitState.CLOSED
            for listener in self._listeners:
                listener(new)


class NodeBreakers:
    """The breakers of a Redis Cluster client: one per node, so a master that cannot be
    reached (until its replica is promoted) fails fast alone while the others' slots
    work on. Seen as one breaker (status, metrics): the worst state of its nodes, the
    openings of all of them. Calls that name no node (keyless commands) go through a
    breaker of their own."""

    ANY = "*"

    def __init__(self, name: str, threshold: int = 5, reset_seconds: float = 5.0) -> None:
        _check(threshold, reset_seconds)
        self.name = name
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self._by_node: dict[str, CircuitBreaker] = {}
        self._listeners: list[Callable[[CircuitState], None]] = []
        #: The nodes the cluster has now (``host:port``); None: every node ever called.
        self.live: Callable[[], Collection[str]] | None = None

    def _current(self) -> list[CircuitBreaker]:
        """The breakers of the nodes the cluster has now (and of calls that name no
        node): a node that left the cluster, say a failed master replaced by its
        replica, no longer counts in the state."""
        live = set(self.live()) if self.live is not None else set()
        if not live:
            return list(self._by_node.values())
        return [b for n, b in self._by_node.items() if n in live or n == self.ANY]

    def for_node(self, node: str) -> CircuitBreaker:
        """The breaker of one node (``host:port``), made at its first call."""
        breaker = self._by_node.get(node)
        if breaker is None:
            label = self.name if node == self.ANY else f"{self.name} node {node}"
            breaker = CircuitBreaker(label, self.threshold, self.reset_seconds)
            for listener in self._listeners:
                breaker.add_listener(listener)
            self._by_node[node] = breaker
        return breaker

    @property
    def nodes(self) -> dict[str, CircuitBreaker]:
        return dict(self._by_node)

    def add_listener(self, listener: Callable[[CircuitState], None]) -> None:
        self._listeners.append(listener)
        for breaker in self._by_node.values():
            breaker.add_listener(listener)

    @property
    def state(self) -> CircuitState:
        return max((b.state for b in self._current()), default=CircuitState.CLOSED)

    @property
    def opens(self) -> int:
        return sum(b.opens for b in self._by_node.values())

    @property
    def last_opened_at(self) -> float | None:
        times = [b.last_opened_at for b in self._by_node.values() if b.last_opened_at]
        return max(times) if times else None

    @property
    def last_error(self) -> str:
        errors = [f"{n}: {b.last_error}" for n, b in self._by_node.items() if b.last_error]
        return "; ".join(errors)

    def retry_in(self) -> float:
        return max((b.retry_in() for b in self._current()), default=0.0)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """A call that names no node."""
        return await self.for_node(self.ANY).call(fn)


#: A client's breaker: one for a single server, one per node for a Cluster.
Breaker = CircuitBreaker | NodeBreakers


@dataclass(frozen=True, slots=True)
class CircuitRecord:
    """A worker's breaker as it last recorded it in Redis (``memstream status``)."""

    state: str
    opens: int
    last_opened_at: float | None  # seconds since the epoch
    recorded_at_ms: int = 0  # by the Redis clock

    @classmethod
    def of(cls, breaker: Breaker) -> CircuitRecord:
        return cls(breaker.state.label, breaker.opens, breaker.last_opened_at)

    def to_json(self) -> str:
        return json.dumps(
            {"state": self.state, "opens": self.opens, "last_opened_at": self.last_opened_at}
        )

    @classmethod
    def parse(cls, stored: str) -> CircuitRecord:
        at, _, text = stored.partition(" ")
        data = json.loads(text)
        last = data.get("last_opened_at")
        return cls(
            str(data.get("state", "?")),
            int(data.get("opens", 0)),
            float(last) if last is not None else None,
            int(at),
        )


async def record_circuit(
    scripts: Scripts,
    keys: Keys,
    group: str,
    worker: str,
    record: CircuitRecord | None,
    keep_ms: int,
) -> None:
    """Record a worker's breaker (None: remove the worker's record, when it leaves)."""
    state = record.to_json() if record is not None else ""
    await scripts("record_circuit", [keys.circuits(group)], [worker, state, keep_ms])


async def read_circuits(client: RedisClient, keys: Keys, group: str) -> dict[str, CircuitRecord]:
    """The breaker records of a group's workers, by worker id."""
    stored = await client.hgetall(keys.circuits(group))
    found: dict[str, CircuitRecord] = {}
    for worker, value in stored.items():
        try:
            found[str(worker)] = CircuitRecord.parse(str(value))
        except (ValueError, TypeError, AttributeError):
            continue  # a record this version cannot read: not worth failing status for
    return found
