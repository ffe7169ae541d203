"""The appender: applies memory events to the materialized memory, in stream order,
a whole batch per fenced script call (which also writes change events, dead letters and
outcomes, and acknowledges)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson

from events import (
    DecodeError,
    MemoryCleared,
    MemoryDeleted,
    MemoryEvent,
    MemoryReplaced,
    MemoryRestored,
    MessageAppended,
    MessageErased,
    NewerSchemaError,
    WorkflowEnded,
    decode,
)
from events.codec import (
    DEFAULT_MAX_EVENT_BYTES,
    Decoded,
    printable,
    well_formed_replay_fields,
)
from events.envelope import MEMORY_EVENT_TYPES
from events.limits import RequestLimits
from memory import Message, PrivacyPolicy, ResourceRegistry, partition_for
from memory.privacy import event_ref
from processors.letters import letter_of, policy_for
from processors.metrics import Metrics
from processors.port import Batch, EntryFailedError, Handled, HoldBack
from store import (
    ApplyBatch,
    Ending,
    Group,
    Keys,
    Lookups,
    MemoryStore,
    StreamEntry,
    Target,
)

log = logging.getLogger(__name__)

#: Text per script call; the entries past it wait for the next batch (they stay pending).
MAX_BATCH_BYTES = 8 * 1024 * 1024
GROUP = Group.APPENDER.value
#: Memories of one workflow one script call ends; the rest wait for the next call.
MAX_ENDED_MEMORIES = 500
#: Text that marks an entry as one needing a lookup before the batch (see ``_lookups``).
_LOOKUP_TYPES = ('"workflow.ended"', '"memory.deleted"')


#: Message fields written as they were sent when each is of this JSON type (what
#: validation keeps as it is): see ``message_text``.
_AS_SENT = {
    "role": str,
    "content": str,
    "name": str,
    "tool_call_id": str,
    "metadata": dict,
    "priority": int,
}


def message_text(
    message: Message,
    *,
    workflow_id: str | None,
    agent_id: str | None,
    sent: dict[str, Any] | None = None,
) -> str:
    """The stored JSON of a message (the store adds seq, gen, at and entry). ``sent``:
    the message as decoded from its event, written as it came when it holds only fields
    of the types above (the model would write the same fields and values)."""
    text = _as_sent(sent) if sent is not None else None
    if text is None:
        text = message.model_dump_json(exclude_none=True, exclude_defaults=True)
    extra = "".join(
        f',"{name}":{json.dumps(value, ensure_ascii=False)}'
        for name, value in (("workflow", workflow_id), ("agent", agent_id))
        if value
    )
    return text[:-1] + extra + "}" if extra else text


def _as_sent(sent: dict[str, Any]) -> str | None:
    """``sent`` as compact JSON without its nulls and an empty metadata (what the model
    leaves out), or None when a field is not of its type in ``_AS_SENT``."""
    kept: dict[str, Any] = {}
    for name, value in sent.items():
        if value is None:
            continue
        kind = _AS_SENT.get(name)
        if kind is None or type(value) is not kind:
            return None
        if value or kind is not dict:
            kept[name] = value
    try:
        return orjson.dumps(kept).decode()
    except TypeError:  # a value orjson does not write (an integer past 64 bits)
        return None


def _sent_message(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The message of a decoded message.appended event, as sent."""
    payload = data.get("payload") if data is not None else None
    message = payload.get("message") if type(payload) is dict else None
    return message if type(message) is dict else None


class MissingLookupError(Exception):
    """An event needs a lookup that was not read before the batch."""

    def __init__(
        self,
        *,
        workflows: Sequence[tuple[str, str]] = (),
        deleted: Sequence[str] = (),
    ) -> None:
        super().__init__("a lookup is missing")
        self.workflows = list(workflows)
        self.deleted = list(deleted)


class StartsCallError(Exception):
    """The entry must be the first op of its memory in a script call (a restore, which
    the script decides from the stored backup): the call ends before it."""


