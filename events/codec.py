"""Encoding events into stream fields and decoding them back, with upgrades from the
previous schema version and a precise reason for everything that cannot be decoded.

Stream fields of an ingest entry:

- ``event``: the event JSON (required);
- ``replay_of`` / ``replay_key``: set only by the dead letter replay, the original
  entry id and the idempotency key the replay is applied under.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from events.envelope import (
    EVENT_ADAPTER,
    OLDEST_SUPPORTED_VERSION,
    SCHEMA_VERSION,
    AnyEvent,
    EventType,
)
from events.errors import DecodeError, NewerSchemaError

EVENT_FIELD = "event"
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
#: How deep an event may nest arrays and objects (the envelope takes 4 levels, so a
#: message's metadata has about 60). Every reader parses what is admitted: pydantic's
#: JSON parser stops at 200, Python's at about 1,000, Lua's cjson at 1,000.
MAX_JSON_DEPTH = 64
#: Versions past the current one that may be a real upgrade on the way (the partition
#: waits for it); an event claiming a later one is refused as invalid.
MAX_VERSIONS_AHEAD = 3
_STREAM_ID = re.compile(r"^\d+-\d+$")
#: What a replay writes as its key (see replay_dead_letter.lua): a digest, never text.
REPLAY_KEY = re.compile(r"[0-9a-f]{40}|dlq:\d+:\d+-\d+")
_KNOWN_TYPES = frozenset(t.value for t in EventType)
#: A JSON escape of a UTF-16 surrogate; only text holding one can decode to a lone one
#: (the text itself was checked to be UTF-8, so it holds no raw surrogates).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


#: A JSON string, or what is left of the text after an unterminated one; possessive, so
#: no input makes it backtrack (one pass, linear in the text).
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?')
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth_over(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Does JSON ``text`` nest arrays and objects more than ``limit`` deep? Linear in the
    text, never recursive; text with at most ``limit`` brackets is answered at once."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def printable(text: str) -> str:
    """``text`` as valid UTF-8 text: bytes that were not UTF-8 (read as lone surrogates)
    become ``\\xNN`` escapes, so a dead letter can always be written."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(slots=True)
class Decoded:
    """An event read from a stream entry, with the replay fields if any (one per entry
    on the hot path: not frozen, see ``store.Target``)."""

    event: AnyEvent
    text: str
    replay_of: str | None = None
    replay_key: str | None = None
    data: dict[str, Any] | None = None  # the event's JSON as decoded (upgraded)

    @property
    def idempotency_key(self) -> str | None:
        """The key a memory remembers the event by: the SHA-1 digest of the producer's
        key (keys are free text, so none is kept in Redis as it is), or the replay key
        (a digest already: the replay script made it)."""
        if self.replay_key:
            return self.replay_key
        key = self.event.idempotency_key
        return _digest(key) if key else None


