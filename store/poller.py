"""One poller per Redis client for the outcomes that callers wait for (``wait_applied``).

A caller that waits for entries registers them (their outcome bucket, entry id and
doorbells) and awaits a future per entry. The poller asks Redis for every registered
entry at once: each tick is one pipelined round trip, one ``HMGET`` per outcome bucket (on
a Cluster, one pipeline per node, concurrently), however many callers wait. It resolves
the future of each entry whose outcome it got, and stops when nobody waits. So the round
trips spent waiting grow with ticks, never with waiters.

Doorbells (one server only): the streams that the step recording an outcome also writes,
``changes:{p}`` for what it applied and ``dlq:{p}`` for what it dead-lettered. Instead of
sleeping between ticks, a tick begins with ``XREAD BLOCK`` on the doorbells of every
waiting entry: the tick's reply comes as soon as an outcome may have been recorded, and
nothing is written for it. Each doorbell is read from the Redis time (``TIME``) that the
previous tick read just before its ``HMGET``s (what was recorded before was seen), or,
for an entry that tick did not ask for, from the entry's own id (its outcome is recorded
after it was published, and so rings with a later id). A block lasts ``BLOCK_MS`` while
the newest wait is younger than ``FAST_FOR``, then ``SLOW_BLOCK_MS``: that bounds how long
a new wait on a partition nobody else waits for (its doorbells are not in the block that
is in flight) and an outcome that rings nothing (a duplicate, an erased entry) go unseen.

Without doorbells (a Cluster, waits that name none, or a Redis user that may not read
them, as the documented producer user), ticks come fast while a caller has just started
waiting (an outcome is typically due in a few milliseconds), then ease off the server:
the delay between ticks is the age of the newest wait, at least
``FIRST_DELAY`` and at most ``FAST_DELAY``, then ``SLOW_DELAY`` once the newest wait is
older than ``FAST_FOR``. With doorbells, a tick right after one that a doorbell ended
waits ``FIRST_DELAY`` (doorbells ringing for other entries would make it spin), unless
entries not asked for yet wait: their doorbells are read from their own ids, so the
next tick comes at once (a doorbell that rang for them ends its block). Either
way, ticks are at least ``ENTRY_COST`` per entry waited for apart (about what a tick
costs this process per entry it asks for), so the poller keeps to about half of its
event loop however many wait. A failed tick fails the waits it asked for with its
error, as a caller's own poll would.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from store.connection import RedisClient

log = logging.getLogger(__name__)

FIRST_DELAY = 0.0005
FAST_DELAY = 0.005
SLOW_DELAY = 0.05
FAST_FOR = 1.0
ENTRY_COST = 0.000001
BLOCK_MS = 1
SLOW_BLOCK_MS = 5

#: The attribute of a client that holds its poller.
_ATTRIBUTE = "outcome_poller"
#: The last sequence number of a stream entry id.
_LAST_SEQ = 2**64 - 1

#: entries asked for in one round trip: (bucket, entry ids)
Asked = list[tuple[str, list[str]]]
#: a stream entry id, (milliseconds, sequence): XREAD returns the entries after it
Cursor = tuple[int, int]


def before(entry_id: str) -> Cursor:
    """The cursor from which XREAD returns the entries of ``entry_id``'s millisecond on
    ((0, 0) for an id that is not a stream id: every entry rings)."""
    ms, _, _ = entry_id.partition("-")
    return (int(ms) - 1, _LAST_SEQ) if ms.isdigit() and int(ms) > 0 else (0, 0)


class OutcomePoller:
    """The outcomes callers of one client wait for, asked for in one round trip a tick."""

    def __init__(self, client: RedisClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self.loop = loop
        #: bucket -> entry id -> the futures of the callers waiting for it
        self._watched: dict[str, dict[str, list[asyncio.Future[str]]]] = {}
        self._bells_of: dict[asyncio.Future[str], tuple[str, ...]] = {}
        self._bells: dict[str, int] = {}  # doorbell -> entries waited for that ring it
        self._cursors: dict[str, Cursor] = {}  # doorbell -> where the next XREAD starts
        self._lowered: dict[str, Cursor] = {}  # doorbell -> cursor of entries not asked yet
        self._rang = False  # the last tick's block ended by a doorbell
        # Doorbells are for one server, and until Redis refuses to read them.
        self._doorbells = not isinstance(client, RedisCluster)
        self._newest = -math.inf  # loop time of the newest wait
        self._task: asyncio.Task[None] | None = None
        self._alarm: asyncio.Future[None] | None = None
        self._alarm_at = math.inf
        self._ring: asyncio.TimerHandle | None = None
        self._tick_end = -math.inf
        self._last_asked = 0  # entries the last tick asked for
        self.ticks = 0  # ticks that asked for something
        self.round_trips = 0  # pipelines sent (one a tick; a Cluster: one per node)
        self.asked = 0  # entries asked for, over all ticks
        self.rung = 0  # ticks whose block a doorbell ended

    def counters(self) -> dict[str, int]:
        return {
            "ticks": self.ticks,
            "round_trips": self.round_trips,
            "asked": self.asked,
            "rung": self.rung,
        }

    @property
    def pending(self) -> int:
        """Entries waited for."""
        return sum(len(entries) for entries in self._watched.values())

    @property
    def doorbells(self) -> bool:
        """Ticks wait for doorbells (one server, and Redis let this user read them)."""
        return self._doorbells

    @property
    def idle(self) -> bool:
        """Nobody waits and no tick is due."""
        return self._task is None

    def watch(
        self, bucket: str, entry_id: str, doorbells: Sequence[str] = ()
    ) -> asyncio.Future[str]:
        """A future that gets the outcome (its JSON text) of ``entry_id`` in ``bucket``;
        ``forget`` it when done waiting. ``doorbells``: streams that the step recording
        the outcome writes to (all under the bucket's hash tag)."""
        future: asyncio.Future[str] = self.loop.create_future()
        self._watched.setdefault(bucket, {}).setdefault(entry_id, []).append(future)
        if doorbells and self._doorbells:
            self._bells_of[future] = tuple(doorbells)
            cursor = before(entry_id)
            for bell in doorbells:
                self._bells[bell] = self._bells.get(bell, 0) + 1
                self._lowered[bell] = min(self._lowered.get(bell, cursor), cursor)
        self._newest = self.loop.time()
        if self._task is None:
            self._task = self.loop.create_task(self._run())
        elif self._bells:
            self._wake_by(self._tick_end + self._gap())
        else:
            self._wake_by(self._tick_end + max(FIRST_DELAY, self._gap()))
        return future

    def forget(self, bucket: str, entry_id: str, future: asyncio.Future[str]) -> None:
        """Stop waiting with ``future`` (resolved or not)."""
        entries = self._watched.get(bucket, {})
        futures = entries.get(entry_id, [])
        if future in futures:
            futures.remove(future)
            self._unring(future)
        if not futures:
            entries.pop(entry_id, None)
        if not entries:
            self._watched.pop(bucket, None)
        if future.done():
            if not future.cancelled():
                future.exception()  # seen: a failed tick's error is the caller's to raise
        else:
            future.cancel()
        if not self._watched:
            self._wake_by(self.loop.time())  # nothing to wait for: the loop ends

    def _unring(self, future: asyncio.Future[str]) -> None:
        for bell in self._bells_of.pop(future, ()):
            left = self._bells[bell] - 1
            if left:
                self._bells[bell] = left
            else:
                del self._bells[bell]
                self._cursors.pop(bell, None)
                self._lowered.pop(bell, None)

    async def _run(self) -> None:
        try:
            while self._watched:
                self._last_asked = await self._tick()
                self._tick_end = self.loop.time()
                if self._watched:
                    delay = self._gap() if self._bells else self._delay()
                    await self._sleep_until(self._tick_end + delay)
        except Exception as e:  # a bug: fail the waits rather than leave them hanging
            for bucket, entries in list(self._watched.items()):
                for entry_id in list(entries):
                    self._resolve(bucket, entry_id, error=e)
            raise
        finally:
            self._task = None

    def _gap(self) -> float:
        """Before a tick that waits for doorbells: none after a block that ran out, or
        when entries not asked for yet wait (their doorbells are read from their own
        ids: one that rang ends the block with their outcome); else ``FIRST_DELAY``
        after a block that a doorbell ended (doorbells that keep ringing for others'
        entries would otherwise make the poller spin)."""
        pause = FIRST_DELAY if self._rang and not self._lowered else 0.0
        return max(pause, self._last_asked * ENTRY_COST)

    def _block_ms(self) -> int:
        return BLOCK_MS if self.loop.time() - self._newest < FAST_FOR else SLOW_BLOCK_MS

    def _delay(self) -> float:
        age = self.loop.time() - self._newest
        schedule = SLOW_DELAY if age >= FAST_FOR else min(max(age, FIRST_DELAY), FAST_DELAY)
        return max(schedule, self._last_asked * ENTRY_COST)

    async def _sleep_until(self, when: float) -> None:
        self._alarm = self.loop.create_future()
        self._alarm_at = when
        self._ring = self.loop.call_at(when, self._wake)
        try:
            await self._alarm
        finally:
            self._ring.cancel()
            self._alarm, self._ring, self._alarm_at = None, None, math.inf

    def _wake(self) -> None:
        if self._alarm is not None and not self._alarm.done():
            self._alarm.set_result(None)

    def _wake_by(self, when: float) -> None:
        """Make the sleeping loop tick no later than ``when``."""
        if self._alarm is None or when >= self._alarm_at:
            return
        assert self._ring is not None
        self._ring.cancel()
        self._alarm_at = when
        self._ring = self.loop.call_at(when, self._wake)

    async def _tick(self) -> int:
        """Ask for every entry waited for (on one server, once a doorbell rang or the
        block ran out); how many were asked for."""
        asked = [(bucket, list(entries)) for bucket, entries in self._watched.items()]
        count = sum(len(ids) for _, ids in asked)
        self.ticks += 1
        self.asked += count
        if not isinstance(self._client, RedisCluster):
            for bell, cursor in self._lowered.items():
                self._cursors[bell] = min(self._cursors.get(bell, cursor), cursor)
            self._lowered.clear()
            await self._ask(asked, bells=dict(self._cursors))
            return count
        groups = await self._by_node(asked)
        if len(groups) == 1:
            await self._ask(groups[0])
        else:
            async with asyncio.TaskGroup() as tg:
                for group in groups:
                    tg.create_task(self._ask(group))
        return count

    async def _ask(self, asked: Asked, *, bells: dict[str, Cursor] | None = None) -> None:
        """One round trip for ``asked``; resolves what it found, or fails what it asked
        for with the error (never raises). On one server (``bells`` given) it first waits
        for one of ``bells`` to ring, and reads the Redis time the next tick waits from."""
        pipe = self._client.pipeline(transaction=False)
        single = bells is not None
        if bells:
            streams: dict[Any, Any] = {bell: f"{ms}-{seq}" for bell, (ms, seq) in bells.items()}
            pipe.xread(streams, count=1, block=self._block_ms())
        if single:
            pipe.time()
        for bucket, ids in asked:
            pipe.hmget(bucket, ids)
        self.round_trips += 1
        try:
            # One server: a refused doorbell read must not lose the outcomes' replies.
            replies: list[Any] = await pipe.execute(raise_on_error=not single)
        except Exception as e:
            for bucket, ids in asked:
                for entry_id in ids:
                    self._resolve(bucket, entry_id, error=e)
            return
        if bells:
            rung = replies.pop(0)
            if isinstance(rung, Exception):
                self._refuse_doorbells(rung)
            else:
                self._rang = bool(rung)
                self.rung += self._rang
        if single:
            now = replies.pop(0)
            if isinstance(now, Exception):
                self._refuse_doorbells(now)
            else:
                since = before(f"{int(now[0]) * 1000 + int(now[1]) // 1000}-0")
                for bell in bells or ():
                    if bell in self._cursors:  # still waited for
                        self._cursors[bell] = since
        for (bucket, ids), texts in zip(asked, replies, strict=True):
            for entry_id, text in zip(ids, texts, strict=True):
                if isinstance(texts, Exception):
                    self._resolve(bucket, entry_id, error=texts)
                elif text:
                    self._resolve(bucket, entry_id, text=str(text))

    def _refuse_doorbells(self, error: Exception) -> None:
        """Redis refused the doorbell reads (an ACL user without XREAD or TIME, or
        without the streams' keys, as a producer's): poll instead, from now on."""
        if self._doorbells:
            log.info("waiting for outcomes without doorbells, polling instead: %s", error)
        self._doorbells = False
        self._bells_of.clear()
        self._bells.clear()
        self._cursors.clear()
        self._lowered.clear()
        self._rang = False

    def _resolve(
        self, bucket: str, entry_id: str, *, text: str = "", error: Exception | None = None
    ) -> None:
        entries = self._watched.get(bucket)
        if entries is None:
            return
        for future in entries.pop(entry_id, []):
            self._unring(future)
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(text)
        if not entries:
            del self._watched[bucket]

    async def _by_node(self, asked: Asked) -> list[Asked]:
        """``asked`` split by the Cluster node that holds each bucket (one group while
        the Cluster's slots are not known)."""
        client = self._client
        if not isinstance(client, RedisCluster) or len(asked) == 1:
            return [asked]
        by_node: dict[str, Asked] = {}
        try:
            await client.initialize()
            for bucket, ids in asked:
                node = client.get_node_from_key(bucket)
                by_node.setdefault(node.name if node else "", []).append((bucket, ids))
        except Exception:  # slots not known yet, ...: the pipeline finds its way
            return [asked]
        return list(by_node.values())


def poller_of(client: RedisClient) -> OutcomePoller:
    """The client's poller (made at the first wait, on the running event loop)."""
    loop = asyncio.get_running_loop()
    poller = getattr(client, _ATTRIBUTE, None)
    if not isinstance(poller, OutcomePoller) or poller.loop is not loop:
        poller = OutcomePoller(client, loop)
        setattr(client, _ATTRIBUTE, poller)
    return poller
