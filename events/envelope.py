"""The event contract: one envelope for every event, with a typed payload.

Events are JSON in one stream field, ``event``, so any language can publish them with a
plain ``XADD <stream> * event <json>``. Memory events go to ``ingest:{p}`` of their
memory's partition; lifecycle events go to ``lifecycle``. ``events/schema.json`` is the
JSON Schema of the current version (``memstream schema events`` prints it).
"""

from __future__ import annotations

import enum
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from memory import FlushStrategy, MemoryRef, Message, is_sanitized
from memory.ref import (
    MAX_KEY_LENGTH,
    RESOURCE_PATTERN,
    SANITIZED_KEY_PATTERN,
    TENANT_PATTERN,
    check_resource_id,
    check_tenant,
)

#: The schema version this code writes. Version 3 added workflow.ended (the cleanup
#: processor's command), version 4 memory.restored: a consumer of an older version holds
#: such an event back (rule 9) instead of refusing it. Events of versions 3, 2 and 1 are
#: still read.
SCHEMA_VERSION = 4
#: The oldest schema version this code still reads (upgraded on decode).
OLDEST_SUPPORTED_VERSION = 1

MAX_ID_LENGTH = 200
STREAM_ID_PATTERN = r"^[0-9]{1,20}-[0-9]{1,20}$"


class EventType(enum.StrEnum):
    MESSAGE_APPENDED = "message.appended"
    MEMORY_CLEARED = "memory.cleared"
    MEMORY_DELETED = "memory.deleted"
    MEMORY_REPLACED = "memory.replaced"
    FLUSH_REQUESTED = "flush.requested"
    MESSAGE_ERASED = "message.erased"
    MEMORY_RESTORED = "memory.restored"
    WORKFLOW_STARTED = "workflow.started"
    WORKFLOW_TERMINATED = "workflow.terminated"
    WORKFLOW_ENDED = "workflow.ended"


class WorkflowStatus(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"


#: The variant bits of a version 4 UUID (10xx) on a random hex digit.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def new_event_id() -> str:
    """A random version 4 UUID as 32 hex digits, made from 16 random bytes without a
    UUID object (one per event published: a quarter of the cost of uuid4().hex)."""
    h = os.urandom(16).hex()
    return f"{h[:12]}4{h[13:16]}{_VARIANT[h[16]]}{h[17:]}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryName(_Model):
    """A memory within the envelope's tenant: resource id and sanitized key."""

    resource: str = Field(
        description="the memory resource id, e.g. customer-support",
        json_schema_extra={"pattern": RESOURCE_PATTERN},
    )
    key: str = Field(
        description="the rendered key, sanitized (see the partition contract)",
        json_schema_extra={"pattern": SANITIZED_KEY_PATTERN, "maxLength": MAX_KEY_LENGTH},
    )

    @field_validator("resource")
    @classmethod
    def _resource(cls, value: str) -> str:
        return check_resource_id(value)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not is_sanitized(value):
            raise ValueError(
                "the key is not sanitized: see the sanitizer in docs/contract.md "
                "(A-Z a-z 0-9 - _ . up to 128 characters, else a readable part, '~' and a "
                "SHA-256 prefix)"
            )
        return value


class MemoryPayload(_Model):
    memory: MemoryName
    workflow_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    agent_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)


class AppendPayload(MemoryPayload):
    message: Message


class ReplacePayload(MemoryPayload):
    messages: list[Message]


class ClearPayload(MemoryPayload):
    backup: bool = Field(
        default=False,
        description="keep the cleared messages as a backup that `memstream restore` brings back",
    )


class ErasePayload(MemoryPayload):
    seq: int = Field(ge=1, le=2**53 - 1, description="the sequence of the message to erase")


class RestorePayload(MemoryPayload):
    backup_id: str = Field(
        description="the backup to bring back: the id a `memory.cleared` with `backup` "
        "reported (its entry id); only the memory's latest backup can be restored",
        json_schema_extra={"pattern": STREAM_ID_PATTERN},
    )

    @field_validator("backup_id")
    @classmethod
    def _backup_id(cls, value: str) -> str:
        if not re.fullmatch(STREAM_ID_PATTERN, value):
            raise ValueError("backup_id must be a stream entry id such as 1700000000000-0")
        return value


class FlushPayload(MemoryPayload):
    strategy: FlushStrategy | None = Field(
        default=None, description="override the resource's strategy"
    )
    dry_run: bool = False


class WorkflowPayload(_Model):
    workflow_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)


class TerminatedPayload(WorkflowPayload):
    status: WorkflowStatus


