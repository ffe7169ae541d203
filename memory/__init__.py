"""Pure domain logic of memstream: no I/O, no imports of events, store or processors."""

from memory.agents import (
    AgentConfigError,
    AgentMemory,
    AgentResource,
    MemoryMode,
    ResolvedMemory,
    parse_agent_memory,
    resolve_memories,
)
from memory.duration import Duration, format_duration, parse_duration
from memory.errors import DomainError, InvalidReferenceError, ResourceError, UnknownResourceError
from memory.message import Message, Role, StoredMessage, ToolCall
from memory.partition import partition_for
from memory.privacy import PrivacyPolicy, mask_secrets
from memory.ref import MemoryRef, is_sanitized, sanitize_key
from memory.registry import ResourceRegistry, load_resource_file
from memory.resource import CleanupPolicy, FlushStrategy, MemoryResource, MemoryType
from memory.template import KeyTemplate, TemplateKeyError, template_context

__all__ = [
    "AgentConfigError",
    "AgentMemory",
    "AgentResource",
    "CleanupPolicy",
    "DomainError",
    "Duration",
    "FlushStrategy",
    "InvalidReferenceError",
    "KeyTemplate",
    "MemoryMode",
    "MemoryRef",
    "MemoryResource",
    "MemoryType",
    "Message",
    "PrivacyPolicy",
    "ResolvedMemory",
    "ResourceError",
    "ResourceRegistry",
    "Role",
    "StoredMessage",
    "TemplateKeyError",
    "ToolCall",
    "UnknownResourceError",
    "format_duration",
    "is_sanitized",
    "load_resource_file",
    "mask_secrets",
    "parse_agent_memory",
    "parse_duration",
    "partition_for",
    "resolve_memories",
    "sanitize_key",
    "template_context",
]
