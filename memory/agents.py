"""Agent memory configuration: which memories an agent uses, how, and under which key.

Three tiers, plus a list form:

- tier 1: ``memory: "<id>"`` with ``memory_key`` (required; ``memories`` forbidden);
- tier 2: ``memory: true``, ``memories: [ids]`` and a shared ``memory_key`` (required);
- tier 3: ``memories: [{id, mode: read-write|read-only, key}]``;
- list form: ``memory: [{id, mode, key}]`` or ``memory: ["id"]``; a missing key falls
  back to the resource's ``default_key_template``;
- ``memory: false`` or nothing: no memory.

Agents can also be declared in resource files (``resource: agent``), so the appender
knows which agents may only read a memory.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memory.errors import DomainError
from memory.ref import MemoryRef, check_resource_id, sanitize_key
from memory.resource import MemoryResource
from memory.template import KeyTemplate, TemplateKeyError

TIER_RULES = (
    "use one of: tier 1 'memory: <id>' with 'memory_key'; tier 2 'memory: true' with "
    "'memories: [ids]' and 'memory_key'; tier 3 'memories: [{id, mode, key}]'; or the "
    "list form 'memory: [{id, mode, key}]' / 'memory: [ids]'; 'memory: false' for none"
)


class AgentConfigError(DomainError, ValueError):
    """An agent memory configuration that breaks the tier rules."""


class MemoryMode(enum.StrEnum):
    READ_WRITE = "read-write"
    READ_ONLY = "read-only"


class AgentMemory(BaseModel):
    """One memory an agent uses: the resource id, the mode, and the key template (None:
    the resource's default_key_template)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    mode: MemoryMode = MemoryMode.READ_WRITE
    key: str | None = None

    @model_validator(mode="after")
    def _check(self) -> AgentMemory:
        check_resource_id(self.id)
        if self.key is not None:
            KeyTemplate(self.key)
        return self


def _item(item: object, where: str, *, key_required: bool) -> AgentMemory:
    if isinstance(item, str):
        item = {"id": item}
    if not isinstance(item, Mapping):
        raise _fail(f"{where}: expected an id or {{id, mode, key}}, got {item!r}")
    if key_required and not item.get("key"):
        raise _fail(f"{where}: tier 3 needs a key for memory {item.get('id')!r}")
    try:
        return AgentMemory.model_validate(dict(item))
    except ValidationError as e:
        first = e.errors()[0]
        field = "".join(f".{p}" for p in first["loc"])
        raise _fail(f"{where}{field}: {first['msg'].removeprefix('Value error, ')}") from e
    except (TemplateKeyError, DomainError) as e:
        raise _fail(f"{where}: {e}") from e


def _fail(problem: str) -> AgentConfigError:
    return AgentConfigError(f"{problem}; {TIER_RULES}")


def _no_memory(memory: object, memories: object, memory_key: object) -> list[AgentMemory]:
    if memory is False and memories:
        raise _fail("'memory: false' with 'memories' is contradictory")
    if memories is None:
        if memory_key is not None:
            raise _fail("memory_key without a memory")
        return []
    if not isinstance(memories, list) or not memories:
        raise _fail("memories must be a non-empty list")
    if all(isinstance(m, str) for m in memories):
        raise _fail("a list of ids in 'memories' is tier 2: add 'memory: true' and 'memory_key'")
    if memory_key is not None:
        raise _fail("tier 3 gives each memory its own key: remove memory_key")
    return [_item(m, f"memories[{i}]", key_required=True) for i, m in enumerate(memories)]


def _tier2(memories: object, memory_key: object) -> list[AgentMemory]:
    if not isinstance(memories, list) or not memories:
        raise _fail("tier 2 ('memory: true') needs 'memories: [ids]'")
    if not all(isinstance(m, str) for m in memories):
        raise _fail("tier 2 ('memory: true') lists ids only")
    if not memory_key:
        raise _fail("tier 2 ('memory: true') needs 'memory_key'")
    return [
        _item({"id": m, "key": memory_key}, f"memories[{i}]", key_required=True)
        for i, m in enumerate(memories)
    ]


def _tier1(memory: str, memories: object, memory_key: object) -> list[AgentMemory]:
    if memories is not None:
        raise _fail(f"tier 1 ('memory: {memory}') cannot have 'memories'")
    if not memory_key:
        raise _fail(f"tier 1 ('memory: {memory}') needs 'memory_key'")
    return [_item({"id": memory, "key": memory_key}, "memory", key_required=True)]


def _list_form(memory: list[Any], memories: object, memory_key: object) -> list[AgentMemory]:
    if memories is not None or memory_key is not None:
        raise _fail("the list form 'memory: [...]' takes no 'memories' or 'memory_key'")
    if not memory:
        raise _fail("'memory: []' lists no memory; use 'memory: false'")
    return [_item(m, f"memory[{i}]", key_required=False) for i, m in enumerate(memory)]


def parse_agent_memory(config: Mapping[str, Any]) -> list[AgentMemory]:
    """The memories of an agent configuration (its ``memory``, ``memories`` and
    ``memory_key`` fields), or AgentConfigError naming the tier rules."""
    memory = config.get("memory")
    memories = config.get("memories")
    memory_key = config.get("memory_key")
    if memory_key is not None and not isinstance(memory_key, str):
        raise _fail("memory_key must be a key template string")
    if memory is None or memory is False:
        refs = _no_memory(memory, memories, memory_key)
    elif memory is True:
        refs = _tier2(memories, memory_key)
    elif isinstance(memory, str):
        refs = _tier1(memory, memories, memory_key)
    elif isinstance(memory, list):
        refs = _list_form(memory, memories, memory_key)
    else:
        raise _fail(f"memory: {memory!r} is not a memory configuration")
    seen: set[str] = set()
    for ref in refs:
        if ref.id in seen:
            raise _fail(f"memory {ref.id!r} is listed twice; list each memory once")
        seen.add(ref.id)
    return refs


class AgentResource(BaseModel):
    """An agent declared in a resource file (``resource: agent``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource: Literal["agent"] = Field(description="the kind of file")
    id: str = Field(min_length=1, max_length=200, description="the agent's id")
    description: str = ""
    memory: Any = Field(
        default=None, description="one memory resource id, or true with `memories: [ids]`"
    )
    memories: Any = Field(
        default=None,
        description="memory resource ids, or a list of {id, mode: read-write | read-only, key}",
    )
    memory_key: str | None = Field(
        default=None, description="the key template of `memory` (or of every id in `memories`)"
    )

    @model_validator(mode="after")
    def _memories(self) -> AgentResource:
        try:
            parse_agent_memory(self.model_dump())
        except AgentConfigError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def references(self) -> list[AgentMemory]:
        return parse_agent_memory(self.model_dump())

    def mode_for(self, resource_id: str) -> MemoryMode | None:
        """How this agent may use memories of ``resource_id`` (None: not at all)."""
        for ref in self.references:
            if ref.id == resource_id:
                return ref.mode
        return None


@dataclass(frozen=True, slots=True)
class ResolvedMemory:
    """A memory an agent uses, resolved: the reference, the mode and the resource."""

    ref: MemoryRef
    mode: MemoryMode
    resource: MemoryResource

    @property
    def writable(self) -> bool:
        return self.mode is MemoryMode.READ_WRITE


def resolve_memories(
    memories: list[AgentMemory],
    resources: Mapping[str, MemoryResource],
    *,
    tenant: str,
    context: Mapping[str, Any],
) -> list[ResolvedMemory]:
    """Render each memory's key in ``context``, sanitize it and namespace it under the
    tenant. Every id must name a loaded resource."""
    resolved = []
    for ref in memories:
        resource = resources.get(ref.id)
        if resource is None:
            known = ", ".join(sorted(resources)) or "none loaded"
            raise AgentConfigError(f"memory {ref.id!r} names no loaded resource (known: {known})")
        template = KeyTemplate(ref.key) if ref.key is not None else resource.key_template
        if template is None:
            raise AgentConfigError(
                f"memory {ref.id!r} has no key: give it a key, or set default_key_template "
                f"in the {ref.id} resource"
            )
        raw = template.render(context)
        if resource.privacy_policy.matches(raw):
            raise AgentConfigError(
                f"the key of memory {ref.id!r} matches a redaction pattern of the resource: "
                f"render keys from ids, never from personal data"
            )
        key = sanitize_key(raw)
        resolved.append(ResolvedMemory(MemoryRef(tenant, ref.id, key), ref.mode, resource))
    return resolved
