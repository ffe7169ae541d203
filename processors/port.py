"""The port between processors and the transport that feeds them.

A processor sees ordered batches of entries of one partition and settles them through
its own fenced commit (for the appender, the apply script, which also acknowledges).
It never reads, claims or blocks on the transport itself, so Redis Streams can be
replaced by another log (Kafka, through faust-streaming) behind the same port.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from store import Group, Lease, StreamEntry


@dataclass(frozen=True, slots=True)
class Batch:
    """Entries of one partition, in order, delivered under ``lease``."""

    partition: int
    lease: Lease
    entries: Sequence[StreamEntry]
    # One entry at a time (after an unclean takeover or a failed batch): a processor
    # that works in the background settles it before returning, so a crash is charged
    # to the entry that caused it.
    narrowing: bool = False


@dataclass(frozen=True, slots=True)
class HoldBack:
    """The processor stopped at ``entry_id`` and the partition must wait (for an upgrade
    of the consumers, say). Entries before it were settled."""

    entry_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of a batch: everything settled, or held back at one entry; with
    ``partial``, the entries past a size cap were left pending for the next batch."""

    held: HoldBack | None = None
    partial: bool = False


class EntryFailedError(Exception):
    """Processing ``entry_id`` raised; entries before it were settled. Counts one attempt
    (DESIGN rule 5); after the last attempt the entry is dead-lettered."""

    def __init__(self, entry_id: str, cause: BaseException) -> None:
        super().__init__(f"processing entry {entry_id} failed: {cause!r}")
        self.entry_id = entry_id
        self.cause = cause


class Processor(Protocol):
    """A partitioned processor: the group it consumes as, and how it handles a batch."""

    @property
    def group(self) -> Group: ...

    async def process(self, batch: Batch) -> Handled: ...


@runtime_checkable
class WritesLetters(Protocol):
    """A processor that decides what a dead letter keeps of an entry's event (the
    appender redacts it by the privacy policy of the event's resource). Without it, the
    runtime keeps the event as it is."""

    def letter(self, entry: StreamEntry, detail: str) -> tuple[str, str]:
        """The event text and the detail (an error that may quote the event) to keep."""
        ...


@runtime_checkable
class WorksInBackground(Protocol):
    """A processor that may return before some entries of a batch are settled: it
    works on them in the background and settles them itself, with its own fenced
    script (the summarizer, so a slow summary does not hold up the partition's other
    flushes). The loop passes over them when it reads, and tells the processor when
    the partition is given up or lost."""

    def in_flight(self, partition: int) -> set[str]:
        """The ids of the partition's entries still being worked on."""
        ...

    async def drop(self, partition: int, *, wait: float) -> None:
        """The partition is being given up (``wait`` > 0: let the work end within that
        many seconds) or was lost (``wait`` 0): stop its background work. Entries not
        settled stay pending, for the next owner."""
        ...