def _digest(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def encode(event: AnyEvent) -> dict[str, str]:
    """The stream fields of an event."""
    return {EVENT_FIELD: event_json(event)}


def event_json(event: AnyEvent) -> str:
    return event.model_dump_json(exclude_none=True)


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named the memory with one string, ``payload.memory_id`` =
    ``tenant/resource/key``; version 2 splits it into ``payload.memory``."""
    payload = data.get("payload")
    if isinstance(payload, dict) and "memory_id" in payload:
        memory_id = payload.pop("memory_id")
        parts = memory_id.split("/", 2) if isinstance(memory_id, str) else []
        if len(parts) != 3:
            raise DecodeError("invalid", "payload.memory_id must be tenant/resource/key")
        if parts[0] != data.get("tenant"):
            raise DecodeError(
                "invalid",
                f"payload.memory_id names tenant {parts[0]!r}, the event {data.get('tenant')!r}",
            )
        payload["memory"] = {"resource": parts[1], "key": parts[2]}
    data["schema_version"] = 2
    return data


def _upgrade_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 only added event types and optional fields: a version 2 event is a
    version 3 event as it is."""
    data["schema_version"] = 3
    return data


def _upgrade_v3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 4 only added memory.restored: a version 3 event is a version 4 event as
    it is."""
    data["schema_version"] = 4
    return data


_UPGRADES = {1: _upgrade_v1, 2: _upgrade_v2, 3: _upgrade_v3}


def decode(fields: dict[str, str] | None, *, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> Decoded:
    """The event of a stream entry.

    Raises DecodeError (dead-letter it with ``reason``) or NewerSchemaError (hold the
    partition until the consumers are upgraded), and nothing else, whatever the entry
    holds.
    """
    try:
        return _decode(fields, max_bytes)
    except (DecodeError, NewerSchemaError):
        raise
    except Exception as e:  # input no check foresaw: still the entry's fault, not ours
        raise DecodeError("invalid", f"the event cannot be read ({type(e).__name__})") from e


def _decode(fields: dict[str, str] | None, max_bytes: int) -> Decoded:
    if not fields or EVENT_FIELD not in fields:
        raise DecodeError("missing_field", f"the entry has no {EVENT_FIELD!r} field")
    text = fields[EVENT_FIELD]
    data = _parse(text, max_bytes)
    event_id = str(data.get("event_id", ""))[:200]
    tenant = str(data.get("tenant", ""))[:64]
    version = _version(data, event_id, tenant)
    for v in range(version, SCHEMA_VERSION):
        data = _UPGRADES[v](data)
    kind = data.get("type")
    if kind is not None and not isinstance(kind, str):
        raise DecodeError("invalid", "type must be a string", event_id=event_id, tenant=tenant)
    if kind not in _KNOWN_TYPES:
        raise DecodeError(
            "unknown_type",
            f"unknown event type {kind!r}; known: {', '.join(t.value for t in EventType)}",
            event_id=event_id,
            tenant=tenant,
        )
    try:
        event = EVENT_ADAPTER.validate_python(data)
    except RecursionError as e:
        raise DecodeError("invalid", "the event is nested too deeply", event_id=event_id) from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "(event)"
        reason = "missing_field" if first["type"] == "missing" else "invalid"
        raise DecodeError(
            reason, f"{where}: {first['msg']}", event_id=event_id, tenant=tenant
        ) from e
    replay_of, replay_key = _replay_fields(fields)
    return Decoded(event, text, replay_of, replay_key, data)


def _parse(text: str, max_bytes: int) -> dict[str, Any]:
    """The event's JSON object, within the size and nesting limits."""
    try:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise DecodeError(
            "not_utf8", f"the event is not UTF-8 text (byte offset about {e.start})"
        ) from e
    if size > max_bytes:
        raise DecodeError(
            "oversized", f"the event is {size} bytes, over the {max_bytes}-byte limit"
        )
    if json_depth_over(text):
        raise DecodeError(
            "invalid", f"the event nests arrays and objects more than {MAX_JSON_DEPTH} deep"
        )
    # pydantic-core's parser reads what the standard one does (integers of any size,
    # NaN and Infinity), twice as fast; what it refuses (a lone surrogate escape, or no
    # JSON at all) is decided by the standard parser, as it always was.
    try:
        data = from_json(text)
    except ValueError:
        data = _parse_fallback(text)
    if not isinstance(data, dict):
        raise DecodeError("invalid", "the event must be a JSON object")
    try:
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DecodeError(
            "invalid", "the event contains a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
        ) from e
    return data


def _parse_fallback(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise DecodeError("not_json", f"the event field is not JSON: {e}") from e
    except RecursionError as e:
        raise DecodeError("invalid", "the event is nested too deeply") from e


def _version(data: dict[str, Any], event_id: str, tenant: str) -> int:
    """The event's schema version, if this code reads it (or waits for it)."""
    version = data.get("schema_version")
    if version is None:
        raise DecodeError("missing_field", "the event has no schema_version", event_id=event_id)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DecodeError("invalid", "schema_version must be an integer", event_id=event_id)
    if version > SCHEMA_VERSION + MAX_VERSIONS_AHEAD:
        raise DecodeError(
            "invalid",
            f"schema version {version} is not a version this code could be upgraded to "
            f"(the current is {SCHEMA_VERSION})",
            event_id=event_id,
            tenant=tenant,
        )
    if version > SCHEMA_VERSION:
        # Held for an upgrade only if it looks like an event at all: garbage claiming a
        # newer version would hold the partition for ever.
        envelope = (data.get("type"), data.get("tenant"), data.get("event_id"))
        if not all(isinstance(x, str) and x for x in envelope):
            raise DecodeError(
                "invalid",
                f"an event of schema version {version} must still have a type, a tenant "
                f"and an event_id (strings)",
                event_id=event_id,
            )
        raise NewerSchemaError(version, SCHEMA_VERSION)
    if version < OLDEST_SUPPORTED_VERSION:
        raise DecodeError(
            "unsupported_version",
            f"schema version {version} is no longer read; the oldest supported is "
            f"{OLDEST_SUPPORTED_VERSION}, the current {SCHEMA_VERSION}",
            event_id=event_id,
            tenant=tenant,
        )
    return version


def well_formed_replay_fields(fields: dict[str, str]) -> dict[str, str]:
    """The replay fields of an entry that a dead letter may keep: those of the form a
    replay writes (a stream id, a digest); anything else is a producer's free text."""
    kept = {}
    of, key = fields.get("replay_of"), fields.get("replay_key")
    if isinstance(of, str) and _STREAM_ID.match(of):
        kept["replay_of"] = of
    if isinstance(key, str) and REPLAY_KEY.fullmatch(key):
        kept["replay_key"] = key
    return kept


def _replay_fields(fields: dict[str, str]) -> tuple[str | None, str | None]:
    replay_of, replay_key = fields.get("replay_of"), fields.get("replay_key")
    if replay_of is not None and not _STREAM_ID.match(replay_of):
        raise DecodeError("invalid", "the replay_of field must be a stream id such as 1-0")
    if replay_key is not None and not REPLAY_KEY.fullmatch(replay_key):
        raise DecodeError(
            "invalid",
            "the replay_key field must be what a replay writes: an idempotency key's SHA-1 "
            "hex digest, or dlq:<partition>:<dead letter id>",
        )
    return replay_of, replay_key
