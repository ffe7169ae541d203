"""Privacy: redaction with linear-time regular expressions (RE2: no backtracking, so no
pattern can hang a worker), messages that are never persisted, and secrets masked in
logs. Patterns are compiled when the resource file loads; one that RE2 refuses (a
backreference, a lookaround) stops the load with the pattern named."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import re2  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from memory.message import Message

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False

DEFAULT_REDACTION = "[REDACTED]"
MAX_PATTERN_LENGTH = 1000


def compile_pattern(pattern: str) -> Any:
    """An RE2 pattern, or ValueError saying why RE2 refuses it."""
    if not pattern:
        raise ValueError("an empty pattern would match everywhere; remove it")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"a pattern is at most {MAX_PATTERN_LENGTH} characters")
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as e:
        detail = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(
            f"pattern {pattern!r} is not valid RE2 ({detail}); RE2 has no backreferences "
            f"or lookarounds, which is what keeps matching linear-time"
        ) from e


class PrivacyPolicy(BaseModel):
    """What a resource never lets reach Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redact_patterns: list[str] = Field(
        default_factory=list, description="RE2 patterns replaced before anything is stored"
    )
    non_persistable_message_types: list[str] = Field(
        default_factory=list,
        description="roles (system, tool, ...) or metadata 'type' values never stored",
    )
    default_redaction_string: str = Field(
        default=DEFAULT_REDACTION,
        min_length=1,
        max_length=100,
        description="what replaces a match (taken literally)",
    )
    _compiled: list[Any] = PrivateAttr(default_factory=list)
    _searcher: _Searcher | None = PrivateAttr(default=None)

    @field_validator("redact_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for i, pattern in enumerate(patterns):
            try:
                compile_pattern(pattern)
            except ValueError as e:
                raise ValueError(f"redact_patterns[{i}]: {e}") from None
        return patterns

    def model_post_init(self, context: Any, /) -> None:
        self._compiled = [compile_pattern(p) for p in self.redact_patterns]
        if self._compiled:
            self._searcher = _Searcher(self.redact_patterns, self._compiled)

    @property
    def active(self) -> bool:
        return bool(self.redact_patterns or self.non_persistable_message_types)

    def matches(self, text: str) -> bool:
        searcher = self._searcher
        return searcher is not None and searcher.found(text)

    def redact_text(self, text: str) -> str:
        replacement = self.default_redaction_string
        if not self.matches(text):
            return text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (bad input): keep them as escapes
            text = _escaped(text)
        for pattern in self._compiled:
            text = pattern.sub(lambda _: replacement, text)  # literal, never a template
        return text

    def clean(self, data: Any) -> bool:
        """True when no pattern matches any text of ``data`` (a decoded event, or part
        of one) that redaction would look at: its strings, keys and numbers, but the
        envelope's numbers. Redacting it would change nothing, so it need not be: one
        search over all its text, the common case's whole cost. The texts are searched
        joined by line breaks: a match inside one text is a match in the join (a line
        break is no word character, so word boundaries stay where they were), and a
        match across two only sends the event down the full path. An anchor would not
        match at a text's edge inside the join, so a policy with one (^, $, \\A, \\z)
        is never taken as clean this way."""
        searcher = self._searcher
        if searcher is None:
            return True
        if searcher.anchored:
            return False
        parts: list[str] = []
        _texts_of_event(data, parts)
        return not searcher.found("\n".join(parts))

    def persists(self, message: Message) -> bool:
        """False for a message of a non-persistable type (by role or metadata type)."""
        kinds = set(self.non_persistable_message_types)
        if message.role.value in kinds:
            return False
        kind = message.metadata.get("type")
        return not (isinstance(kind, str) and kind in kinds)

    def redact(self, message: Message) -> Message:
        """The message with every pattern replaced wherever it holds text: content and
        content parts, name, tool calls (ids and arguments), and metadata keys and values
        (numbers too, as text). Only roles and the types of parts and calls are kept."""
        if not self._compiled:
            return message
        data = message.model_dump(mode="json", exclude_none=True)
        out: dict[str, Any] = {"role": data.pop("role")}
        content = data.pop("content", None)
        if isinstance(content, list):  # a part's type is structure
            out["content"] = [self._redact_typed(part) for part in content]
        elif content is not None:
            out["content"] = self.redact_json(content)
        if "tool_calls" in data:  # a call's type is structure
            out["tool_calls"] = [self._redact_typed(call) for call in data.pop("tool_calls")]
        out.update(self.redact_json(data))
        return Message.model_validate(out)

    def _redact_typed(self, item: dict[str, Any]) -> dict[str, Any]:
        kept: dict[str, Any] = {"type": item["type"]} if "type" in item else {}
        rest: dict[str, Any] = self.redact_json({k: v for k, v in item.items() if k != "type"})
        return kept | rest

    def redact_json(self, value: Any) -> Any:
        """Any JSON value with every pattern replaced in its strings, numbers and keys."""
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):
            text = str(value)
            return self.redact_text(text) if self.matches(text) else value
        if isinstance(value, list):
            return [self.redact_json(v) for v in value]
        if isinstance(value, dict):
            return {self._redact_key(str(k)): self.redact_json(v) for k, v in value.items()}
        return value

    def redact_event(self, text: str, workflow_name: Callable[[str], str] | None = None) -> str:
        """An event's JSON text as a dead letter may keep it: non-persistable messages
        removed and everything else redacted on the decoded structure (so no escape or
        anchoring defeats a pattern), except the envelope's own numbers and ids, which
        carry no user data and keep the letter traceable and replayable; a workflow id
        named by ``workflow_name`` (its pseudonym, where it has one). Text that is not
        JSON (or cannot be read as such) is redacted as text. Never raises."""
        try:
            kept = self._redact_event_data(json.loads(text), workflow_name)
        except Exception:  # not JSON, too deep, anything: redacted as text
            return self.redact_text(text)
        out = json.dumps(kept, ensure_ascii=False)
        try:
            out.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape: kept as an escape
            out = json.dumps(kept)
        return out

    def _redact_event_data(
        self, data: Any, workflow_name: Callable[[str], str] | None = None
    ) -> Any:
        if not isinstance(data, dict):
            return self.redact_json(data)
        out: dict[str, Any] = {}
        for key, value in data.items():
            if (key in _ENVELOPE_FIELDS and _plain(value)) or (
                key == "event_id" and isinstance(value, str) and _MADE_ID.fullmatch(value)
            ):
                out[key] = value
            elif key == "payload" and isinstance(value, dict):
                out[key] = self._redact_payload(value, workflow_name)
            else:
                out[self._redact_key(str(key))] = self.redact_json(value)
        return out

    def _redact_payload(
        self, payload: dict[str, Any], workflow_name: Callable[[str], str] | None
    ) -> dict[str, Any]:
        payload = dict(payload)
        workflow = payload.get("workflow_id")
        if workflow_name is not None and isinstance(workflow, str):
            payload["workflow_id"] = workflow_name(workflow)
        message = payload.get("message")
        if isinstance(message, dict) and not self._persists_raw(message):
            payload["message"] = {"removed": "non_persistable"}
        messages = payload.get("messages")
        if isinstance(messages, list):
            payload["messages"] = [
                m for m in messages if not isinstance(m, dict) or self._persists_raw(m)
            ]
        out: dict[str, Any] = {}
        for key, value in payload.items():
            if (key in _PAYLOAD_FIELDS and _plain(value)) or (
                key in _PAYLOAD_IDS and isinstance(value, str) and _STREAM_ID.fullmatch(value)
            ):
                out[key] = value
            else:
                out[self._redact_key(str(key))] = self.redact_json(value)
        return out

    def _persists_raw(self, message: dict[str, Any]) -> bool:
        """``persists`` for a message that may not be valid (any JSON in any field)."""
        kinds = set(self.non_persistable_message_types)
        role = message.get("role")
        metadata = message.get("metadata")
        kind = metadata.get("type") if isinstance(metadata, dict) else None
        return not (isinstance(role, str) and role in kinds) and not (
            isinstance(kind, str) and kind in kinds
        )

    def _redact_key(self, key: str) -> str:
        if not self.matches(key):
            return key
        # Distinct keys stay distinct: the redaction string and a short stable hash.
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{self.redact_text(key)}#{digest}"


