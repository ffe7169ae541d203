"""The partitioned consumer runtime: membership with heartbeats, rendezvous assignment,
leases with fencing, one loop per owned partition, rebalancing and graceful shutdown.

A partition whose lease has not been refreshed for its TTL (Redis unreachable or hung)
is given up at once, even while its loop waits for Redis: by then another worker may
hold it. It is acquired again, with a new fence, once Redis answers.

The same runtime serves every partitioned processor; each runs as its own consumer
group with its own membership and leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass, field

from redis.exceptions import NoPermissionError, ResponseError

from processors.assignment import assigned
from processors.failures import Backoff
from processors.metrics import Metrics
from processors.partition import LoopConfig, PartitionLoop, PartitionState
from processors.port import Processor
from store import (
    GROUP_TOPIC,
    TRANSIENT_ERRORS,
    CircuitRecord,
    Keys,
    Lease,
    Leases,
    PartitionCountChangedError,
    PartitionStreams,
    RedisClient,
    Scripts,
    breaker_of,
    ensure_groups,
    record_circuit,
)
from store.breaker import is_transport_failure
from store.keys import SINGLE_PARTITION_TOPICS
from store.repartition import refuse_while_repartitioning

log = logging.getLogger(__name__)
#: How often the event loop's responsiveness is sampled, and the lag that counts as a
#: stall (a step that blocked the loop).
TICK = 0.1
STALL = 0.5


def _refusal(error: ResponseError) -> bool:
    """An error reply that waiting does not change: a permission, a password or a key
    of the wrong type (others, such as a Cluster failing over, pass)."""
    text = str(error)
    return isinstance(error, NoPermissionError) or text.startswith(
        ("NOPERM", "WRONGPASS", "WRONGTYPE", "NOAUTH")
    )


#: How long the breaker record of a worker not heard from stays (``memstream status``).
CIRCUIT_RECORD_KEEP_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    lease_ttl_ms: int = 10_000
    heartbeat_ms: int = 1_000
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if self.heartbeat_ms * 3 > self.lease_ttl_ms:
            raise ValueError(
                f"heartbeat ({self.heartbeat_ms} ms) must be at most a third of the lease "
                f"TTL ({self.lease_ttl_ms} ms), so a lease is renewed several times before "
                f"it can expire"
            )


def new_worker_id() -> str:
    host = socket.gethostname().split(".")[0][:24] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Worker:
    """One worker of one processor: owns some partitions, processes them, gives them up."""

    def __init__(
        self,
        client: RedisClient,
        scripts: Scripts,
        keys: Keys,
        processor: Processor,
        partitions: int,
        config: WorkerConfig | None = None,
        worker_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config or WorkerConfig()
        self.metrics = metrics or Metrics()
        self.id = worker_id or new_worker_id()
        self.group = processor.group
        self.partitions = partitions
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self._processor = processor
        # A lease is taken only of a partition of this worker's count (a worker paused
        # through a `memstream repartition` never works on the old count again).
        single = GROUP_TOPIC[self.group] in SINGLE_PARTITION_TOPICS
        self.leases = Leases(
            scripts,
            keys,
            self.group.value,
            self.config.lease_ttl_ms,
            partitions=0 if single else partitions,
        )
        self.streams = PartitionStreams(client, scripts, keys, self.group)
        self.owned: dict[int, PartitionState] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._groups_ready: set[int] = set()
        self.members: list[str] = []
        self.rebalances = 0
        self._task_group: asyncio.TaskGroup | None = None
        self._watchdogs: dict[int, asyncio.Task[None]] = {}
        #: Leases given up while Redis could not be reached, not yet said to be clean.
        self._unreleased: dict[int, Lease] = {}
        #: When the event loop was last seen stalled (time.monotonic()).
        self._last_stall = -math.inf
        self._breaker = breaker_of(client)

    @property
    def processor(self) -> Processor:
        return self._processor

    @property
    def member_ttl_ms(self) -> int:
        return self.config.lease_ttl_ms

    @property
    def _lease_ttl(self) -> float:
        return self.config.lease_ttl_ms / 1000

    async def _record_circuit(self, *, leave: bool = False) -> None:
        """Record this client's breaker for ``memstream status`` (never a reason to fail)."""
        if self._breaker is None:
            return
        record = None if leave else CircuitRecord.of(self._breaker)
        try:
            await record_circuit(
                self._scripts, self._keys, self.group.value, self.id, record, CIRCUIT_RECORD_KEEP_MS
            )
        except TRANSIENT_ERRORS as e:
            log.debug("worker %s: recording the circuit breaker failed (%s)", self.id, e)

    async def heartbeat(self, *, leave: bool = False) -> list[str]:
        reply = await self._scripts(
            "heartbeat",
            [self._keys.members(self.group.value)],
            [self.id, self.member_ttl_ms, "1" if leave else "0"],
        )
        return [str(m) for m in reply]

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Run until ``stop`` is set (or, with ``until_idle``, until every partition this
        worker should own is owned and has nothing left to process)."""
        log.info("worker %s (%s) starting", self.id, self.group.value)
        ticker = asyncio.create_task(self._watch_loop())
        try:
            # A member first, then the check: a repartition starting now sees this worker.
            if not await self._first_heartbeat(stop):
                return
            single = GROUP_TOPIC[self.group] in SINGLE_PARTITION_TOPICS
            await refuse_while_repartitioning(
                self._client, self._keys, None if single else self.partitions
            )
            # One task group holds the loops of the owned partitions: leaving it waits
            # for every loop to finish its batch and release its lease.
            changed: PartitionCountChangedError | None = None
            async with asyncio.TaskGroup() as tasks:
                self._task_group = tasks
                try:
                    while not stop.is_set():
                        try:
                            await self._tick()
                        except PartitionCountChangedError as e:
                            log.error("worker %s stops: %s", self.id, e)
                            changed = e
                            break
                        if until_idle and self._idle():
                            break
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.config.heartbeat_ms / 1000):
                                await stop.wait()
                finally:
                    for state in self.owned.values():
                        state.stop.set()
            if changed is not None:  # every loop stopped and its lease released
                raise changed
        finally:
            ticker.cancel()
            self._task_group = None
            await self.shutdown()

    async def _first_heartbeat(self, stop: asyncio.Event) -> bool:
        """Become a member, retrying with backoff while Redis cannot be reached or
        refuses writes (out of memory); False when stopped meanwhile."""
        backoff = Backoff(base=0.1, cap=self.config.heartbeat_ms / 1000 * 5)
        while not stop.is_set():
            try:
                await self.heartbeat()
                return True
            except TRANSIENT_ERRORS as e:
                if isinstance(e, ResponseError) and _refusal(e):
                    raise  # an answer that waiting does not change (NOPERM, WRONGTYPE, ...)
                log.warning("worker %s: cannot join the %s group yet (%s)", self.id, self.group, e)
                self.metrics.redis_errors.labels(self.group.value, type(e).__name__).inc()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff.next()):
                    await stop.wait()
        return False

    async def _watch_loop(self) -> None:
        """Note when the event loop stalls (a step that blocked it): calls time out then
        though Redis is fine, and a partition lost meanwhile is not Redis's fault."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK)
            if time.monotonic() - before - TICK > STALL:
                self._last_stall = time.monotonic()

    def _stalled_since(self, moment: float) -> bool:
        return self._last_stall >= moment

    def _idle(self) -> bool:
        desired = assigned(self.id, self.members, self.partitions)
        return (
            bool(self.members)
            and set(self.owned) == desired
            and all(s.idle and not s.stop.is_set() for s in self.owned.values())
        )

    async def _tick(self) -> None:
        try:
            members: list[str] | None = await self.heartbeat()
        except TRANSIENT_ERRORS as e:
            # Leases are still renewed (a refresh writes nothing new, so it works even
            # when Redis refuses writes for lack of memory); nothing new is taken.
            log.warning("worker %s: heartbeat failed (%s)", self.id, e)
            self.metrics.redis_errors.labels(self.group.value, type(e).__name__).inc()
            members = None
        if members is not None:
            await self._record_circuit()
        if members is not None and members != self.members:
            if self.members:
                self.rebalances += 1
                self.metrics.rebalances.labels(self.group.value).inc()
                log.info("worker %s: members now %s", self.id, ", ".join(members))
            self.members = members
        desired = assigned(self.id, self.members, self.partitions)
        await self._keep(desired)
        if members is not None:
            for p in sorted(desired - set(self.owned)):
                try:
                    await self._acquire(p)
                except TRANSIENT_ERRORS as e:
                    log.warning("worker %s: cannot acquire partition %d (%s)", self.id, p, e)
        self.metrics.partitions_owned.labels(self.group.value).set(len(self.owned))

    async def _keep(self, desired: set[int]) -> None:
        """Renew the leases of the partitions to keep (all at once, so one slow reply
        does not delay the others); let the others go."""
        renew = []
        for p, state in list(self.owned.items()):
            if self._tasks[p].done():
                del self.owned[p], self._tasks[p]
                continue
            if p not in desired:
                state.stop.set()
                continue
            if not state.stop.is_set():  # a partition given up is not renewed
                renew.append(state)
        if renew:
            await asyncio.gather(*(self._refresh(state) for state in renew))

    async def _refresh(self, state: PartitionState) -> None:
        sent = time.monotonic()  # Redis extends the lease after this: safe to count from
        try:
            held = await self.leases.refresh(state.lease)
        except TRANSIENT_ERRORS as e:
            log.warning(
                "worker %s: lease refresh of partition %d failed (%s)", self.id, state.partition, e
            )
            # Redis's fault only when Redis could not be reached while this process kept
            # running: a stalled event loop (a blocking step of an entry) times calls out
            # too, and then the entry is to blame.
            if is_transport_failure(e) and not self._stalled_since(sent - self._lease_ttl):
                state.unreachable = True
            return
        if held:
            state.valid_until = sent + self._lease_ttl
            state.unreachable = False
            return
        log.warning("worker %s: lease on partition %d lost", self.id, state.partition)
        self.metrics.lease_losses.labels(self.group.value).inc()
        state.lost = True
        state.stop.set()

    async def _expire(self, state: PartitionState) -> None:
        """Give the partition up once its lease may have expired: the last successful
        refresh (or the acquisition) was sent a lease TTL ago."""
        while not state.stop.is_set():
            left = state.valid_until - time.monotonic()
            if left <= 0:
                log.warning(
                    "worker %s: lease on partition %d lost: not renewed for %.1fs (its TTL), "
                    "giving the partition up",
                    self.id,
                    state.partition,
                    self._lease_ttl - left,
                )
                self.metrics.lease_losses.labels(self.group.value).inc()
                state.lost = True
                state.stop.set()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await state.stop.wait()

    async def _acquire(self, p: int) -> None:
        lost = self._unreleased.get(p)
        if lost is not None:
            await self.leases.release_lost(lost)
            del self._unreleased[p]
        if p not in self._groups_ready:
            await ensure_groups(self._scripts, self._keys, p)
            self._groups_ready.add(p)
        sent = time.monotonic()
        lease = await self.leases.acquire(p, self.id)
        if lease is None:
            return
        state = PartitionState(p, lease, valid_until=sent + self._lease_ttl)
        loop = PartitionLoop(
            scripts=self._scripts,
            keys=self._keys,
            streams=self.streams,
            processor=self._processor,
            consumer=self.id,
            config=self.config.loop,
            state=state,
            metrics=self.metrics,
        )
        self.owned[p] = state
        if self._task_group is None:
            raise RuntimeError("partitions are acquired only while the worker runs")
        self._tasks[p] = self._task_group.create_task(self._own(loop), name=f"{self.group}-{p}")
        log.info("worker %s: acquired partition %d (fence %d)", self.id, p, lease.fence)

    async def _own(self, loop: PartitionLoop) -> None:
        state = loop.state
        self._watchdogs[state.partition] = asyncio.create_task(self._expire(state))
        try:
            await loop.run()
        except Exception:  # never let one partition abort the others (the task group)
            log.exception("worker %s: partition %d loop failed", self.id, state.partition)
        finally:
            watchdog = self._watchdogs.pop(state.partition, None)
            if watchdog is not None:
                watchdog.cancel()
            if not state.lost:
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await self.leases.release(state.lease)
                log.info("worker %s: released partition %d", self.id, state.partition)
            elif state.unreachable:
                # Given up because Redis could not be reached: not the entries' fault. Said
                # now, or (Redis still unreachable) before this worker acquires it again.
                self._unreleased[state.partition] = state.lease
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await self.leases.release_lost(state.lease)
                    del self._unreleased[state.partition]

    async def shutdown(self) -> None:
        """Finish the batches in flight, release every lease, leave the membership (the
        end of ``run``; callable on its own for a worker that was never run)."""
        for state in self.owned.values():
            state.stop.set()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.owned.clear()
        self._tasks.clear()
        self.metrics.partitions_owned.labels(self.group.value).set(0)
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.heartbeat(leave=True)
        await self._record_circuit(leave=True)
        log.info("worker %s (%s) stopped", self.id, self.group.value)
