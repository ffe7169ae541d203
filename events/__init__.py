"""The event contract and the publisher SDK.

Stream and group names are built in ``store.keys`` (the one module that names keys);
the contract document lists them for producers in other languages.
"""

from events.codec import DEFAULT_MAX_EVENT_BYTES, Decoded, decode, encode, event_json
from events.envelope import (
    EVENT_ADAPTER,
    OLDEST_SUPPORTED_VERSION,
    SCHEMA_VERSION,
    AppendPayload,
    Event,
    EventType,
    FlushPayload,
    FlushRequested,
    LifecycleEvent,
    MemoryCleared,
    MemoryDeleted,
    MemoryEvent,
    MemoryName,
    MemoryPayload,
    MemoryReplaced,
    MessageAppended,
    ReplacePayload,
    TerminatedPayload,
    WorkflowPayload,
    WorkflowStarted,
    WorkflowStatus,
    WorkflowTerminated,
)
from events.errors import (
    DecodeError,
    EventError,
    NewerSchemaError,
    PartiallyPublishedError,
    PublishError,
    PublishOutcomeUnknownError,
    ReadOnlyError,
    RedisUnavailableError,
)
from events.limits import RequestLimits
from events.publisher import Published, Publisher, Receipt
from events.schema import event_schema
from memory import MemoryRef, Message, partition_for, sanitize_key

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "EVENT_ADAPTER",
    "OLDEST_SUPPORTED_VERSION",
    "SCHEMA_VERSION",
    "AppendPayload",
    "DecodeError",
    "Decoded",
    "Event",
    "EventError",
    "EventType",
    "FlushPayload",
    "FlushRequested",
    "LifecycleEvent",
    "MemoryCleared",
    "MemoryDeleted",
    "MemoryEvent",
    "MemoryName",
    "MemoryPayload",
    "MemoryRef",
    "MemoryReplaced",
    "Message",
    "MessageAppended",
    "NewerSchemaError",
    "PartiallyPublishedError",
    "PublishError",
    "PublishOutcomeUnknownError",
    "Published",
    "Publisher",
    "ReadOnlyError",
    "Receipt",
    "RedisUnavailableError",
    "ReplacePayload",
    "RequestLimits",
    "TerminatedPayload",
    "WorkflowPayload",
    "WorkflowStarted",
    "WorkflowStatus",
    "WorkflowTerminated",
    "decode",
    "encode",
    "event_json",
    "event_schema",
    "partition_for",
    "sanitize_key",
]
