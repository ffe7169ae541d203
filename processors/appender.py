"""The appender: applies memory events to the materialized memory, in stream order,
a whole batch per fenced script call (which also writes change events, dead letters and
outcomes, and acknowledges)."""

from __future__ import annotations

import json
import logging

from events import (
    DecodeError,
    FlushRequested,
    MemoryCleared,
    MemoryDeleted,
    MemoryEvent,
    MemoryReplaced,
    MessageAppended,
    MessageErased,
    NewerSchemaError,
    decode,
)
from events.codec import DEFAULT_MAX_EVENT_BYTES, Decoded, printable
from events.limits import RequestLimits
from memory import MemoryResource, Message, PrivacyPolicy, ResourceRegistry, partition_for
from processors.port import Batch, EntryFailedError, Handled, HoldBack
from store import ApplyBatch, Group, Keys, MemoryStore, StreamEntry, Target

log = logging.getLogger(__name__)

#: Text per script call; the entries past it wait for the next batch (they stay pending).
MAX_BATCH_BYTES = 8 * 1024 * 1024


def message_text(message: Message, *, workflow_id: str | None, agent_id: str | None) -> str:
    """The stored JSON of a message (the store adds seq, gen, at and entry)."""
    data = message.to_json_dict()
    if workflow_id:
        data["workflow"] = workflow_id
    if agent_id:
        data["agent"] = agent_id
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


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
    ) -> None:
        self._store = store
        self._keys = keys
        self.registry = registry  # replaced as a whole on reload (SIGHUP)
        self._partitions = partitions
        self._limits = limits or RequestLimits(max_event_bytes=max_event_bytes)
        self._max_event_bytes = self._limits.max_event_bytes

    async def process(self, batch: Batch) -> Handled:
        ops = ApplyBatch(self._keys, batch.partition)
        held: HoldBack | None = None
        failed: EntryFailedError | None = None
        partial = False
        for entry in batch.entries:
            if ops.size >= MAX_BATCH_BYTES:
                partial = True
                break
            try:
                self._prepare(ops, entry, batch.partition)
            except NewerSchemaError as e:
                held = HoldBack(entry.id, str(e))
                break
            except Exception as e:
                failed = EntryFailedError(entry.id, e)
                break
        if len(ops):
            await self._store.apply(batch.lease, ops)
        if failed is not None:
            raise failed
        return Handled(held, partial=partial)

    def _prepare(self, ops: ApplyBatch, entry: StreamEntry, partition: int) -> None:
        source = self._keys.ingest(partition)
        fields = entry.fields or {}
        try:
            decoded = decode(entry.fields, max_bytes=self._max_event_bytes)
        except DecodeError as e:
            raw = printable(fields.get("event", "")) if e.reason != "oversized" else ""
            replay = {k: printable(fields[k]) for k in ("replay_of", "replay_key") if k in fields}
            policy = self._policy_of(raw)
            ops.dead_letter(
                entry.id,
                reason=e.reason,
                detail=policy.redact_text(e.detail) if policy is not None else e.detail,
                event=self._redacted_letter(raw),
                source=source,
                event_id=printable(e.event_id),
                replay_of=replay.get("replay_of"),
                replay_key=replay.get("replay_key"),
            )
            return
        self._prepare_event(ops, entry.id, decoded, partition, source)

    def _policy_of(self, raw: str) -> PrivacyPolicy | None:
        resource_id = resource_of(raw)
        resource = self.registry.find(resource_id) if resource_id else None
        return resource.privacy_policy if resource is not None else None

    def _redacted_letter(self, raw: str, resource: MemoryResource | None = None) -> str:
        """The event text kept in a dead letter: redacted by its resource's policy, with
        non-persistable messages removed, when the resource is known (or can be read from
        the raw JSON). An event of an unknown resource has no policy to apply."""
        policy = resource.privacy_policy if resource is not None else self._policy_of(raw)
        return policy.redact_event(raw) if policy is not None else raw

    def letter(self, entry: StreamEntry, detail: str) -> tuple[str, str]:
        """What a dead letter written by the runtime keeps of an entry, and of the error
        that may quote it: both redacted by the policy of the entry's resource."""
        raw = printable((entry.fields or {}).get("event", ""))
        policy = self._policy_of(raw)
        if policy is None:
            return raw, detail
        return policy.redact_event(raw), policy.redact_text(detail)

    def _prepare_event(
        self, ops: ApplyBatch, entry_id: str, decoded: Decoded, partition: int, source: str
    ) -> None:
        event = decoded.event
        resource: MemoryResource | None = None

        def refuse(reason: str, detail: str, memory_id: str | None = None) -> None:
            ops.dead_letter(
                entry_id,
                reason=reason,
                detail=detail,
                event=self._redacted_letter(decoded.text, resource),
                source=source,
                memory_id=memory_id,
                event_id=event.event_id,
                replay_of=decoded.replay_of,
                replay_key=decoded.idempotency_key,
            )

        if not isinstance(event, MEMORY_EVENTS):
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
        resource = self.registry.find(ref.resource)
        if resource is None:
            refuse(
                "unknown_resource",
                f"no memory resource {ref.resource!r} is loaded by this worker",
                ref.memory_id,
            )
            return
        policy = resource.privacy_policy
        if policy.matches(ref.key):
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
            problem = self._limits.message_problem(messages)
            if problem:
                refuse("too_large", problem, ref.memory_id)
                return
        agent_id = event.payload.agent_id
        if self.registry.read_only(agent_id, ref.resource):
            refuse(
                "read_only",
                f"agent {agent_id!r} may only read {ref.resource} memories",
                ref.memory_id,
            )
            return
        target = Target(
            entry_id=entry_id,
            memory_id=ref.memory_id,
            ttl_ms=resource.ttl_ms,
            event_id=event.event_id,
            idempotency_key=decoded.idempotency_key,
            replay_of=decoded.replay_of,
            # A replay may be refused inside the apply script: its letter keeps this text.
            letter_event=self._redacted_letter(decoded.text, resource)
            if decoded.replay_of
            else None,
        )
        self._add(ops, target, event, policy)

    def _add(
        self, ops: ApplyBatch, target: Target, event: MemoryEvent, policy: PrivacyPolicy
    ) -> None:
        workflow_id, agent_id = event.payload.workflow_id, event.payload.agent_id

        def stored(message: Message) -> str:
            return message_text(policy.redact(message), workflow_id=workflow_id, agent_id=agent_id)

        if isinstance(event, MessageAppended):
            message = event.payload.message
            if not policy.persists(message):
                ops.drop(
                    target.entry_id,
                    reason="non_persistable",
                    detail=f"{target.memory_id} never stores {message.role.value} messages "
                    f"of this type (privacy_policy.non_persistable_message_types)",
                    event_id=event.event_id,
                )
                return
            ops.append(target, stored(message))
        elif isinstance(event, MemoryReplaced):
            kept = [m for m in event.payload.messages if policy.persists(m)]
            ops.replace(target, [stored(m) for m in kept])
        elif isinstance(event, MemoryCleared):
            ops.command("clear", target, backup=event.payload.backup)
        elif isinstance(event, MemoryDeleted):
            ops.command("delete", target)
        elif isinstance(event, MessageErased):
            ops.erase(target, event.payload.seq)
        else:
            fields = {"dry_run": "1" if event.payload.dry_run else "0"}
            if event.payload.strategy:
                fields["strategy"] = event.payload.strategy.value
            ops.command("flush", target, fields)


MEMORY_EVENTS = (
    MessageAppended,
    MemoryCleared,
    MemoryDeleted,
    MemoryReplaced,
    FlushRequested,
    MessageErased,
)


def resource_of(raw: str) -> str | None:
    """The resource id an event's JSON names, if it can be read at all."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    payload = data.get("payload") if isinstance(data, dict) else None
    if not isinstance(payload, dict):
        return None
    memory = payload.get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("resource"), str):
        return str(memory["resource"])
    memory_id = payload.get("memory_id")
    if isinstance(memory_id, str) and memory_id.count("/") >= 2:
        return memory_id.split("/")[1]
    return None
