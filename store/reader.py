"""The read side: materialized memories and the outcomes of published entries."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from memory import MemoryRef, MemoryResource, StoredMessage, partition_for
from memory.flush import Counted, PrioritiesCache, fit_budget
from memory.privacy import event_ref
from memory.tokens import TokenCounter
from store.config import PARTITIONS_TTL, get_partitions, read_partitions
from store.connection import RedisClient
from store.errors import (
    GenerationChangedError,
    OutcomeMismatchError,
    RepartitionInProgressError,
    WaitTimeoutError,
)
from store.keys import Group, Keys
from store.poller import poller_of
from store.scripts import Scripts

MAX_PAGE = 1000
_MESSAGES = TypeAdapter(list[StoredMessage])
log = logging.getLogger(__name__)


class OutcomeStatus(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # an idempotency key seen before, or an entry applied before
    REFUSED = "refused"  # with the reason; dead-lettered unless the reason says otherwise
    ERASED = "erased"  # the entry was deleted from the stream before it was applied


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one published entry."""

    status: OutcomeStatus
    reason: str | None = None
    detail: str | None = None
    seq: int | None = None
    gen: int | None = None
    event_id: str | None = None
    dead_letter: str | None = None
    backup: str | None = None  # a clear with a backup: the backup's id

    @property
    def ok(self) -> bool:
        return self.status in (OutcomeStatus.APPLIED, OutcomeStatus.DUPLICATE)

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        data: dict[str, Any] = json.loads(text)
        return cls(
            status=OutcomeStatus(data["status"]),
            reason=data.get("reason"),
            detail=data.get("detail"),
            seq=data.get("seq"),
            gen=data.get("gen"),
            event_id=data.get("event") or None,
            dead_letter=data.get("dead_letter"),
            backup=data.get("backup"),
        )


@dataclass(frozen=True, slots=True)
class MemoryView:
    """A window of one memory, read in one consistent snapshot."""

    ref: MemoryRef
    partition: int
    exists: bool
    generation: int
    count: int
    watermark: str
    messages: list[StoredMessage] = field(default_factory=list)
    created_ms: int | None = None
    updated_ms: int | None = None
    token_counts: list[int | None] = field(default_factory=list)  # per message; None: not yet
    tokens: int = 0  # exact total of the counted messages
    counted: int = 0  # how many messages are counted
    flush_pending: bool = False  # a flush was requested for this generation
    meta: dict[str, str] = field(default_factory=dict)  # the memory's meta hash, as stored

    @property
    def next_after(self) -> int | None:
        """The sequence to pass as ``after`` for the next page, None when empty."""
        return self.messages[-1].seq if self.messages else None


@dataclass(frozen=True, slots=True)
class ContextWindow:
    """What of a memory fits a context budget (``MemoryReader.read_context``)."""

    view: MemoryView  # the memory's meta, and the messages that came back from Redis
    messages: list[StoredMessage]
    tokens: int
    budget: int | None
    over_budget: bool  # the protected messages alone exceed the budget
    read: int = 0  # messages read from the memory's log to choose them
    read_bytes: int | None = None  # their stored length (None: not measured)


