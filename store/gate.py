"""How many calls a Redis client has in flight, and how long each may take.

A client sends at most ``limit`` calls (a command or a pipeline, a connection each) at
once. A caller beyond that waits for its turn, in order, for up to ``wait`` seconds, then
gets ConnectionsBusyError: nothing was sent. A full pool says nothing about Redis, so it
never counts against the circuit breaker, and a process can start any number of calls
(a thousand concurrent publishes) without running the pool out of connections.

With ``deadline``, each admitted call as a whole (connecting, sending, every reply of a
pipeline) must end within that many seconds, else it fails with redis-py's TimeoutError
and its connection is closed. That is the socket timeout of the client's connections,
kept by one timer per call instead of redis-py's own per-connection one (which redis-py
8 sets to 5 s unless told None), which wraps every send in ``asyncio.wait_for`` (a Task
per command on Python 3.11) and every reply in a timer of its own. A Cluster client
keeps redis-py's per-connection timeouts (its topology refresh reacts to their errors)
and is given no deadline here.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from store.breaker import CircuitBreaker

T = TypeVar("T")

#: Connections the pool has beyond the gate's limit, for the few calls that do not pass
#: the gate (a Cluster client reading its topology).
HEADROOM = 8

#: The gates whose call the current task is inside of.
_ADMITTED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "memstream_admitted_gates", default=frozenset()
)


class ConnectionsBusyError(RedisConnectionError):
    """Every connection of the client stayed busy for the whole wait: nothing was sent.
    Not a failure of Redis (the circuit breaker does not count it); a ConnectionError,
    so every caller treats it as transient and tries again later."""

    def __init__(self, name: str, limit: int, wait: float) -> None:
        super().__init__(
            f"no connection to {name} became free within {wait:g}s ({limit} calls of this "
            f"client were in flight): nothing was sent; try again, or give the client more "
            f"connections (connect(max_connections=...))"
        )
        self.name = name
        self.limit = limit
        self.wait = wait


class CallGate:
    """The gate of one client. One event loop at a time uses it (as it does the client)."""

    def __init__(self, name: str, limit: int, wait: float, deadline: float | None = None) -> None:
        if limit < 1 or wait < 0 or (deadline is not None and deadline <= 0):
            raise ValueError("a call gate needs a limit >= 1, a wait >= 0 and a deadline > 0")
        self.name = name
        self.limit = limit
        self.wait = wait
        self.deadline = deadline
        self.in_flight = 0
        self._turns: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Callers waiting for their turn."""
        return sum(1 for turn in self._turns if not turn.done())

    async def call(
        self, fn: Callable[[], Awaitable[T]], breaker: CircuitBreaker | None = None
    ) -> T:
        """Run one call when its turn comes, through ``breaker`` and within the deadline.
        A call made inside a call of this gate in the same task (a Cluster pipeline that
        re-sends a command through its client) is part of it: no second turn, no second
        deadline."""
        admitted = _ADMITTED.get()
        if id(self) in admitted:
            return await (breaker.call(fn) if breaker is not None else fn())
        await self._enter()
        token = _ADMITTED.set(admitted | {id(self)})
        try:
            if breaker is None:
                return await self._bounded(fn)
            return await breaker.call(lambda: self._bounded(fn))
        finally:
            _ADMITTED.reset(token)
            self._leave()

    async def _enter(self) -> None:
        if self.in_flight < self.limit and not self._turns:
            self.in_flight += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._turns.append(turn)
        try:
            async with asyncio.timeout(self.wait):
                await turn
        except BaseException as e:
            if turn.done() and not turn.cancelled():
                self._leave()  # the turn came as the wait ended: pass it on
            else:
                turn.cancel()
            if isinstance(e, TimeoutError):
                raise ConnectionsBusyError(self.name, self.limit, self.wait) from None
            raise

    def _leave(self) -> None:
        self.in_flight -= 1
        while self._turns and self.in_flight < self.limit:
            turn = self._turns.popleft()
            if not turn.done():
                self.in_flight += 1  # the slot goes to the waiter with the turn
                turn.set_result(None)

    async def _bounded(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self.deadline is None:
            return await fn()
        scope = asyncio.timeout(self.deadline)
        try:
            async with scope:
                return await fn()
        except TimeoutError:
            if scope.expired():
                raise RedisTimeoutError(
                    f"no reply from {self.name} within {self.deadline:g}s (the socket "
                    f"timeout); the connection was closed"
                ) from None
            raise
