"""One owned partition: take over what is pending, then deliver batches to the processor
in order, fenced, until told to stop or the lease is lost (DESIGN rules 2 to 5).

Failures are sorted in two kinds. Transient ones (Redis unreachable, timeouts, OOM,
cluster reconfiguration, lease loss) are retried with backoff and never counted.
Anything else is the fault of an entry: a failing batch is narrowed to its first entry,
and a failing single entry counts one attempt; after ``max_attempts`` it is
dead-lettered and the partition moves on. Until then it holds the partition back, so
no later entry overtakes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field

from redis.exceptions import ResponseError

from events.codec import printable, well_formed_replay_fields
from processors.failures import Backoff, id_order, is_entry_fault
from processors.metrics import Metrics
from processors.port import (
    Batch,
    EntryFailedError,
    Processor,
    WorksInBackground,
    WritesLetters,
)
from store import (
    TRANSIENT_ERRORS,
    Lease,
    LeaseLostError,
    PartitionStreams,
    Settle,
    StreamEntry,
    ensure_groups,
)
from store.keys import Keys
from store.scripts import Scripts

log = logging.getLogger(__name__)
#: Redis 6.2 keeps no lag: up to this many undelivered entries are counted (the gauge
#: then reads LAG_CAP for "at least").
LAG_CAP = 1000


@dataclass(frozen=True, slots=True)
class LoopConfig:
    batch_size: int = 100
    block_ms: int = 1000
    max_attempts: int = 10
    outcome_ttl_ms: int = 600_000
    trim_interval: float = 5.0
    exact_trim: bool = True
    backoff_max: float = 2.0
    max_batch_bytes: int = 8 * 1024 * 1024
    # How long background work may go on when a partition is given up; it must end well
    # within the lease TTL (a lease that expires meanwhile charges a pending entry).
    drain_seconds: float = 0.0


@dataclass
class PartitionState:
    """Shared between a partition's loop and the worker that owns it."""

    partition: int
    lease: Lease
    #: When the lease may expire (time.monotonic()): the last successful refresh, or the
    #: acquisition, was sent a lease TTL before. The worker gives the partition up then.
    valid_until: float = math.inf
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False
    #: A lease refresh failed because Redis could not be reached (then a loss is Redis's
    #: fault, not the pending entries').
    unreachable: bool = False
    idle: bool = False
    settled: int = 0