class MemoryReader:
    """Reads materialized memories and waits for published entries to be applied."""

    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self._partitions: int | None = None
        self._partitions_read = 0.0
        self._touching: set[asyncio.Task[None]] = set()
        self._priorities = PrioritiesCache()

    async def partitions(self) -> int:
        """The stored count, read again every PARTITIONS_TTL seconds; raises
        RepartitionInProgressError while ``memstream repartition`` runs (a memory may be
        in neither partition for a moment)."""
        now = time.monotonic()
        if self._partitions is None or now - self._partitions_read >= PARTITIONS_TTL:
            stored, target = await read_partitions(self._client, self._keys)
            if target is not None:
                raise RepartitionInProgressError(
                    f"the partition count is changing to {target}: read again once "
                    f"`memstream repartition` has finished"
                )
            if stored is None:
                await get_partitions(self._client, self._keys)  # raises: says what to do
            self._partitions, self._partitions_read = stored, now
        assert self._partitions is not None
        return self._partitions

    async def partition_of(self, ref: MemoryRef) -> int:
        return partition_for(ref.memory_id, await self.partitions())

    async def read(
        self,
        ref: MemoryRef,
        *,
        last: int | None = None,
        after: int | None = None,
        limit: int = 100,
        touch: bool = False,
        generation: int | None = None,
    ) -> MemoryView:
        """The newest ``last`` messages, or up to ``limit`` messages after sequence
        ``after``, or (neither given) the whole memory; oldest first. Each call reads
        one consistent snapshot: a replace or clear is seen whole or not at all. With
        ``touch``, the messages are being read into a context window: their use is
        recorded, in the same round trip, for the ``lru`` and ``lfu`` flush strategies.
        A memory whose meta hash is gone (expired, deleted) reads as no memory, with no
        messages, even if another of its keys is left.

        Paginating: pass the first page's ``generation`` with every later page; a page
        of another generation raises GenerationChangedError instead of mixing two
        versions of the memory."""
        if last is not None and after is not None:
            raise ValueError("pass either last or after, not both")
        if last is not None:
            mode, n, since = "last", last, 0
        elif after is not None:
            mode, n, since = "after", min(limit, MAX_PAGE), after
        else:
            mode, n, since = "all", 0, 0
        if n < 0 or (mode != "all" and n == 0):
            raise ValueError("last and limit must be positive")
        p = await self.partition_of(ref)
        k = self._keys.memory(p, ref.memory_id)
        meta_flat, tomb_flat, texts, counts = await self._scripts(
            "read_memory", [k.log, k.meta, k.tomb, k.tok], [mode, n, since, "1" if touch else "0"]
        )
        messages = [StoredMessage.model_validate_json(t) for t in texts]
        view = self._view(ref, p, meta_flat, tomb_flat, messages, counts)
        if generation is not None and view.generation != generation:
            raise GenerationChangedError(ref.memory_id, generation, view.generation)
        return view

    @staticmethod
    def _view(
        ref: MemoryRef,
        p: int,
        meta_flat: Sequence[str],
        tomb_flat: Sequence[str],
        messages: list[StoredMessage],
        counts: Sequence[str | int | None],
    ) -> MemoryView:
        meta = dict(zip(meta_flat[::2], meta_flat[1::2], strict=True))
        tomb = dict(zip(tomb_flat[::2], tomb_flat[1::2], strict=True))
        if not meta:  # no meta, no memory: whatever other key of it is left
            messages, counts = [], []
        return MemoryView(
            ref=ref,
            partition=p,
            exists=bool(meta),
            generation=int(meta.get("gen") or tomb.get("gen") or 0),
            count=int(meta.get("count") or 0),
            watermark=str(tomb.get("wm") or "0-0"),
            messages=messages,
            token_counts=[None if c is None or c == "" else int(c) for c in counts],
            tokens=int(meta.get("tokens") or 0),
            counted=int(meta.get("counted") or 0),
            flush_pending=meta.get("flush_gen") == meta.get("gen") and "flush_gen" in meta,
            meta=meta,
            created_ms=int(meta["created"]) if "created" in meta else None,
            updated_ms=int(meta["updated"]) if "updated" in meta else None,
        )

    async def read_context(
        self,
        ref: MemoryRef,
        resource: MemoryResource,
        counter: TokenCounter,
        *,
        budget: int | None = None,
        touch: bool = True,
    ) -> ContextWindow:
        """The memory as it fits a context of ``budget`` tokens (by default the
        resource's token limit): never more than the budget, by the stored counts and
        the same counting function for messages not counted yet; protected messages
        first, then the newest others (see ``memory.flush.fit_budget``). With ``touch``
        the use of the returned messages is recorded for lru / lfu.

        One script (``read_context.lua``) reads the newest messages until their stored
        counts exceed the budget, older messages not counted yet, and older protected
        messages from the memory's index of them (kept by the accountant under the
        resource's priority rules): the cost follows the window, not the memory. When
        every message is counted, the script also chooses, and records the use, in the
        same round trip; otherwise the choice is made here and the use recorded by a
        call that does not hold up this one. A memory whose index was built under other
        rules (or not yet) is read whole. ``ContextWindow.view`` holds the memory's
        meta and the messages that came back."""
        limit = budget if budget is not None else resource.token_limit
        if limit is None:  # a message_count_based memory without a token budget
            view = await self.read(ref)
            entries = self._counted(view.messages, view.token_counts, counter)
            return self._window(view, entries, entries, None, False, touch)
        priorities = self._priorities.of(resource.priority)
        p = await self.partition_of(ref)
        k = self._keys.memory(p, ref.memory_id)
        reply = await self._scripts(
            "read_context",
            [k.log, k.meta, k.tomb, k.tok],
            [limit, priorities.fingerprint, "1" if touch else "0"],
        )
        meta_flat, tomb_flat, texts, counts, chosen_here, over, first, read, read_bytes = reply
        # One validation of them all costs less than one per message.
        messages = _MESSAGES.validate_json(f"[{','.join(texts)}]")
        view = self._view(ref, p, meta_flat, tomb_flat, messages, counts)
        if chosen_here:  # chosen (and their use recorded) by the script, all counted
            return ContextWindow(
                view=view,
                messages=list(view.messages),
                tokens=sum(counts),
                budget=limit,
                over_budget=bool(over),
                read=read,
                read_bytes=read_bytes,
            )
        # Older than the window, only protected messages may be chosen (the others read
        # there are messages not counted yet, read for the reader to judge).
        kept = [
            (m, c)
            for m, c in zip(view.messages, view.token_counts, strict=True)
            if m.seq >= int(first) or priorities.is_protected(m)
        ]
        entries = self._counted([m for m, _ in kept], [c for _, c in kept], counter)
        chosen, over = fit_budget(entries, limit, priorities)
        return self._window(view, entries, chosen, limit, over, touch, read, read_bytes)

    @staticmethod
    def _counted(
        messages: Sequence[StoredMessage], counts: Sequence[int | None], counter: TokenCounter
    ) -> list[Counted]:
        return [
            Counted(m, c if c is not None else counter.message(m))
            for m, c in zip(messages, counts, strict=True)
        ]

    def _window(
        self,
        view: MemoryView,
        entries: list[Counted],
        chosen: list[Counted],
        limit: int | None,
        over: bool,
        touch: bool,
        read: int | None = None,
        read_bytes: int | None = None,
    ) -> ContextWindow:
        """``touch``: record the use of ``chosen`` (by a call that does not hold this up)."""
        if touch and chosen:
            self._touch_later(view.partition, view.ref, [e.seq for e in chosen])
        return ContextWindow(
            view=view,
            messages=[e.message for e in chosen],
            tokens=sum(e.tokens for e in chosen),
            budget=limit,
            over_budget=over,
            read=len(entries) if read is None else int(read),
            read_bytes=None if read_bytes is None else int(read_bytes),
        )

    async def touches_done(self) -> None:
        """Wait for the use records of earlier context reads (before closing a client)."""
        if self._touching:
            await asyncio.gather(*self._touching, return_exceptions=True)

    def _touch_later(self, partition: int, ref: MemoryRef, seqs: list[int]) -> None:
        task = asyncio.create_task(self._touch(partition, ref, seqs))
        self._touching.add(task)
        task.add_done_callback(self._touched)

    def _touched(self, task: asyncio.Task[None]) -> None:
        self._touching.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("recording the use of messages failed: %r", task.exception())

    async def _touch(self, partition: int, ref: MemoryRef, seqs: list[int]) -> None:
        k = self._keys.memory(partition, ref.memory_id)
        await self._scripts("touch_messages", [k.tok, k.log, k.meta], seqs)

    async def outcome(
        self, partition: int, entry_id: str, *, group: Group = Group.APPENDER
    ) -> Outcome | None:
        """The recorded outcome of an ingest entry (of a lifecycle entry, with ``group``
        cleanup), if known yet."""
        bucket = self._keys.outcomes(partition, entry_id, group.value)
        text = await self._client.hget(bucket, entry_id)
        return Outcome.from_json(str(text)) if text else None

    async def wait_applied(
        self, partition: int, entry_id: str, timeout: float = 10.0, *, event_id: str | None = None
    ) -> Outcome:
        """The entry's outcome as soon as it is known (applied, duplicate, refused with
        the reason, or erased). Raises WaitTimeoutError after ``timeout`` seconds,
        saying whether the partition is held back. With ``event_id``, an outcome recorded
        for another event under the same entry id (possible only after Redis lost
        acknowledged writes in a failover) raises OutcomeMismatchError."""
        return (await self.wait_applied_many([(partition, entry_id, event_id)], timeout))[0]

    async def wait_applied_many(
        self,
        entries: Sequence[tuple[int, str, str | None]],
        timeout: float = 10.0,
        *,
        group: Group = Group.APPENDER,
    ) -> list[Outcome]:
        """The outcomes of many (partition, entry id, event id or None) entries, in their
        order, as soon as all are known. The client's one poller asks for the entries of
        every waiting caller in one pipelined round trip a tick, as soon as the appender
        wrote to the partition (``store.poller``); at the deadline one last round trip
        asks for what is still missing (see ``wait_applied``)."""
        poller = poller_of(self._client)
        buckets = [self._keys.outcomes(p, e, group.value) for p, e, _ in entries]
        futures = [
            poller.watch(b, e, self._doorbells(p, group))
            for b, (p, e, _) in zip(buckets, entries, strict=True)
        ]
        index = {f: i for i, f in enumerate(futures)}
        found: dict[int, Outcome] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            pending = set(futures)
            while pending and (left := deadline - loop.time()) > 0:
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for future in done:
                    i = index[future]
                    found[i] = self._checked(entries[i], Outcome.from_json(future.result()))
        finally:
            for bucket, (_, entry_id, _), future in zip(buckets, entries, futures, strict=True):
                poller.forget(bucket, entry_id, future)
        missing = [i for i in range(len(entries)) if i not in found]
        if missing:
            await self._last_look(entries, buckets, missing, found, timeout, group)
        return [found[i] for i in range(len(entries))]

    def _doorbells(self, partition: int, group: Group) -> tuple[str, ...]:
        """The streams the appender's step writes when it records an outcome there."""
        if group is not Group.APPENDER:
            return ()
        return (self._keys.changes(partition), self._keys.dlq(partition))

    async def _last_look(
        self,
        entries: Sequence[tuple[int, str, str | None]],
        buckets: list[str],
        missing: list[int],
        found: dict[int, Outcome],
        timeout: float,
        group: Group,
    ) -> None:
        """At the deadline: the outcomes still missing, asked for once more with the
        held-back reason of the first one's partition; WaitTimeoutError if one is still
        unknown."""
        first = entries[missing[0]][0]
        pipe = self._client.pipeline(transaction=False)
        for i in missing:
            pipe.hget(buckets[i], entries[i][1])
        pipe.get(self._keys.held(first, group.value))
        *texts, held = await pipe.execute()
        for i, text in zip(missing, texts, strict=True):
            if text:
                found[i] = self._checked(entries[i], Outcome.from_json(str(text)))
        unknown = [i for i in missing if i not in found]
        if not unknown:
            return
        partition, entry_id, _ = entries[unknown[0]]
        if partition != first:
            held = await self._client.get(self._keys.held(partition, group.value))
        why = f"; partition {partition} is held back: {held!s}" if held else ""
        raise WaitTimeoutError(
            f"entry {entry_id} of partition {partition} was not applied within "
            f"{timeout:g}s{why}; it stays queued and may still be applied",
            partition=partition,
            entry_id=entry_id,
        )

    @staticmethod
    def _checked(entry: tuple[int, str, str | None], found: Outcome) -> Outcome:
        partition, entry_id, event_id = entry
        # The appender names a producer's own ids by a digest (see event_ref).
        if event_id and found.event_id and found.event_id not in (event_id, event_ref(event_id)):
            raise OutcomeMismatchError(
                f"entry {entry_id} of partition {partition} holds the outcome of "
                f"event {found.event_id}, not {event_id}: Redis lost the publish; "
                f"publish again with the same idempotency key",
                partition=partition,
                entry_id=entry_id,
            )
        return found