class EndedPayload(TerminatedPayload):
    partition: int = Field(ge=0, description="the partition whose ingest stream it is in")


def _require_type_and_version(schema: dict[str, Any]) -> None:
    """The decoder needs both, so every producer must write them."""
    schema["required"] = [*schema.get("required", []), "schema_version", "type"]


class _Envelope(_Model):
    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra=_require_type_and_version
    )

    schema_version: Literal[4] = 4
    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=MAX_ID_LENGTH)
    tenant: str = Field(json_schema_extra={"pattern": TENANT_PATTERN})
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ID_LENGTH,
        description="a repeat with the same key, for the same memory, inside the "
        "idempotency window is applied once",
    )
    partitions: int | None = Field(
        default=None, ge=1, description="the partition count the producer routed with"
    )
    published_at_ms: int | None = Field(default=None, ge=0)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return check_tenant(value)


class _MemoryEvent(_Envelope):
    payload: MemoryPayload

    @property
    def ref(self) -> MemoryRef:
        # The three parts were validated as the reference validates them.
        memory = self.payload.memory
        return MemoryRef.checked(self.tenant, memory.resource, memory.key)


class MessageAppended(_MemoryEvent):
    type: Literal[EventType.MESSAGE_APPENDED] = EventType.MESSAGE_APPENDED
    payload: AppendPayload


class MemoryCleared(_MemoryEvent):
    type: Literal[EventType.MEMORY_CLEARED] = EventType.MEMORY_CLEARED
    payload: ClearPayload

    @field_validator("payload", mode="before")
    @classmethod
    def _plain_payload(cls, value: object) -> object:
        # A plain MemoryPayload (as before the backup option) is a clear without one.
        if type(value) is MemoryPayload:
            return ClearPayload(**value.model_dump())
        return value


class MemoryDeleted(_MemoryEvent):
    type: Literal[EventType.MEMORY_DELETED] = EventType.MEMORY_DELETED
    payload: MemoryPayload


class MemoryReplaced(_MemoryEvent):
    type: Literal[EventType.MEMORY_REPLACED] = EventType.MEMORY_REPLACED
    payload: ReplacePayload


class FlushRequested(_MemoryEvent):
    type: Literal[EventType.FLUSH_REQUESTED] = EventType.FLUSH_REQUESTED
    payload: FlushPayload


class MessageErased(_MemoryEvent):
    """Erase one message for good; a summary that covers it goes too."""

    type: Literal[EventType.MESSAGE_ERASED] = EventType.MESSAGE_ERASED
    payload: ErasePayload


class MemoryRestored(_MemoryEvent):
    """Bring a memory's latest backup back (a new generation holding its messages, each
    with its own sequence, summaries with what they cover), decided in the memory's
    partition, in order with erases."""

    type: Literal[EventType.MEMORY_RESTORED] = EventType.MEMORY_RESTORED
    payload: RestorePayload


class WorkflowStarted(_Envelope):
    type: Literal[EventType.WORKFLOW_STARTED] = EventType.WORKFLOW_STARTED
    payload: WorkflowPayload


class WorkflowTerminated(_Envelope):
    type: Literal[EventType.WORKFLOW_TERMINATED] = EventType.WORKFLOW_TERMINATED
    payload: TerminatedPayload


MemoryEvent = (
    MessageAppended
    | MemoryCleared
    | MemoryDeleted
    | MemoryReplaced
    | FlushRequested
    | MessageErased
    | MemoryRestored
)


class WorkflowEnded(_Envelope):
    """The cleanup processor's command to one partition (in its ``ingest:{p}``, so it is
    ordered with appends): apply the end of a workflow to the memories it wrote there."""

    type: Literal[EventType.WORKFLOW_ENDED] = EventType.WORKFLOW_ENDED
    payload: EndedPayload


LifecycleEvent = WorkflowStarted | WorkflowTerminated
AnyEvent = MemoryEvent | LifecycleEvent | WorkflowEnded
Event = Annotated[AnyEvent, Field(discriminator="type")]
MEMORY_EVENT_TYPES: tuple[type[_MemoryEvent], ...] = (
    MessageAppended,
    MemoryCleared,
    MemoryDeleted,
    MemoryReplaced,
    FlushRequested,
    MessageErased,
    MemoryRestored,
)

EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(Event)


def memory_payload(
    ref: MemoryRef, workflow_id: str | None, agent_id: str | None
) -> dict[str, object]:
    return {
        "memory": {"resource": ref.resource, "key": ref.key},
        "workflow_id": workflow_id,
        "agent_id": agent_id,
    }