class PartitionLoop:
    def __init__(
        self,
        *,
        scripts: Scripts,
        keys: Keys,
        streams: PartitionStreams,
        processor: Processor,
        consumer: str,
        config: LoopConfig,
        state: PartitionState,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._name = streams.group.value
        self._scripts = scripts
        self._keys = keys
        self._streams = streams
        self._processor = processor
        # What works in the background, looked up once (a runtime-checked Protocol costs
        # an attribute walk per isinstance, twice a step).
        self._background = processor if isinstance(processor, WorksInBackground) else None
        self._consumer = consumer
        self._config = config
        self.state = state
        self._held = True  # unknown at takeover: the first clean step clears any marker
        # Entries up to this id are processed one at a time: those a dead holder left
        # pending (so a crash is charged to the entry that caused it), and those of a
        # batch that failed (until the entry at fault is found).
        self._narrow_through: str | None = None
        self._last_trim = 0.0

    @property
    def _lease(self) -> Lease:
        return self.state.lease

    @property
    def _p(self) -> int:
        return self.state.partition

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.state.stop.wait()

    async def run(self) -> None:
        """Run until stopped or the lease is lost; never raises but CancelledError."""
        try:
            await self._run()
        finally:
            self._metrics.forget_partition(self._name, self._p)
            if isinstance(self._processor, WorksInBackground):
                # Given up: let background work end a moment; lost: stop it now.
                wait = 0.0 if self.state.lost else self._config.drain_seconds
                await self._processor.drop(self._p, wait=wait)

    def _in_flight(self) -> set[str]:
        if self._background is not None:
            return self._background.in_flight(self._p)
        return set()

    async def _run(self) -> None:
        backoff = Backoff(cap=self._config.backoff_max)
        claimed = False
        while not self.state.stop.is_set():
            try:
                if not claimed:
                    await self._take_over()
                    claimed = True
                await self._step()
                backoff.reset()
            except LeaseLostError:
                log.warning("partition %d: lease lost, stopping its loop", self._p)
                self._metrics.lease_losses.labels(self._name).inc()
                self.state.lost = True
                return
            except ResponseError as e:
                self._redis_error(e)
                if "NOGROUP" in str(e):
                    log.warning("partition %d: consumer group missing, creating it", self._p)
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        await ensure_groups(self._scripts, self._keys, self._p)
                else:
                    log.error("partition %d: Redis refused a step: %s", self._p, e)
                await self._sleep(backoff.next())
            except TRANSIENT_ERRORS as e:
                self._redis_error(e)
                log.warning("partition %d: Redis unavailable (%s); retrying", self._p, e)
                await self._sleep(backoff.next())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("partition %d: unexpected failure; retrying", self._p)
                await self._sleep(backoff.next())

    def _redis_error(self, e: Exception) -> None:
        self._metrics.redis_errors.labels(self._name, type(e).__name__).inc()
        self._metrics.retries.labels(self._name).inc()

    async def _take_over(self) -> None:
        claim = await self._streams.claim_all(self._lease, self._consumer)
        if claim.gone:
            await self._settle_erased(claim.gone)
        if claim.claimed:
            self._narrow_through = max(claim.claimed, key=id_order)
            log.info(
                "partition %d: took over %d pending entries (fence %d)",
                self._p,
                len(claim.claimed),
                self._lease.fence,
            )

    async def _settle_erased(self, ids: list[str]) -> None:
        detail = "the entry was gone from the stream before it was processed"
        settles = [Settle(i, "erased", "erased", detail) for i in ids]
        await self._streams.settle(self._lease, settles, self._config.outcome_ttl_ms)
        self._metrics.settled(self._name, [("erased", "erased")] * len(ids))

    async def _step(self) -> None:
        cfg = self._config
        count = 1 if self._narrow_through else cfg.batch_size
        in_flight = self._in_flight()
        if self._narrow_through and in_flight:
            # One entry at a time means after the background work ends, too.
            await self._sleep(0.05)
            return
        delivery = await self._streams.read(
            self._lease, self._consumer, count, cfg.max_batch_bytes, skip=sorted(in_flight)
        )
        if delivery.source == "new" and delivery.entries and self._in_flight() != in_flight:
            # Background work ended during the read: what it released comes first, in
            # id order with these (all pending now), at the next read.
            return
        if not delivery.entries:
            self.state.idle = not in_flight
            await self._maybe_trim()
            await self._wait(delivery.tail)
            return
        self.state.idle = False
        entries = list(delivery.entries)
        gone = [e.id for e in entries if e.fields is None]
        if gone:
            await self._settle_erased(gone)
            entries = [e for e in entries if e.fields is not None]
        if entries and entries[0].attempts >= cfg.max_attempts:
            await self._dead_letter(
                entries[0], "attempts_exhausted", "workers stopped while processing it"
            )
            return
        if not entries:
            self._passed(delivery.entries[-1].id)
            return
        if entries and entries[0].attempts > 0:
            entries = entries[:1]  # an entry with counted attempts is processed alone
        drained = False
        if entries:
            settled = await self._process(entries)
            # A short delivery of new entries, all settled, left nothing behind up to
            # the tail it was read at: wait for more from there instead of reading the
            # (empty) stream once more, which costs a fenced script call per batch.
            drained = (
                settled
                and delivery.source == "new"
                and not delivery.more
                and len(delivery.entries) < count
                and len(entries) == len(delivery.entries) - len(gone)
            )
        await self._maybe_trim()
        if drained:
            self.state.idle = not self._in_flight()
            await self._wait(delivery.tail)

    async def _process(self, entries: list[StreamEntry]) -> bool:
        """Process a batch; True when every entry of it was settled."""
        batch = Batch(self._p, self._lease, entries, narrowing=self._narrow_through is not None)
        started = time.perf_counter()
        try:
            try:
                handled = await self._processor.process(batch)
            finally:
                self._metrics.batch_seconds.labels(self._name).observe(
                    time.perf_counter() - started
                )
        except EntryFailedError as e:
            await self._count_failure(e.entry_id, repr(e.cause), entries)
            return False
        except LeaseLostError:
            raise
        except ResponseError as e:
            if not is_entry_fault(e):
                raise
            await self._failed(entries, f"script error: {e}")
            return False
        except TRANSIENT_ERRORS:
            raise
        except Exception as e:
            # The traceback may quote an event: only at debug level (the error itself is
            # logged redacted when it is counted).
            log.debug("partition %d: processing failed", self._p, exc_info=True)
            await self._failed(entries, repr(e))
            return False
        self._passed(entries[-1].id)
        self.state.settled += len(entries)
        if handled.held is not None:
            await self._hold(handled.held.entry_id, handled.held.reason)
            return False
        if self._held:
            await self._mark_held("")
            self._held = False
        return not handled.partial

    def _passed(self, entry_id: str) -> None:
        """Entries up to ``entry_id`` are settled: stop narrowing once past the range."""
        if self._narrow_through and id_order(entry_id) >= id_order(self._narrow_through):
            self._narrow_through = None

    async def _failed(self, entries: list[StreamEntry], error: str) -> None:
        """A failure not tied to one entry: narrow to one entry at a time through the
        failed batch, then count the one that fails."""
        if len(entries) > 1:
            # The error may quote any entry's event, and which entry's policy would redact
            # it is not known yet: only its kind here (the text, redacted, once counted).
            log.warning(
                "partition %d: a batch of %d failed (%s); retrying its entries one by one",
                self._p,
                len(entries),
                error.split("(", 1)[0].split(":", 1)[0],
            )
            self._narrow_through = entries[-1].id
            return
        await self._count_failure(entries[0].id, error, entries)

    async def _count_failure(self, entry_id: str, error: str, entries: list[StreamEntry]) -> None:
        entry = next(e for e in entries if e.id == entry_id)
        # Counted first: nothing said of the entry below may keep it from being counted.
        attempts = await self._streams.count_attempt(self._lease, entry_id)
        _, error = self._letter(entry, error)  # errors may quote the event
        self._metrics.failed_attempts.labels(self._name).inc()
        log.warning(
            "partition %d: entry %s failed (attempt %d of %d): %s",
            self._p,
            entry_id,
            attempts,
            self._config.max_attempts,
            error,
        )
        if attempts >= self._config.max_attempts:
            await self._dead_letter(entry, "failed", error, attempts)
        else:
            # `memstream status` names the entry the partition is stuck on until it
            # passes (the next clean step clears the marker) or is dead-lettered.
            info = {
                "entry": entry_id,
                "kind": "failing",
                "reason": f"failing (attempt {attempts} of {self._config.max_attempts}): "
                f"{error[:500]}",
                "attempts": attempts,
                "max_attempts": self._config.max_attempts,
                "error": error[:500],
                "worker": self._consumer,
                "at": int(time.time()),
            }
            await self._mark_held(json.dumps(info))
            self._held = True
            backoff = Backoff(base=0.2, cap=self._config.backoff_max, tries=attempts - 1)
            await self._sleep(backoff.next())

    async def _dead_letter(
        self, entry: StreamEntry, reason: str, detail: str, attempts: int | None = None
    ) -> None:
        fields = entry.fields or {}
        event, detail = self._letter(entry, detail)
        letter = {
            "event": event,
            "reason": reason,
            "detail": detail,
            "entry": entry.id,
            "source": self._streams.stream(self._p),
            "attempts": str(attempts or entry.attempts),
        }
        letter.update(well_formed_replay_fields(fields))
        settle = Settle(entry.id, "refused", reason, detail, letter=letter)
        await self._streams.settle(self._lease, [settle], self._config.outcome_ttl_ms)
        if self._held:  # it was stuck on this entry: not any more
            await self._mark_held("")
            self._held = False
        self._metrics.dead_letters.labels(self._name, reason).inc()
        self._metrics.settled(self._name, [("dlq", "refused")])
        self._passed(entry.id)
        log.error(
            "partition %d: entry %s dead-lettered (%s: %s)", self._p, entry.id, reason, detail
        )

    def _letter(self, entry: StreamEntry, detail: str) -> tuple[str, str]:
        """What a dead letter (or a log line) keeps of an entry and of an error that may
        quote it; never raises. A processor that redacts and fails to keeps neither."""
        if not isinstance(self._processor, WritesLetters):
            fields = entry.fields or {}
            return printable(fields.get("event", json.dumps(fields))), detail
        try:
            return self._processor.letter(entry, detail)
        except Exception as e:
            log.error(
                "partition %d: entry %s could not be redacted for its dead letter (%s); "
                "neither its event nor its error is kept",
                self._p,
                entry.id,
                type(e).__name__,
            )
            return "", f"the error could not be redacted ({type(e).__name__})"

    async def _hold(self, entry_id: str, reason: str) -> None:
        info = {
            "entry": entry_id,
            "kind": "newer_schema",
            "reason": reason,
            "worker": self._consumer,
            "at": int(time.time()),
        }
        await self._mark_held(json.dumps(info))
        if not self._held:
            log.error("partition %d held back at entry %s: %s", self._p, entry_id, reason)
        self._held = True
        await self._sleep(min(5.0, self._config.backoff_max * 2))

    async def _mark_held(self, info: str) -> None:
        reply = await self._scripts(
            "mark_held",
            [
                self._keys.lease(self._p, self._streams.group),
                self._keys.held(self._p, self._streams.group),
            ],
            [self._lease.value, info],
        )
        if reply[0] == "stale":
            raise LeaseLostError(self._p, self._streams.group.value)

    async def _maybe_trim(self) -> None:
        now = time.monotonic()
        if now - self._last_trim < self._config.trim_interval:
            return
        self._last_trim = now
        await self._streams.trim(self._p, exact=self._config.exact_trim)
        try:  # a metric: never a reason to back off
            lag = await self._streams.lag(self._p, cap=LAG_CAP)
        except TRANSIENT_ERRORS as e:
            log.debug("partition %d: reading the lag failed: %s", self._p, e)
            return
        if lag is not None:
            self._metrics.lag.labels(self._name, str(self._p)).set(lag)

    async def _wait(self, tail: str) -> None:
        """Wait for data with a plain XREAD BLOCK (delivers nothing), or for stop."""
        waiter = asyncio.create_task(self._streams.wait(self._p, tail, self._config.block_ms))
        stopper = asyncio.create_task(self.state.stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, stopper):
                if not task.done():
                    task.cancel()
            for task in (waiter, stopper):
                with contextlib.suppress(asyncio.CancelledError, *TRANSIENT_ERRORS):
                    await task
        if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
            raise waiter.exception()  # type: ignore[misc]
