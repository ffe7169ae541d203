"""The cleanup processor: the one leaseholder of the lifecycle stream.

A terminated workflow becomes one ``workflow.ended`` command in every ``ingest:{p}``
(idempotency key ``wf-end:<id>``), so its end is ordered with the appends of every
partition. Each appender then applies it to the memories of its partition that the
workflow wrote: its later writes are refused, and the resource's
``cleanup.on_workflow_end`` policy runs on each memory no live workflow writes any more.
A started workflow needs nothing: memories learn their workflows from their writes, and
a start never undoes an end.

Sending the commands is not fenced by the lease (the ingest streams are in other
partitions' slots): a paused former holder can only send a workflow's end again, which
the appenders apply once.
"""

from __future__ import annotations

import logging

from redis.exceptions import ConnectionError as RedisConnectionError

from events import (
    DecodeError,
    NewerSchemaError,
    PartiallyPublishedError,
    Publisher,
    PublishError,
    PublishOutcomeUnknownError,
    RedisUnavailableError,
    WorkflowStarted,
    WorkflowTerminated,
    decode,
)
from events.codec import DEFAULT_MAX_EVENT_BYTES
from memory import ResourceRegistry
from processors.letters import letter_of
from processors.metrics import Metrics
from processors.port import Batch, Handled, HoldBack
from store import TRANSIENT_ERRORS, Group, PartitionStreams, Settle, StreamEntry

log = logging.getLogger(__name__)


class _RefusedError(Exception):
    """Redis refused to take a workflow's end: the lifecycle stream is held back."""


class Cleanup:
    """The processor of the lifecycle stream (one partition, 0)."""

    group = Group.CLEANUP

    def __init__(
        self,
        publisher: Publisher,
        streams: PartitionStreams,
        registry: ResourceRegistry,
        *,
        outcome_ttl_ms: int = 10 * 60 * 1000,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        # Letters are redacted by it and workflows named as the appender names them.
        self.registry = registry  # replaced as a whole on reload (SIGHUP)
        self._publisher = publisher
        self._streams = streams
        self._outcome_ttl_ms = outcome_ttl_ms
        self._max_event_bytes = max_event_bytes

    async def process(self, batch: Batch) -> Handled:
        done: list[Settle] = []
        held: HoldBack | None = None
        try:
            for entry in batch.entries:
                try:
                    settle = await self._handle(entry)
                except (NewerSchemaError, _RefusedError) as e:
                    held = HoldBack(entry.id, str(e))
                    break
                done.append(settle)
        finally:
            # What was sent is settled even when a later entry fails (sending an end
            # again would be harmless, but there is no need).
            if done:
                try:
                    await self._streams.settle(batch.lease, done, self._outcome_ttl_ms)
                except TRANSIENT_ERRORS as e:
                    log.warning("settling %d lifecycle entries failed: %s", len(done), e)
                else:
                    self._count(done)
        return Handled(held)

    async def _handle(self, entry: StreamEntry) -> Settle:
        try:
            event = decode(entry.fields, max_bytes=self._max_event_bytes).event
        except DecodeError as e:
            return self._refuse(entry, e.reason, e.detail)
        if isinstance(event, WorkflowTerminated):
            workflow = self.registry.workflow_name(event.payload.workflow_id)
            try:
                receipts = await self._publisher.end_workflow(event)
            except PublishError as e:
                if unreachable(e):
                    # Redis (some partition of it) is unreachable: retried with backoff,
                    # never counted as an attempt (the event itself is fine); what was
                    # sent meanwhile is applied once.
                    raise RedisConnectionError(
                        f"sending the end of workflow {workflow} failed: {e}"
                    ) from e
                # Redis refused the XADDs (out of memory, an ACL user without access, a
                # key of the wrong type): the lifecycle stream waits, and says why in
                # `memstream status`, until that is fixed; then it goes on by itself.
                raise _RefusedError(f"Redis refused the end of workflow {workflow}: {e}") from e
            log.info(
                "workflow %s/%s %s: its end was sent to %d partitions",
                event.tenant,
                workflow,
                event.payload.status.value,
                len(receipts),
            )
            return Settle(
                entry.id,
                "applied",
                detail=f"workflow {workflow} ended "
                f"({event.payload.status.value}): sent to {len(receipts)} partitions",
                tenant=event.tenant,
            )
        if isinstance(event, WorkflowStarted):
            return Settle(
                entry.id,
                "applied",
                detail="nothing to do: memories learn their workflows from their writes, "
                "and a start never undoes an end",
            )
        return self._refuse(
            entry,
            "wrong_stream",
            f"{event.type} events belong on an ingest stream, not the lifecycle stream",
        )

    def _count(self, settled: list[Settle]) -> None:
        group = self.group.value
        for settle in settled:
            kind = "lifecycle" if settle.letter is None else "dlq"
            self._metrics.settled(group, [(kind, settle.status)])
            if settle.letter is not None:
                self._metrics.dead_letters.labels(group, settle.reason or "refused").inc()

    def letter(self, entry: StreamEntry, detail: str) -> tuple[str, str]:
        """What a dead letter keeps of an entry (see ``processors.letters``)."""
        return letter_of(self.registry, entry, detail)

    def _refuse(self, entry: StreamEntry, reason: str, detail: str) -> Settle:
        event, detail = self.letter(entry, detail)
        letter = {
            "event": event if reason != "oversized" else "",
            "reason": reason,
            "detail": detail,
            "entry": entry.id,
            "source": self._streams.stream(0),
        }
        return Settle(entry.id, "refused", reason, detail, letter=letter)


def unreachable(error: PublishError) -> bool:
    """Did the publish fail only because Redis (a node of it) could not be reached?"""
    if isinstance(error, PartiallyPublishedError):
        return error.transient
    return isinstance(error, RedisUnavailableError | PublishOutcomeUnknownError)