#: Envelope fields that are the event's own bookkeeping, and payload fields that are
#: numbers or flags: a dead letter keeps their numbers as they are (a 13-digit time is
#: not a phone number); their text is redacted as any other.
_ENVELOPE_FIELDS = frozenset({"schema_version", "type", "tenant", "partitions", "published_at_ms"})
#: An event id as the SDK makes them (a UUID, with or without dashes); any other id is
#: the producer's text, redacted like the rest.
_MADE_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PAYLOAD_FIELDS = frozenset({"partition", "seq", "status", "strategy", "dry_run", "backup"})
#: Payload fields that name a stream entry (a backup is its clear's entry id): kept.
_PAYLOAD_IDS = frozenset({"backup_id"})
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


#: What anchors a pattern to the edges of a text (conservatively: a caret in a class too).
_ANCHOR = re.compile(r"\^|\$|\\A|\\z")


class _Searcher:
    """Whether any of a policy's patterns matches a text: one search with all of them
    combined, straight into RE2 (no match objects), the redaction's common case."""

    __slots__ = ("_anchor", "_combined", "_compiled", "_null", "anchored")

    def __init__(self, patterns: list[str], compiled: list[Any]) -> None:
        self._compiled = compiled
        self.anchored = any(_ANCHOR.search(p) for p in patterns)
        try:  # two patterns may not combine (a group name twice): then one by one
            self._combined: Any = re2.compile(
                "|".join(f"(?:{p})" for p in patterns), options=_OPTIONS
            )
        except re2.error:
            self._combined = None
        # RE2's own search, when this wrapper version has it (else the public one).
        inner = getattr(self._combined, "_regexp", None)
        self._anchor = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
        self._null = getattr(re2, "_NULL_SPAN", None)
        if inner is None or self._anchor is None or self._null is None:
            self._anchor = None

    def found(self, text: str) -> bool:
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (bad input): searched as escapes
            text = _escaped(text)
            encoded = text.encode("utf-8")
        combined = self._combined
        if combined is None:
            return any(pattern.search(text) for pattern in self._compiled)
        if self._anchor is None:
            return combined.search(text) is not None
        spans = combined._regexp.Match(self._anchor, encoded, 0, len(encoded))
        return bool(spans[0] != self._null)


