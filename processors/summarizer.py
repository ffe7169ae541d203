"""The summarizer: consumes ``flush:{p}`` (budget requests of the accountant, manual
requests forwarded by the appender) and brings each memory back to its target.

For each memory of a batch it takes a snapshot, ignores requests that are stale (an
older generation) or already served (a budget request whose mark is gone), plans with
the pure domain code of ``memory.flush`` and applies the plan with one fenced script
that succeeds only if every planned message is still there and the generation is
unchanged; otherwise it plans again from a fresh snapshot, up to ``replans`` times.
Appends keep arriving meanwhile: a plan never touches them. Memories of one batch are
flushed concurrently, and a summary that takes too long falls back to the extractive
summarizer, so one slow summary holds its partition for at most ``summary_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import ResponseError

from events.codec import event_json, printable
from events.envelope import FlushPayload, FlushRequested, MemoryName
from memory import (
    FlushStrategy,
    MemoryRef,
    MemoryResource,
    Message,
    ResourceRegistry,
    StoredMessage,
)
from memory.errors import InvalidReferenceError
from memory.flush import Counted, Plan, plan_flush
from memory.resource import MemoryType
from memory.tokens import TokenCounter
from processors.failures import id_order, is_entry_fault
from processors.metrics import Metrics
from processors.port import Batch, EntryFailedError, Handled
from processors.summaries import ExtractiveWriter, SummaryWriter
from processors.tokenizers import Tokenizers
from store import (
    TRANSIENT_ERRORS,
    BudgetLimits,
    Change,
    Flushes,
    Group,
    Lease,
    LeaseLostError,
    Snapshot,
    StreamEntry,
)
from store.lock import DistributedLock, LockLostError, LockNotAcquiredError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """One entry of ``flush:{p}``."""

    entry: str
    memory_id: str
    gen: int
    request: str
    reason: str  # budget (the accountant) or manual (an event)
    strategy: FlushStrategy | None = None
    dry_run: bool = False

    @classmethod
    def parse(cls, entry: StreamEntry) -> FlushRequest:
        """The request of an entry; ValueError saying what is wrong with it."""
        f = entry.fields or {}
        missing = [name for name in ("memory", "gen", "request") if not f.get(name)]
        if missing:
            raise ValueError(f"a flush request needs {', '.join(missing)}")
        MemoryRef.parse_id(f["memory"])
        try:
            gen = int(f["gen"])
        except ValueError:
            raise ValueError(f"gen must be an integer, got {f['gen']!r}") from None
        strategy = None
        if f.get("strategy"):
            try:
                strategy = FlushStrategy(f["strategy"])
            except ValueError:
                known = ", ".join(s.value for s in FlushStrategy)
                raise ValueError(f"unknown strategy {f['strategy']!r}; one of {known}") from None
        return cls(
            entry=entry.id,
            memory_id=f["memory"],
            gen=gen,
            request=f["request"],
            reason=f.get("reason") or "manual",
            strategy=strategy,
            dry_run=f.get("dry_run") == "1",
        )


def limits_of(resource: MemoryResource) -> BudgetLimits:
    return BudgetLimits(
        tokens=resource.token_limit
        if resource.type is not MemoryType.MESSAGE_COUNT_BASED
        else None,
        messages=resource.max_messages if resource.type is not MemoryType.TOKEN_BASED else None,
        threshold=resource.flushing.summarize_threshold,
    )


def counted(snapshot: Snapshot, counter: TokenCounter) -> list[Counted]:
    """The snapshot's messages with their stored counts (the same function counts those
    the accountant has not reached yet) and how readers used them."""
    return [
        Counted(
            m,
            snapshot.counts[m.seq] if m.seq in snapshot.counts else counter.message(m),
            snapshot.last_used.get(m.seq, 0),
            snapshot.uses.get(m.seq, 0),
        )
        for m in snapshot.messages
    ]


class Summarizer:
    """The processor of ``flush:{p}``."""

    group = Group.SUMMARIZER

    def __init__(
        self,
        flushes: Flushes,
        registry: ResourceRegistry,
        tokenizers: Tokenizers,
        *,
        writer: SummaryWriter | None = None,
        lock: DistributedLock | None = None,
        replans: int = 3,
        summary_timeout: float = 60.0,
        concurrency: int = 8,
        lock_wait: float = 2.0,
        detach_after: float = 1.0,
        max_background: int = 16,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._flushes = flushes
        self.registry = registry  # replaced as a whole on reload (SIGHUP)
        self._tokenizers = tokenizers
        self._writer = writer or ExtractiveWriter()
        self._fallback = ExtractiveWriter()
        self._lock = lock
        self._replans = replans
        self._summary_timeout = summary_timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._lock_wait = lock_wait
        self._detach_after = detach_after
        # By partition: the flush running for each memory (and its entry ids), and the
        # entries of requests that wait for it.
        self._running: defaultdict[int, dict[str, tuple[asyncio.Task[None], set[str]]]] = (
            defaultdict(dict)
        )
        self._waiting: defaultdict[int, dict[str, set[str]]] = defaultdict(dict)
        # Entries whose background flush failed (not transiently), with the error.
        self._faults: defaultdict[int, dict[str, Exception]] = defaultdict(dict)
        self._max_background = max_background

    async def process(self, batch: Batch) -> Handled:
        """Start a flush per memory of the batch, concurrently, and return once they
        have ended or ``detach_after`` seconds have passed: a flush still running then
        (a slow LLM summary) goes on in the background and settles its requests itself,
        while the partition's other requests are served. A request for a memory whose
        flush is running waits (pending, passed over) until that flush ends."""
        p = batch.partition
        running = self._running[p]
        faulted = [e.id for e in batch.entries if e.id in self._faults[p]]
        if faulted:
            # A flush that failed in the background: its first entry is charged an
            # attempt (the loop narrows to it first when it came with others).
            if len(batch.entries) > 1:
                raise RuntimeError(f"the background flush of entry {faulted[0]} failed")
            raise EntryFailedError(faulted[0], self._faults[p].pop(faulted[0]))
        while len(running) >= self._max_background:
            await asyncio.wait(
                [task for task, _ in running.values()], return_when=asyncio.FIRST_COMPLETED
            )
        by_memory: dict[str, list[FlushRequest]] = defaultdict(list)
        for entry in batch.entries:
            try:
                request = FlushRequest.parse(entry)
            except (ValueError, InvalidReferenceError) as e:
                await self._refuse(batch.lease, entry, str(e))
                continue
            by_memory[request.memory_id].append(request)
        started = []
        for memory_id, requests in by_memory.items():
            if memory_id in running:
                self._waiting[p].setdefault(memory_id, set()).update(r.entry for r in requests)
                continue
            task = asyncio.create_task(self._guarded(batch.lease, requests))
            running[memory_id] = (task, {r.entry for r in requests})
            task.add_done_callback(functools.partial(self._ended, p, memory_id))
            started.append(task)
        if started:
            timeout = None if batch.narrowing else self._detach_after
            done, _ = await asyncio.wait(started, timeout=timeout)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        return Handled()

    def _ended(self, p: int, memory_id: str, task: asyncio.Task[None]) -> None:
        """A flush ended: its requests are settled (or, after an error, pending again),
        and the requests that waited for it are read again."""
        running = self._running.get(p)
        if running is None:
            return  # the partition was given up (``drop``)
        entries: set[str] = set()
        if running.get(memory_id, (None,))[0] is task:
            entries = running.pop(memory_id)[1]
        self._waiting[p].pop(memory_id, None)
        error = None if task.cancelled() else task.exception()
        if error is None:
            return
        log.warning(
            "partition %d: the flush of %s stopped: %r (its requests stay pending)",
            p,
            memory_id,
            error,
        )
        transient = isinstance(error, (LeaseLostError, *TRANSIENT_ERRORS)) and not (
            isinstance(error, ResponseError) and is_entry_fault(error)
        )
        if entries and not transient and isinstance(error, Exception):
            # Charged when its entry comes back (see ``process``).
            self._faults[p][min(entries, key=id_order)] = error

    def in_flight(self, partition: int) -> set[str]:
        ids: set[str] = set()
        for _, entries in self._running[partition].values():
            ids |= entries
        for entries in self._waiting[partition].values():
            ids |= entries
        return ids

    async def drop(self, partition: int, *, wait: float) -> None:
        tasks = [task for task, _ in self._running[partition].values()]
        try:
            if tasks and wait > 0:
                await asyncio.wait(tasks, timeout=wait)
        finally:
            self._running.pop(partition, None)
            self._waiting.pop(partition, None)
            self._faults.pop(partition, None)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _refuse(self, lease: Lease, entry: StreamEntry, why: str) -> None:
        fields = entry.fields or {}
        memory_id = fields.get("memory") or "-"
        log.error("partition %d: flush request %s refused: %s", lease.partition, entry.id, why)
        await self._flushes.finish(
            lease,
            memory_id if _valid_id(memory_id) else "-",
            gen=-1,
            entries=[entry.id],
            requests=[],
            rearm="",
            limits=BudgetLimits(None, None, 1.0),
            letter=_letter(entry, self._flushes.stream(lease.partition), "invalid", why),
        )

    async def _guarded(self, lease: Lease, requests: list[FlushRequest]) -> None:
        """Flush one memory; an error that is not transient ends the attempt with a dead
        letter (and clears the flush mark) instead of holding the partition."""
        async with self._slots:
            try:
                await self._locked(lease, requests)
            except LeaseLostError:
                raise
            except ResponseError as e:
                if not is_entry_fault(e):
                    raise
                await self._failed(lease, requests, e)
            except TRANSIENT_ERRORS:
                raise
            except Exception as e:
                await self._failed(lease, requests, e)

    async def _failed(self, lease: Lease, requests: list[FlushRequest], e: Exception) -> None:
        log.error(
            "partition %d: flushing %s failed: %r",
            lease.partition,
            requests[0].memory_id,
            e,
            exc_info=True,
        )
        await self._end(lease, requests, gen=requests[-1].gen, error=repr(e))

    async def _locked(self, lease: Lease, requests: list[FlushRequest]) -> None:
        """Flush under the memory's lock, which keeps two summarizers off one memory to
        save work. Correctness never depends on it: if it stays held (by a holder that
        died, say), the flush goes ahead, and the fenced apply script decides."""
        if self._lock is None:
            await self._flush(lease, requests)
            return
        memory_id = requests[0].memory_id
        resource = self.registry.find(MemoryRef.parse_id(memory_id).resource)
        ttl = resource.locking.flush_ttl if resource else 300.0
        try:
            async with self._lock.hold(f"flush:{memory_id}", ttl=ttl, wait=self._lock_wait):
                await self._flush(lease, requests)
        except LockNotAcquiredError:
            log.warning(
                "the flush lock of %s is held elsewhere (a worker that stopped?); "
                "flushing without it",
                memory_id,
            )
            await self._flush(lease, requests)
        except LockLostError:
            # The flush stopped where it was; its request, unless acknowledged by then,
            # is still pending and comes back first in the next read.
            log.warning("the flush lock of %s was lost; the flush will be retried", memory_id)

    async def _flush(self, lease: Lease, requests: list[FlushRequest]) -> None:
        memory_id = requests[0].memory_id
        ref = MemoryRef.parse_id(memory_id)
        resource = self.registry.find(ref.resource)
        if resource is None:
            await self._end(lease, requests, gen=requests[-1].gen, note="unknown_resource")
            return
        counter = self._tokenizers.for_resource(resource)
        for _ in range(self._replans + 1):
            snapshot = await self._flushes.snapshot(lease.partition, memory_id)
            if not snapshot.exists:
                await self._end(lease, requests, gen=requests[-1].gen, note="no_memory")
                return
            live = [
                r
                for r in requests
                if r.gen == snapshot.gen and (r.reason != "budget" or r.request == snapshot.mark)
            ]
            if not live:  # stale or already served
                await self._end(lease, requests, gen=snapshot.gen, note="served", resource=resource)
                return
            manual = [r for r in live if r.reason != "budget"]
            strategy = next((r.strategy for r in reversed(manual) if r.strategy), None)
            plan = plan_flush(counted(snapshot, counter), resource, strategy)
            if all(r.dry_run for r in live):
                log.info("dry run of a flush of %s: %s", memory_id, plan.describe())
                await self._end(
                    lease,
                    requests,
                    gen=snapshot.gen,
                    note="dry_run",
                    resource=resource,
                    plan=plan,
                )
                return
            if plan.empty:
                await self._end(
                    lease, requests, gen=snapshot.gen, note=plan.outcome.value, resource=resource
                )
                return
            change = await self._change(plan, snapshot, resource, counter, live[-1].entry)
            end = await self._flushes.finish(
                lease,
                memory_id,
                gen=snapshot.gen,
                entries=[r.entry for r in requests],
                requests=[r.request for r in requests],
                rearm=uuid.uuid4().hex,
                limits=limits_of(resource),
                change=change,
            )
            if end is not None:
                self._flushed(plan, end.tokens, len(requests))
                log.info(
                    "flushed %s (%s): %d -> %d tokens, %d message(s) left%s",
                    memory_id,
                    plan.strategy.value,
                    plan.tokens_before,
                    end.tokens,
                    end.messages,
                    "; still over, flush requested again" if end.rearmed else "",
                )
                return
            log.info("%s changed while its flush was planned; planning again", memory_id)
        await self._end(lease, requests, gen=requests[-1].gen, note="gave_up", resource=resource)

    def _flushed(self, plan: Plan, tokens_after: int, requests: int) -> None:
        try:  # the flush is applied: metrics never fail it
            m, strategy = self._metrics, plan.strategy.value
            m.flushes.labels(strategy, "applied").inc()
            m.tokens_saved.labels(strategy).inc(max(0, plan.tokens_before - tokens_after))
            m.settled(self.group.value, [("flush", "applied")] * requests)
        except Exception:
            log.exception("recording the metrics of a flush failed")

    async def _change(
        self,
        plan: Plan,
        snapshot: Snapshot,
        resource: MemoryResource,
        counter: TokenCounter,
        entry: str,
    ) -> Change:
        summary_json, summary_tokens = None, 0
        if plan.summarize:
            by_seq = {m.seq: m for m in snapshot.messages}
            folded = [by_seq[s] for s in plan.summarize]
            message = await self._summary(folded, plan.summary_budget, counter)
            stored = message.to_json_dict() | {"covers": list(plan.covers)}
            summary_json = StoredMessage.model_validate(
                stored | {"seq": 0, "gen": 0, "at": 0, "entry": entry}
            ).model_dump_json(exclude_none=True, exclude_defaults=True, include=set(stored))
            summary_tokens = counter.message(message)
        return Change(
            strategy=plan.strategy.value,
            entry=entry,
            remove=plan.remove,
            summarize=plan.summarize,
            digests={seq: snapshot.digests[seq] for seq in plan.seqs},
            summary=summary_json,
            summary_tokens=summary_tokens,
        )

    async def _summary(
        self, folded: Sequence[StoredMessage], budget: int, counter: TokenCounter
    ) -> Message:
        """The writer's summary; the extractive one when it fails, takes longer than
        ``summary_timeout`` or overshoots the budget."""
        if self._writer.name != self._fallback.name:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._summary_timeout):
                    message = await self._writer.write(folded, budget, counter)
                self._metrics.summary_seconds.labels("llm").observe(time.perf_counter() - started)
                if counter.message(message) <= budget:
                    return message
                log.warning(
                    "the %s summary is over its budget of %d tokens", self._writer.name, budget
                )
            except Exception as e:  # any failure of a writer falls back
                log.warning(
                    "the %s summary failed (%r); writing an extractive one", self._writer.name, e
                )
        started = time.perf_counter()
        message = await self._fallback.write(folded, budget, counter)
        self._metrics.summary_seconds.labels("extractive").observe(time.perf_counter() - started)
        return message

    async def _end(
        self,
        lease: Lease,
        requests: list[FlushRequest],
        *,
        gen: int,
        note: str | None = None,
        error: str | None = None,
        resource: MemoryResource | None = None,
        plan: Plan | None = None,
    ) -> None:
        memory_id = requests[0].memory_id
        if resource is None:
            resource = self.registry.find(MemoryRef.parse_id(memory_id).resource)
        result = "failed" if error is not None else (note or "ended")
        strategy = (
            plan.strategy.value
            if plan is not None
            else next((r.strategy.value for r in reversed(requests) if r.strategy), None)
            or (resource.flushing.type.value if resource is not None else "unknown")
        )
        letter = None
        if error is not None:
            # The letter keeps a manual flush request for the memory: replaying it
            # (``memstream dlq replay``) asks for the flush again.
            letter = {
                "event": _flush_event(memory_id, requests[-1].strategy),
                "reason": "failed",
                "detail": error,
                "entry": requests[-1].entry,
                "source": self._flushes.stream(lease.partition),
                "memory": memory_id,
            }
        await self._flushes.finish(
            lease,
            memory_id,
            gen=gen,
            entries=[r.entry for r in requests],
            requests=[r.request for r in requests],
            rearm=uuid.uuid4().hex,
            limits=limits_of(resource) if resource else BudgetLimits(None, None, 1.0),
            note=note or ("failed" if error else None),
            plan=plan.describe() if plan else None,
            letter=letter,
        )
        try:  # recorded once the end is settled (a retried end is not counted twice)
            m = self._metrics
            m.flushes.labels(strategy, result).inc()
            m.settled(self.group.value, [("flush", result)] * len(requests))
            if letter is not None:
                m.dead_letters.labels(self.group.value, "failed").inc()
        except Exception:
            log.exception("recording the metrics of a flush failed")


def _valid_id(memory_id: str) -> bool:
    with contextlib.suppress(InvalidReferenceError, ValueError):
        MemoryRef.parse_id(memory_id)
        return True
    return False


def _flush_event(memory_id: str, strategy: FlushStrategy | None) -> str:
    ref = MemoryRef.parse_id(memory_id)
    payload = FlushPayload(memory=MemoryName(resource=ref.resource, key=ref.key), strategy=strategy)
    return event_json(FlushRequested(tenant=ref.tenant, payload=payload))


def _letter(entry: StreamEntry, source: str, reason: str, detail: str) -> dict[str, str]:
    fields = entry.fields or {}
    return {
        "event": printable(json.dumps(fields)),
        "reason": reason,
        "detail": detail,
        "entry": entry.id,
        "source": source,
        **({"memory": printable(fields["memory"])} if fields.get("memory") else {}),
    }
