"""Privacy: redaction with linear-time regular expressions (RE2: no backtracking, so no
pattern can hang a worker), messages that are never persisted, and secrets masked in
logs. Patterns are compiled when the resource file loads; one that RE2 refuses (a
backreference, a lookaround) stops the load with the pattern named."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
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

    @property
    def active(self) -> bool:
        return bool(self.redact_patterns or self.non_persistable_message_types)

    def matches(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self._compiled)

    def redact_text(self, text: str) -> str:
        replacement = self.default_redaction_string
        if not self._compiled:
            return text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (bad input): keep them as escapes
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        for pattern in self._compiled:
            text = pattern.sub(lambda _: replacement, text)  # literal, never a template
        return text

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

    def redact_event(self, text: str) -> str:
        """An event's JSON text as a dead letter may keep it: non-persistable messages
        removed and everything else redacted on the decoded structure (so no escape or
        anchoring defeats a pattern). Text that is not JSON is redacted as text."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return self.redact_text(text)
        payload = data.get("payload") if isinstance(data, dict) else None
        if isinstance(payload, dict):
            message = payload.get("message")
            if isinstance(message, dict) and not self._persists_raw(message):
                payload["message"] = {"removed": "non_persistable"}
            messages = payload.get("messages")
            if isinstance(messages, list):
                payload["messages"] = [
                    m for m in messages if not isinstance(m, dict) or self._persists_raw(m)
                ]
        return json.dumps(self.redact_json(data), ensure_ascii=False)

    def _persists_raw(self, message: dict[str, Any]) -> bool:
        kinds = set(self.non_persistable_message_types)
        metadata = message.get("metadata")
        kind = metadata.get("type") if isinstance(metadata, dict) else None
        return message.get("role") not in kinds and not (isinstance(kind, str) and kind in kinds)

    def _redact_key(self, key: str) -> str:
        if not self.matches(key):
            return key
        # Distinct keys stay distinct: the redaction string and a short stable hash.
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{self.redact_text(key)}#{digest}"


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