def _escaped(text: str) -> str:
    """Text with lone surrogates (bad input) as backslash escapes, valid UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _texts_of_event(data: Any, parts: list[str]) -> None:
    """The texts ``_redact_event_data`` would redact, into ``parts`` (``data`` as JSON
    decodes: every key a string). Their order does not matter (see ``clean``)."""
    if type(data) is not dict:
        _texts(data, parts)
        return
    add = parts.append
    parts.extend(data)  # the keys
    for key, value in data.items():
        kind = type(value)
        if kind is str:
            if key != "event_id" or not _MADE_ID.fullmatch(value):
                add(value)
        elif value is None or kind is bool:
            continue
        elif kind is int or kind is float:
            if key not in _ENVELOPE_FIELDS:
                add(str(value))
        elif kind is dict and key == "payload":
            parts.extend(value)
            for k, v in value.items():
                vkind = type(v)
                if vkind is str:
                    if k not in _PAYLOAD_IDS or not _STREAM_ID.fullmatch(v):
                        add(v)
                elif v is None or vkind is bool:
                    continue
                elif vkind is int or vkind is float:
                    if k not in _PAYLOAD_FIELDS:
                        add(str(v))
                else:
                    _texts(v, parts)
        else:
            _texts(value, parts)


def _texts(value: Any, parts: list[str]) -> None:
    """Every string, key and number (as text) of a decoded JSON value, into ``parts``;
    no recursion, so no depth is too deep."""
    stack = [value]
    pop, more = stack.pop, stack.extend
    add, add_all = parts.append, parts.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            add(item)
        elif kind is dict:
            add_all(item)  # its keys
            more(item.values())
        elif kind is list:
            more(item)
        elif kind is int or kind is float:
            add(str(item))


def _plain(value: Any) -> bool:
    """A number or a flag: nothing a pattern should rewrite (text is redacted as any
    other text, even in these fields)."""
    return value is None or isinstance(value, int | float | bool)


def event_ref(event_id: str) -> str:
    """How an outcome (and a flush request) names an event: its id when the SDK made it
    (a UUID: no user data), else ``sha1:`` and the hex digest of the id (a producer's
    own ids are free text)."""
    if _MADE_ID.fullmatch(event_id):
        return event_id
    return "sha1:" + hashlib.sha1(event_id.encode("utf-8", "surrogatepass")).hexdigest()


#: A workflow's pseudonym: see ``pseudonym``.
PSEUDONYM = re.compile(r"wf~[0-9a-f]{32}")


def pseudonym(workflow_id: str) -> str:
    """The name a workflow whose id matches a redaction pattern is kept under in Redis:
    ``wf~`` and 32 hex digits of the id's SHA-256 (the same for the same id)."""
    digest = hashlib.sha256(workflow_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"wf~{digest[:32]}"


def workflow_names(workflow_id: str) -> list[str]:
    """Every name a workflow may be kept under (its id, its pseudonym): what a reader
    that does not load the resources looks for."""
    return list(dict.fromkeys([workflow_id, pseudonym(workflow_id)]))


_SECRET_NAME = (
    r"(?:password|passwd|secret|token(?!s)|api[_-]?key|apikey|authorization|auth(?![a-z])|credential"
    r"|private[_-]?key|session[_-]?id|cookie)"
)
_SECRET_ITEM = re.compile(
    rf"""(?ix)
    (["']?[\w.-]*{_SECRET_NAME}[\w.-]*["']?\s*[:=]\s*)   # a key that looks like a secret
    ("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|(?:(?:bearer|basic)\s+)?[^\s,;}}\]]+)  # its value
    """
)
MASK = "***"


def mask_secrets(text: str) -> str:
    """``text`` with the values of secret-looking keys (``api_key=...``,
    ``"password": "..."``) replaced by ``***``, for logs."""
    return _SECRET_ITEM.sub(lambda m: m.group(1) + MASK, text)


def secret_keys(metadata: Mapping[str, Any]) -> list[str]:
    """The metadata keys that look like secrets."""
    return [k for k in metadata if re.fullmatch(rf"(?i)[\w.-]*{_SECRET_NAME}[\w.-]*", k)]