class Appender:
    """The processor of ``ingest:{p}``."""

    group = Group.APPENDER

    def __init__(
        self,
        store: MemoryStore,
        keys: Keys,
        registry: ResourceRegistry,
        partitions: int,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        limits: RequestLimits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._keys = keys
        self.registry = registry  # replaced as a whole on reload (SIGHUP)
        self._partitions = partitions
        self._limits = limits or RequestLimits(max_event_bytes=max_event_bytes)
        self._max_event_bytes = self._limits.max_event_bytes

    async def process(self, batch: Batch) -> Handled:
        found = await self._lookups(batch)
        while True:
            ops = ApplyBatch(self._keys, batch.partition)
            try:
                held, failed, partial = self._build(ops, batch, found)
            except MissingLookupError as e:
                # An event the text scan did not spot (JSON escapes in its type): read
                # what it needs and build the batch again.
                more = await self._store.lookups(
                    batch.partition, e.workflows, e.deleted, MAX_ENDED_MEMORIES
                )
                found = Lookups(
                    found.workflow_memories | more.workflow_memories,
                    found.writers | more.writers,
                )
                continue
            break
        if len(ops):
            await self._apply(batch, ops)
        if failed is not None:
            raise failed
        return Handled(held, partial=partial)

    def _build(
        self, ops: ApplyBatch, batch: Batch, found: Lookups
    ) -> tuple[HoldBack | None, EntryFailedError | None, bool]:
        for entry in batch.entries:
            if ops.size >= MAX_BATCH_BYTES:
                return None, None, True
            try:
                self._prepare(ops, entry, batch.partition, found)
            except NewerSchemaError as e:
                return HoldBack(entry.id, str(e)), None, False
            except MissingLookupError:
                raise
            except StartsCallError:
                return None, None, True  # it starts the next call
            except Exception as e:
                return None, EntryFailedError(entry.id, e), False
            if ops.ops and ops.ops[-1]["k"] == "ended":
                # A workflow's end is the last op of its call: the entries after it are
                # decided against what it did (and it may continue in the next call).
                return None, None, True
        return None, None, False

    async def _apply(self, batch: Batch, ops: ApplyBatch) -> None:
        started = time.perf_counter()
        statuses, reasons = await self._store.apply_with_reasons(batch.lease, ops)
        try:
            self._record(ops, statuses, reasons, started)
        except Exception:  # the batch is applied: metrics never fail it
            log.exception("recording the metrics of a batch failed")

    def _record(
        self, ops: ApplyBatch, statuses: list[str], reasons: list[str], started: float
    ) -> None:
        done = time.time()
        m = self._metrics
        m.apply_seconds.labels(GROUP).observe(time.perf_counter() - started)
        kinds = [str(op["k"]) for op in ops.ops]
        # An end continued in the next call is settled (and counted) once, at its end.
        m.settled(GROUP, [(k, s) for k, s in zip(kinds, statuses, strict=True) if s != "partial"])
        for op, kind, status, reason in zip(ops.ops, kinds, statuses, reasons, strict=True):
            if status == "refused" and kind != "drop" and reason != "no_such_memory":
                m.dead_letters.labels(GROUP, reason or "refused").inc()
            elif status == "applied" and kind in ("append", "replace"):
                published = ops.published_at.get(str(op["id"]))
                if published:
                    m.end_to_end_seconds.observe(max(0.0, done - published / 1000))

    async def _lookups(self, batch: Batch) -> Lookups:
        """Read what workflow ends and deletes in the batch need (see ``Lookups``); only
        entries whose text names those types are decoded here."""
        workflows: list[tuple[str, str]] = []
        deleted: list[str] = []
        for entry in batch.entries:
            text = (entry.fields or {}).get("event", "")
            if not any(t in text for t in _LOOKUP_TYPES):
                continue
            try:
                event = decode(entry.fields, max_bytes=self._max_event_bytes).event
            except Exception:
                continue  # decoded again, and refused or held, in its turn
            if isinstance(event, WorkflowEnded):
                workflows.append(
                    (event.tenant, self.registry.workflow_name(event.payload.workflow_id))
                )
            elif isinstance(event, MemoryDeleted):
                deleted.append(event.ref.memory_id)
        return await self._store.lookups(
            batch.partition, sorted(set(workflows)), sorted(set(deleted)), MAX_ENDED_MEMORIES
        )

    def _prepare(self, ops: ApplyBatch, entry: StreamEntry, partition: int, found: Lookups) -> None:
        source = self._keys.ingest(partition)
        fields = entry.fields or {}
        try:
            decoded = decode(entry.fields, max_bytes=self._max_event_bytes)
        except DecodeError as e:
            raw = printable(fields.get("event", "")) if e.reason != "oversized" else ""
            replay = well_formed_replay_fields(fields)
            policy = policy_for(self.registry, raw)
            ops.dead_letter(
                entry.id,
                reason=e.reason,
                detail=policy.redact_text(e.detail),
                event=policy.redact_event(raw, self.registry.workflow_name),
                source=source,
                event_id=event_ref(printable(e.event_id)) if e.event_id else "",
                replay_of=replay.get("replay_of"),
                replay_key=replay.get("replay_key"),
            )
            return
        self._prepare_event(ops, entry.id, decoded, partition, source, found)

    def letter(self, entry: StreamEntry, detail: str) -> tuple[str, str]:
        """What a dead letter written by the runtime keeps of an entry, and of the error
        that may quote it: both redacted (see ``processors.letters``)."""
        return letter_of(self.registry, entry, detail)

    def _prepare_event(
        self,
        ops: ApplyBatch,
        entry_id: str,
        decoded: Decoded,
        partition: int,
        source: str,
        found: Lookups,
    ) -> None:
        event = decoded.event
        registry = self.registry
        resource = (
            registry.find(event.payload.memory.resource)
            if isinstance(event, MEMORY_EVENT_TYPES)
            else None
        )
        # Whatever a letter, an outcome or a log keeps of this event is redacted by this.
        policy = resource.privacy_policy if resource is not None else registry.privacy_policy
        if event.published_at_ms:
            ops.published_at[entry_id] = event.published_at_ms

        def refuse(reason: str, detail: str, memory_id: str | None = None) -> None:
            ops.dead_letter(
                entry_id,
                reason=reason,
                detail=policy.redact_text(detail),
                event=policy.redact_event(decoded.text, registry.workflow_name),
                source=source,
                memory_id=policy.redact_text(memory_id) if memory_id else None,
                event_id=event_ref(event.event_id),
                replay_of=decoded.replay_of,
                replay_key=decoded.idempotency_key,
            )

        if isinstance(event, WorkflowEnded):
            if event.payload.partition != partition:
                refuse(
                    "misrouted",
                    f"the end of workflow {registry.workflow_name(event.payload.workflow_id)} "
                    f"is addressed to partition {event.payload.partition}, not {partition}",
                )
                return
            self._end(ops, entry_id, event, found)
            return
        if not isinstance(event, MEMORY_EVENT_TYPES):
            refuse("wrong_stream", f"{event.type} events belong on the lifecycle stream")
            return
        ref = event.ref
        expected = partition_for(ref.memory_id, self._partitions)
        if expected != partition:
            refuse(
                "misrouted",
                f"{ref.memory_id} hashes to partition {expected} of {self._partitions}, "
                f"not {partition} (the producer routed with {event.partitions or 'an unknown'} "
                f"partitions)",
                ref.memory_id,
            )
            return
        if resource is None:
            refuse(
                "unknown_resource",
                f"no memory resource {ref.resource!r} is loaded by this worker",
                ref.memory_id,
            )
            return
        # One search over all of the event's text: when nothing in it matches, redacting
        # it changes nothing, and none of it needs redacting (the common case).
        clean = decoded.data is not None and policy.clean(decoded.data)
        if not clean and policy.matches(ref.key):
            refuse(
                "personal_key",
                f"the memory key matches a redaction pattern of {ref.resource}: render keys "
                f"from ids, never from personal data",
            )
            return
        if isinstance(event, MessageAppended | MemoryReplaced):
            messages = (
                [event.payload.message]
                if isinstance(event, MessageAppended)
                else event.payload.messages
            )
            problem = self._limits.message_problem(messages, event_chars=len(decoded.text))
            if problem:
                refuse("too_large", problem, ref.memory_id)
                return
        agent_id = event.payload.agent_id
        if registry.read_only(agent_id, ref.resource):
            refuse(
                "read_only",
                f"agent {agent_id!r} may only read {ref.resource} memories",
                ref.memory_id,
            )
            return
        workflow = event.payload.workflow_id
        # The entry's own text is what a letter would keep when nothing in it is redacted,
        # no message of it is left out and its workflow needs no pseudonym: then the
        # script may read it back itself (a refusal inside it: a replay's, a restore's, an
        # ended workflow's write), else it is given the letter's text.
        named = registry.workflow_name(workflow) if workflow else None
        as_written = (
            clean
            and named == workflow
            and (
                not isinstance(event, MemoryReplaced)
                or all(policy.persists(m) for m in event.payload.messages)
            )
        )
        target = Target(
            entry_id=entry_id,
            memory_id=ref.memory_id,
            ttl_ms=resource.ttl_ms,
            event_id=event_ref(event.event_id),
            idempotency_key=decoded.idempotency_key,
            replay_of=decoded.replay_of,
            # What the letter of a refusal inside the script keeps (see as_written).
            letter_event=None
            if as_written
            else policy.redact_event(decoded.text, registry.workflow_name),
            workflow=named,
            on_workflow_end=resource.cleanup.on_workflow_end.value,
            grace_ms=int(resource.cleanup.grace * 1000),
        )
        writers: Sequence[str] = ()
        if isinstance(event, MemoryDeleted):
            if ref.memory_id not in found.writers:
                raise MissingLookupError(deleted=[ref.memory_id])
            writers = found.writers[ref.memory_id]
        self._add(ops, target, event, None if clean else policy, writers, decoded.data)

    def _target(self, memory_id: str) -> Target:
        """A memory named by an index, with its resource's TTL and policy. A memory of a
        resource no longer loaded loses the workflow as a writer but keeps its data (no
        policy is known for it): it lives by its TTL."""
        resource = self.registry.find(memory_id.split("/", 2)[1])
        if resource is None:
            return Target(entry_id="", memory_id=memory_id, ttl_ms=1, event_id="")
        return Target(
            entry_id="",
            memory_id=memory_id,
            ttl_ms=resource.ttl_ms,
            event_id="",
            on_workflow_end=resource.cleanup.on_workflow_end.value,
            grace_ms=int(resource.cleanup.grace * 1000),
        )

    def _end(self, ops: ApplyBatch, entry_id: str, event: WorkflowEnded, found: Lookups) -> None:
        workflow = self.registry.workflow_name(event.payload.workflow_id)
        if (event.tenant, workflow) not in found.workflow_memories:
            raise MissingLookupError(workflows=[(event.tenant, workflow)])
        stored = found.workflow_memories[(event.tenant, workflow)]
        more = len(stored) > MAX_ENDED_MEMORIES
        names = set(stored[:MAX_ENDED_MEMORIES]) | ops.written_by(event.tenant, workflow)
        targets = [self._target(name) for name in sorted(names)]
        ops.ended(
            Ending(entry_id, event_ref(event.event_id), event.tenant, workflow, targets, more)
        )

    def _add(
        self,
        ops: ApplyBatch,
        target: Target,
        event: MemoryEvent,
        redacting: PrivacyPolicy | None,
        writers: Sequence[str],
        data: dict[str, Any] | None = None,
    ) -> None:
        """``redacting``: the policy whose patterns match some of the event's text (None
        when none does); its non-persistable types apply either way. ``data``: the
        event as decoded (an unredacted message is stored as it was sent)."""
        agent_id = event.payload.agent_id
        resource = self.registry[target.memory_id.split("/", 2)[1]]
        policy = resource.privacy_policy

        # The ids stored with each message are redacted like its text; the workflow is
        # named as everywhere else (its pseudonym when its id matches a pattern).
        shown_workflow = target.workflow
        shown_agent = redacting.redact_text(agent_id) if redacting and agent_id else agent_id

        def stored(message: Message, sent: dict[str, Any] | None = None) -> str:
            if redacting:
                message, sent = redacting.redact(message), None
            return message_text(
                message, workflow_id=shown_workflow, agent_id=shown_agent, sent=sent
            )

        if isinstance(event, MessageAppended):
            message = event.payload.message
            if not policy.persists(message):
                ops.drop(
                    target.entry_id,
                    reason="non_persistable",
                    detail=f"{target.memory_id} never stores {message.role.value} messages "
                    f"of this type (privacy_policy.non_persistable_message_types)",
                    event_id=event_ref(event.event_id),
                )
                return
            ops.append(target, stored(message, _sent_message(data)))
        elif isinstance(event, MemoryReplaced):
            kept = [m for m in event.payload.messages if policy.persists(m)]
            ops.replace(target, [stored(m) for m in kept])
        elif isinstance(event, MemoryCleared):
            ops.command("clear", target, backup=event.payload.backup)
        elif isinstance(event, MemoryDeleted):
            ops.command("delete", target, writers=writers)
        elif isinstance(event, MessageErased):
            ops.erase(target, event.payload.seq)
        elif isinstance(event, MemoryRestored):
            if ops.touches(target.memory_id):
                raise StartsCallError
            ops.restore(target, event.payload.backup_id)
        else:
            fields = {"dry_run": "1" if event.payload.dry_run else "0"}
            if event.payload.strategy:
                fields["strategy"] = event.payload.strategy.value
            ops.command("flush", target, fields)
