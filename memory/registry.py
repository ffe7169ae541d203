"""Loading resource files (memory resources and agents) into a registry.

Loading is strict: an unknown field is an error with a "did you mean" (the origin
system's drifted names get theirs from a table), and every error names the file, the
field and the fix.
"""

from __future__ import annotations

import difflib
import logging
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from memory.agents import AgentResource, MemoryMode
from memory.errors import ResourceError, UnknownResourceError
from memory.privacy import PSEUDONYM, PrivacyPolicy, pseudonym
from memory.resource import MemoryResource

log = logging.getLogger(__name__)

#: Names used by the origin system (or its docs) and what they are called here.
DRIFTED: dict[str, str] = {
    "flushing_strategy": "flushing",
    "key": "default_key_template",
    "threshold": "flushing.summarize_threshold",
    "message_limit": "max_messages",
    "eviction_policy": "flushing (type lru, lfu or priority) and priority",
    "priority_blocks": "priority",
    "privacy": "privacy_policy",
    "storage": "persistence",
    "token_counter": "token_provider",
    "ttl": "persistence.ttl",
    "flush_ttl": "locking.flush_ttl",
    "append_ttl": "locking.append_ttl",
    "clear_ttl": "locking.clear_ttl",
    "circuit_breaker": "nothing: Redis failures are handled by the processors; remove it",
}
KINDS: dict[str, type[BaseModel]] = {"memory": MemoryResource, "agent": AgentResource}


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (through Optional, Annotated, list, dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    if isinstance(annotation, types.UnionType):
        for arg in annotation.__args__:
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            continue  # a dict key (e.g. a role name): stay on the model of the dict's values
        current = _submodel(field.annotation)
    return current


def _unknown_field(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    name = str(loc[-1])
    if name in DRIFTED:
        target = DRIFTED[name]  # a path from the top of the file: shorten it to where we are
        parent = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
        if parent and target.startswith(parent + "."):
            target = target.removeprefix(parent + ".")
        return f"unknown field (from the origin system?): did you mean {target}?"
    owner = _model_at(model, loc[:-1])
    fields = sorted(owner.model_fields) if owner is not None else []
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"unknown field: did you mean {close[0]}?"
    known = ", ".join(fields) if fields else "none"
    return f"unknown field: remove it (fields here: {known})"


def _problems(model: type[BaseModel], error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in error.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            message = _unknown_field(model, loc)
        elif e["type"] == "missing":
            message = "required: add it"
        else:
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] in ("literal_error", "enum") and e.get("ctx", {}).get("expected"):
                message = f"{message} (got {e.get('input')!r})"
        problems.append((field, message))
    return problems


def load_resource_file(path: Path) -> MemoryResource | AgentResource:
    """Load one resource file; errors name the file, the field and the fix."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ResourceError(f"cannot read the file: {e.strerror}", path=str(path)) from e
    except yaml.YAMLError as e:
        raise ResourceError(f"not valid YAML: {e}", path=str(path)) from e
    if not isinstance(data, dict):
        raise ResourceError(
            "expected a mapping with at least 'resource: memory' and 'id'", path=str(path)
        )
    kind = data.get("resource")
    model = KINDS.get(str(kind))
    if model is None:
        raise ResourceError(
            f"resource must be 'memory' or 'agent', got {kind!r}", path=str(path), field="resource"
        )
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError as e:
        raise ResourceError(path=str(path), problems=_problems(model, e)) from e


class ResourceRegistry(Mapping[str, MemoryResource]):
    """The memory resources (and agents) known to a process, by id."""

    def __init__(
        self,
        resources: Iterable[MemoryResource] = (),
        agents: Iterable[AgentResource] = (),
    ) -> None:
        self._by_id: dict[str, MemoryResource] = {}
        self._agents: dict[str, AgentResource] = {}
        self._origin: dict[str, str] = {}
        self._policy: PrivacyPolicy | None = None
        self._workflow_names: dict[str, str] = {}
        self.paths: list[Path] = []
        for resource in resources:
            self.add(resource, origin="(code)")
        for agent in agents:
            self.add(agent, origin="(code)")

    def add(self, item: MemoryResource | AgentResource, *, origin: str) -> None:
        table: dict[str, Any] = self._agents if isinstance(item, AgentResource) else self._by_id
        kind = "agent" if isinstance(item, AgentResource) else "resource"
        if item.id in table:
            raise ResourceError(
                f"duplicate {kind} id {item.id!r}, already defined in "
                f"{self._origin[f'{kind}:{item.id}']}; give one of them another id",
                path=origin,
                field="id",
            )
        table[item.id] = item
        self._origin[f"{kind}:{item.id}"] = origin
        self._policy = None
        self._workflow_names.clear()
        if isinstance(item, MemoryResource):
            for warning in item.warnings:
                log.warning("%s: %s", origin, warning)

    @classmethod
    def load(cls, paths: Iterable[Path]) -> ResourceRegistry:
        """Load every ``*.yaml`` / ``*.yml`` of the given folders (or single files)."""
        registry = cls()
        registry.paths = list(paths)
        for path in registry.paths:
            for file in cls.files_of(path):
                registry.add(load_resource_file(file), origin=str(file))
        registry.check_agents()
        return registry

    def check_agents(self) -> None:
        """Every memory an agent names must be a loaded resource: a misspelt id would
        leave the memory it meant writable by an agent declared read-only."""
        for agent in self._agents.values():
            for ref in agent.references:
                if ref.id not in self._by_id:
                    close = difflib.get_close_matches(ref.id, list(self._by_id), n=1)
                    hint = f"did you mean {close[0]!r}?" if close else "add its resource file"
                    known = ", ".join(sorted(self._by_id)) or "none loaded"
                    raise ResourceError(
                        f"agent {agent.id!r} names memory {ref.id!r}, which no resource "
                        f"defines; {hint} (known: {known})",
                        path=self._origin[f"agent:{agent.id}"],
                        field="memories" if agent.memories is not None else "memory",
                    )

    @staticmethod
    def files_of(path: Path) -> list[Path]:
        """The resource files of a folder (``*.yaml``, ``*.yml``), or the file itself."""
        if path.is_dir():
            return sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if path.exists():
            return [path]
        raise ResourceError(
            "no such file or folder; pass an existing path to --resources",
            path=str(path),
        )

    def reload(self) -> ResourceRegistry:
        """A new registry read again from the same paths; this one is left as it was if
        any file fails (the caller swaps them)."""
        return ResourceRegistry.load(self.paths)

    def get_resource(self, resource_id: str) -> MemoryResource:
        try:
            return self._by_id[resource_id]
        except KeyError:
            raise UnknownResourceError(resource_id, list(self._by_id)) from None

    def find(self, resource_id: str) -> MemoryResource | None:
        return self._by_id.get(resource_id)

    @property
    def privacy_policy(self) -> PrivacyPolicy:
        """Every loaded resource's redaction patterns in one policy, for text whose
        resource is not known: a dead letter of an unreadable event or of an unknown
        resource, a workflow id (workflows span resources)."""
        if self._policy is None:
            patterns = [p for r in self._by_id.values() for p in r.privacy_policy.redact_patterns]
            self._policy = PrivacyPolicy(redact_patterns=list(dict.fromkeys(patterns)))
        return self._policy

    def workflow_name(self, workflow_id: str) -> str:
        """The name a workflow is kept under in Redis (index keys, a memory's writers,
        the ended set, outcomes, letters, logs): its id, or, when a redaction pattern of
        any loaded resource matches the id (an e-mail address, say), a pseudonym, the
        same for the same id: ``wf~`` and 32 hex digits of its SHA-256. A pseudonym is
        its own name."""
        name = self._workflow_names.get(workflow_id)
        if name is None:
            name = workflow_id
            if not PSEUDONYM.fullmatch(workflow_id) and self.privacy_policy.matches(workflow_id):
                name = pseudonym(workflow_id)
            if len(self._workflow_names) >= 10_000:
                self._workflow_names.clear()
            self._workflow_names[workflow_id] = name
        return name

    def agent(self, agent_id: str) -> AgentResource | None:
        return self._agents.get(agent_id)

    @property
    def agents(self) -> list[AgentResource]:
        return list(self._agents.values())

    def read_only(self, agent_id: str | None, resource_id: str) -> bool:
        """True when a declared agent may only read memories of ``resource_id``."""
        agent = self._agents.get(agent_id) if agent_id else None
        return agent is not None and agent.mode_for(resource_id) is MemoryMode.READ_ONLY

    def __getitem__(self, resource_id: str) -> MemoryResource:
        return self._by_id[resource_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)
