"""Decoding stream entries into events: a precise reason for every bad input, upgrades
from the previous schema version, newer versions held back (never dead-lettered), replay
fields, round trips; and the committed JSON Schema agrees with the decoder."""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from events import (
    AnyEvent,
    AppendPayload,
    ClearPayload,
    DecodeError,
    EndedPayload,
    ErasePayload,
    FlushPayload,
    FlushRequested,
    LifecycleEvent,
    MemoryCleared,
    MemoryDeleted,
    MemoryEvent,
    MemoryName,
    MemoryPayload,
    MemoryReplaced,
    MemoryRestored,
    MessageAppended,
    MessageErased,
    NewerSchemaError,
    ReplacePayload,
    RestorePayload,
    TerminatedPayload,
    WorkflowEnded,
    WorkflowPayload,
    WorkflowStarted,
    WorkflowStatus,
    WorkflowTerminated,
    decode,
    encode,
    event_json,
)
from events.codec import MAX_JSON_DEPTH, MAX_VERSIONS_AHEAD
from events.envelope import SCHEMA_VERSION, new_event_id
from memory import Message, Role, ToolCall
from memory.message import FunctionCall

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "events" / "schema.json").read_text("utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

NAME = MemoryName(resource="customer-support", key="support-123")


def every_event() -> list[AnyEvent]:
    user = Message(role=Role.USER, content="hello", name="ann", metadata={"lang": "en"})
    return [
        MessageAppended(
            tenant="acme",
            idempotency_key="k1",
            partitions=16,
            published_at_ms=1_700_000_000_000,
            payload=AppendPayload(memory=NAME, workflow_id="wf-1", agent_id="a1", message=user),
        ),
        MessageAppended(
            tenant="acme",
            payload=AppendPayload(
                memory=NAME,
                message=Message(
                    role=Role.ASSISTANT,
                    tool_calls=[ToolCall(id="c1", function=FunctionCall(name="f", arguments="{}"))],
                    priority=5,
                ),
            ),
        ),
        MessageAppended(
            tenant="acme",
            payload=AppendPayload(
                memory=NAME,
                message=Message(
                    role=Role.TOOL, content=[{"type": "text", "text": "42"}], tool_call_id="c1"
                ),
            ),
        ),
        MemoryCleared(tenant="acme", payload=MemoryPayload(memory=NAME, workflow_id="wf-1")),
        MemoryCleared(tenant="acme", payload=ClearPayload(memory=NAME, backup=True)),
        MemoryDeleted(tenant="acme", payload=MemoryPayload(memory=NAME)),
        MessageErased(tenant="acme", payload=ErasePayload(memory=NAME, seq=7)),
        MemoryRestored(
            tenant="acme",
            payload=RestorePayload(memory=NAME, workflow_id="wf-1", backup_id="1700000000000-3"),
        ),
        MemoryReplaced(
            tenant="acme",
            payload=ReplacePayload(
                memory=NAME, messages=[Message(role=Role.SYSTEM, content="be brief"), user]
            ),
        ),
        MemoryReplaced(tenant="acme", payload=ReplacePayload(memory=NAME, messages=[])),
        FlushRequested(
            tenant="acme", payload=FlushPayload(memory=NAME, strategy="fifo", dry_run=True)
        ),
        WorkflowStarted(tenant="acme", payload=WorkflowPayload(workflow_id="wf-1")),
        WorkflowTerminated(
            tenant="acme",
            payload=TerminatedPayload(workflow_id="wf-1", status=WorkflowStatus.TIMED_OUT),
        ),
        WorkflowEnded(
            tenant="acme",
            idempotency_key="wf-end:wf-1",
            partitions=16,
            payload=EndedPayload(workflow_id="wf-1", status=WorkflowStatus.FAILED, partition=3),
        ),
    ]


def appended(**changes: Any) -> dict[str, Any]:
    """A valid message.appended event as JSON data, with top-level changes."""
    data: dict[str, Any] = {
        "schema_version": 4,
        "event_id": "ev-1",
        "tenant": "acme",
        "type": "message.appended",
        "payload": {
            "memory": {"resource": "customer-support", "key": "support-123"},
            "message": {"role": "user", "content": "hi"},
        },
    }
    data.update(changes)
    return data


def fields(data: Any) -> dict[str, str]:
    return {"event": json.dumps(data)}


def reason_of(entry: dict[str, str] | None, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(entry, **kwargs)
    return info.value.reason


# Bad inputs, each with its reason.


@pytest.mark.parametrize("entry", [None, {}, {"data": "{}"}])
def test_an_entry_without_the_event_field_is_missing_field(entry: dict[str, str] | None) -> None:
    assert reason_of(entry) == "missing_field"


@pytest.mark.parametrize("text", ["{not json", "", "{'single': 'quotes'}"])
def test_an_event_that_is_not_json_is_not_json(text: str) -> None:
    assert reason_of({"event": text}) == "not_json"


@pytest.mark.parametrize("text", ["[1, 2]", '"text"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_invalid(text: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode({"event": text})
    assert info.value.reason == "invalid"
    assert "JSON object" in info.value.detail


def test_an_event_without_schema_version_is_missing_field() -> None:
    data = appended()
    del data["schema_version"]
    with pytest.raises(DecodeError) as info:
        decode(fields(data))
    assert info.value.reason == "missing_field"
    assert "schema_version" in info.value.detail
    assert info.value.event_id == "ev-1"


@pytest.mark.parametrize(
    ("version", "reason"),
    [("2", "invalid"), (2.0, "invalid"), (True, "invalid"), (None, "missing_field")],
)
def test_a_schema_version_that_is_not_an_integer_is_refused(version: Any, reason: str) -> None:
    assert reason_of(fields(appended(schema_version=version))) == reason


def test_version_0_is_unsupported_and_names_the_supported_versions() -> None:
    with pytest.raises(DecodeError) as info:
        decode(fields(appended(schema_version=0)))
    assert info.value.reason == "unsupported_version"
    assert "oldest supported is 1" in info.value.detail
    assert info.value.tenant == "acme"


@pytest.mark.parametrize("ahead", [1, MAX_VERSIONS_AHEAD])
def test_a_newer_version_holds_back_and_is_never_a_decode_error(ahead: int) -> None:
    # Whatever else is wrong with it, a newer event is for newer consumers to judge.
    version = SCHEMA_VERSION + ahead
    data = appended(schema_version=version, type="something.new", payload={"x": 1})
    with pytest.raises(NewerSchemaError) as info:
        decode(fields(data))
    assert not isinstance(info.value, DecodeError)
    assert info.value.version == version
    assert info.value.supported == SCHEMA_VERSION
    assert "upgrade the consumers first" in str(info.value)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + MAX_VERSIONS_AHEAD + 1, 10**30])
def test_an_implausibly_new_version_is_invalid_not_held(version: int) -> None:
    # No upgrade skips that many versions: holding a partition for one would be for ever.
    with pytest.raises(DecodeError) as info:
        decode(fields(appended(schema_version=version)))
    assert info.value.reason == "invalid"
    assert "not a version" in info.value.detail


@pytest.mark.parametrize("kind", [7, [], {"a": 1}, True])
def test_a_type_that_is_not_a_string_is_invalid(kind: Any) -> None:
    with pytest.raises(DecodeError) as info:
        decode(fields(appended(type=kind)))
    assert (info.value.reason, info.value.detail) == ("invalid", "type must be a string")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 4 - 1, MAX_JSON_DEPTH - 4])
def test_metadata_is_admitted_up_to_the_nesting_limit(depth: int) -> None:
    # The envelope takes four levels: payload, message, metadata, the value's own.
    text = json.dumps(appended()).replace('"content"', '"metadata": {"m": NESTED}, "content"')
    nested = "[" * depth + "1" + "]" * depth
    text = text.replace("NESTED", nested)
    if depth + 4 <= MAX_JSON_DEPTH:
        assert decode({"event": text}).event is not None
    else:
        with pytest.raises(DecodeError) as info:
            decode({"event": text})
        assert info.value.reason == "invalid"
        assert f"more than {MAX_JSON_DEPTH} deep" in info.value.detail


def test_anything_unforeseen_in_decoding_is_an_invalid_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from events import codec

    def broken(data: object) -> object:
        raise TypeError("an input no check foresaw")

    monkeypatch.setattr(codec.EVENT_ADAPTER, "validate_python", broken)
    with pytest.raises(DecodeError) as info:
        decode(fields(appended()))
    assert info.value.reason == "invalid"
    assert "TypeError" in info.value.detail


@pytest.mark.parametrize("kind", ["message.deleted", ""])
def test_an_unknown_type_is_unknown_type_and_lists_the_known_ones(kind: Any) -> None:
    with pytest.raises(DecodeError) as info:
        decode(fields(appended(type=kind)))
    assert info.value.reason == "unknown_type"
    assert "message.appended" in info.value.detail


def test_an_event_without_type_is_unknown_type() -> None:
    data = appended()
    del data["type"]
    assert reason_of(fields(data)) == "unknown_type"


@pytest.mark.parametrize(
    ("drop", "where"),
    [
        (("payload", "message"), "payload.message"),
        (("payload", "memory"), "payload.memory"),
        (("payload", "memory", "key"), "payload.memory.key"),
        (("payload", "message", "role"), "payload.message.role"),
        (("tenant",), "tenant"),
        (("payload",), "payload"),
    ],
)
def test_a_missing_payload_field_is_missing_field_naming_it(
    drop: tuple[str, ...], where: str
) -> None:
    data = appended()
    parent = data
    for part in drop[:-1]:
        parent = parent[part]
    del parent[drop[-1]]
    with pytest.raises(DecodeError) as info:
        decode(fields(data))
    assert info.value.reason == "missing_field"
    assert info.value.detail.startswith(f"{where}:")


def test_a_terminated_workflow_without_status_is_missing_field() -> None:
    data = {
        "schema_version": 2,
        "tenant": "acme",
        "type": "workflow.terminated",
        "payload": {"workflow_id": "wf-1"},
    }
    assert reason_of(fields(data)) == "missing_field"


@pytest.mark.parametrize(
    "change",
    [
        {"tenant": "bad tenant"},
        {"tenant": ""},
        {"partitions": 0},
        {"published_at_ms": -1},
        {"event_id": ""},
        {"event_id": "e" * 201},
        {"idempotency_key": ""},
        {"unexpected": 1},
        {"payload": "not an object"},
    ],
)
def test_invalid_envelope_values_are_invalid(change: dict[str, Any]) -> None:
    assert reason_of(fields(appended(**change))) == "invalid"


@pytest.mark.parametrize(
    "message",
    [
        {"role": "robot", "content": "hi"},
        {"role": "user"},  # neither content nor tool calls
        {"role": "tool", "content": "42"},  # a tool message needs tool_call_id
        {"role": "user", "content": "hi", "extra": 1},
        {"role": "user", "content": 5},
    ],
)
def test_invalid_message_values_are_invalid(message: dict[str, Any]) -> None:
    data = appended()
    data["payload"]["message"] = message
    assert reason_of(fields(data)) == "invalid"


def test_an_invalid_resource_id_is_invalid() -> None:
    data = appended()
    data["payload"]["memory"]["resource"] = "Customer Support"
    assert reason_of(fields(data)) == "invalid"


def test_an_unknown_workflow_status_is_invalid() -> None:
    data = {
        "schema_version": 2,
        "tenant": "acme",
        "type": "workflow.terminated",
        "payload": {"workflow_id": "wf-1", "status": "exploded"},
    }
    assert reason_of(fields(data)) == "invalid"


@pytest.mark.parametrize(
    "key", ["support 123", "a/b", "caf\u00e9", "%c3%a9", "100%", "k" * 129, "support-123\n"]
)
def test_an_unsanitized_key_is_invalid_and_the_detail_tells_how_to_sanitize(key: str) -> None:
    data = appended()
    data["payload"]["memory"]["key"] = key
    with pytest.raises(DecodeError) as info:
        decode(fields(data))
    assert info.value.reason == "invalid"
    assert info.value.detail.startswith("payload.memory.key:")
    assert "SHA-256" in info.value.detail and "docs/contract.md" in info.value.detail


def test_an_oversized_event_is_oversized_counting_utf8_bytes() -> None:
    data = appended()
    data["payload"]["message"]["content"] = "\u00e9" * 600  # 600 characters, 1,200 bytes
    entry = {"event": json.dumps(data, ensure_ascii=False)}
    assert len(entry["event"]) < 1024 < len(entry["event"].encode("utf-8"))
    with pytest.raises(DecodeError) as info:
        decode(entry, max_bytes=1024)
    assert info.value.reason == "oversized"
    assert "1024-byte limit" in info.value.detail
    assert decode(entry, max_bytes=4096).event.type == "message.appended"


def test_size_is_checked_before_parsing() -> None:
    assert reason_of({"event": "x" * 2000}, max_bytes=1024) == "oversized"


def test_decode_errors_carry_the_event_id_and_tenant_when_known() -> None:
    data = appended(partitions=0)
    with pytest.raises(DecodeError) as info:
        decode(fields(data))
    assert (info.value.event_id, info.value.tenant) == ("ev-1", "acme")
    assert str(info.value).startswith("invalid: partitions:")


# The previous version.


def v1(**changes: Any) -> dict[str, Any]:
    data = appended(schema_version=1)
    del data["payload"]["memory"]
    data["payload"]["memory_id"] = "acme/customer-support/support-123"
    data.update(changes)
    return data


def test_version_1_memory_id_is_upgraded_to_a_version_2_memory_name() -> None:
    decoded = decode(fields(v1()))
    event = decoded.event
    assert isinstance(event, MessageAppended)
    assert event.schema_version == 4
    assert event.payload.memory == NAME
    assert event.ref.memory_id == "acme/customer-support/support-123"
    assert event.event_id == "ev-1"
    assert event.payload.message.content == "hi"


def test_version_1_lifecycle_events_are_upgraded_as_they_are() -> None:
    data = {
        "schema_version": 1,
        "tenant": "acme",
        "type": "workflow.terminated",
        "payload": {"workflow_id": "wf-1", "status": "completed"},
    }
    event = decode(fields(data)).event
    assert isinstance(event, WorkflowTerminated)
    assert event.schema_version == 4
    assert event.payload.status is WorkflowStatus.COMPLETED


@pytest.mark.parametrize(
    "memory_id", ["acme/customer-support", "customer-support", 42, None, ["acme", "r", "k"]]
)
def test_a_version_1_memory_id_that_is_not_three_parts_is_invalid(memory_id: Any) -> None:
    data = v1()
    data["payload"]["memory_id"] = memory_id
    with pytest.raises(DecodeError) as info:
        decode(fields(data))
    assert info.value.reason == "invalid"
    assert "tenant/resource/key" in info.value.detail


def test_a_version_1_memory_id_of_another_tenant_is_invalid() -> None:
    data = v1()
    data["payload"]["memory_id"] = "globex/customer-support/support-123"
    with pytest.raises(DecodeError) as info:
        decode(fields(data))
    assert info.value.reason == "invalid"
    assert "globex" in info.value.detail


def test_a_version_1_memory_id_with_an_unsanitized_key_is_invalid() -> None:
    data = v1()
    data["payload"]["memory_id"] = "acme/customer-support/a b/c"
    assert reason_of(fields(data)) == "invalid"


# Replay fields and round trips.


def test_replay_fields_come_through_and_the_replay_key_wins() -> None:
    data = appended(idempotency_key="own-key")
    decoded = decode(
        {"event": json.dumps(data), "replay_of": "1700000000000-0", "replay_key": "dlq:3:1-0"}
    )
    assert decoded.replay_of == "1700000000000-0"
    assert decoded.replay_key == "dlq:3:1-0"
    assert decoded.idempotency_key == "dlq:3:1-0"


def test_without_replay_fields_the_events_own_idempotency_key_is_used() -> None:
    decoded = decode(fields(appended(idempotency_key="own-key")))
    assert decoded.replay_of is None
    assert decoded.replay_key is None
    # Memories remember the SHA-1 digest of the producer's key, never the key itself.
    assert decoded.idempotency_key == hashlib.sha1(b"own-key").hexdigest()


@pytest.mark.parametrize("event", every_event(), ids=lambda e: e.type)
def test_encode_then_decode_gives_back_the_same_event(event: MemoryEvent | LifecycleEvent) -> None:
    entry = encode(event)
    assert list(entry) == ["event"]
    decoded = decode(entry)
    assert decoded.event == event
    assert type(decoded.event) is type(event)
    assert decoded.text == event_json(event)


def test_every_event_type_is_covered_by_the_round_trip() -> None:
    covered = {e.type for e in every_event()}
    assert covered == set(SCHEMA["discriminator"]["mapping"])


# The committed JSON Schema agrees with the decoder.


def test_the_committed_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("event", every_event(), ids=lambda e: e.type)
def test_encoded_events_of_every_type_validate_against_the_schema(
    event: MemoryEvent | LifecycleEvent,
) -> None:
    data = json.loads(encode(event)["event"])
    VALIDATOR.validate(data)


def test_an_event_written_by_hand_validates_against_the_schema() -> None:
    VALIDATOR.validate(appended())


@pytest.mark.parametrize("version", [2, 3])
def test_a_version_2_or_3_event_is_read_as_version_4(version: int) -> None:
    event = decode(fields(appended(schema_version=version))).event
    assert isinstance(event, MessageAppended) and event.schema_version == 4


@pytest.mark.parametrize("backup_id", ["", "latest", "1-", "-1", "1-0-0", " 1-0"])
def test_a_restore_names_its_backup_by_a_stream_id(backup_id: str) -> None:
    data = appended(
        type="memory.restored",
        payload={"memory": {"resource": "r", "key": "k"}, "backup_id": backup_id},
    )
    assert reason_of(fields(data)) == "invalid"
    assert not VALIDATOR.is_valid(data)


def _without(path: tuple[str, ...]) -> dict[str, Any]:
    data = copy.deepcopy(appended())
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    del parent[path[-1]]
    return data


def _with_memory(**memory: str) -> dict[str, Any]:
    data = appended()
    data["payload"]["memory"].update(memory)
    return data


def _with_message(**message: Any) -> dict[str, Any]:
    data = appended()
    data["payload"]["message"].update(message)
    return data


REFUSED_BY_BOTH = {
    "unknown type": appended(type="message.deleted"),
    "newer version": appended(schema_version=5),
    "unknown field": appended(unexpected=1),
    "partitions 0": appended(partitions=0),
    "empty event id": appended(event_id=""),
    "missing payload": _without(("payload",)),
    "missing message": _without(("payload", "message")),
    "missing key": _without(("payload", "memory", "key")),
    "missing tenant": _without(("tenant",)),
    "unknown role": _with_message(role="robot"),
    "content not text": _with_message(content=5),
    "message extra field": _with_message(extra=1),
    "missing type": _without(("type",)),
    "missing schema version": _without(("schema_version",)),
    "unsanitized key": _with_memory(key="support 123"),
    "key over the limit": _with_memory(key="k" * 257),
    "invalid tenant": appended(tenant="bad tenant"),
    "invalid resource id": _with_memory(resource="Customer Support"),
}


@pytest.mark.parametrize("data", list(REFUSED_BY_BOTH.values()), ids=list(REFUSED_BY_BOTH))
def test_events_the_decoder_refuses_are_refused_by_the_schema_too(data: dict[str, Any]) -> None:
    """A producer in another language that validates against events/schema.json must not
    be able to write an event that every worker then refuses or dead-letters."""
    with pytest.raises((DecodeError, NewerSchemaError)):
        decode(fields(data))
    assert not VALIDATOR.is_valid(data), "events/schema.json accepts an event the decoder refuses"


def test_an_unknown_flush_strategy_is_invalid() -> None:
    data = {
        "schema_version": 2,
        "type": "flush.requested",
        "tenant": "acme",
        "payload": {"memory": {"resource": "r", "key": "k"}, "strategy": "123-45-6789"},
    }
    assert reason_of(fields(data)) == "invalid"


def test_an_event_nested_too_deeply_is_invalid_not_a_crash() -> None:
    deep = "[" * 5000 + "]" * 5000
    text = '{"schema_version": 2, "type": "message.appended", "tenant": "acme", "x": ' + deep + "}"
    with pytest.raises(DecodeError) as info:
        decode({"event": text})
    assert info.value.reason == "invalid"


def test_the_nesting_check_is_linear_even_in_an_unterminated_string() -> None:
    import time

    from events.codec import json_depth_over

    def took(n: int) -> float:
        # More brackets than the limit, then a string that never ends.
        text = "[" * (MAX_JSON_DEPTH - 1) + '"' + "[" * 10 + '"\\' * (n // 2)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            assert not json_depth_over(text)
            best = min(best, time.perf_counter() - started)
        return best

    # Eight times the text, about eight times the time: a quadratic scan takes 64 times
    # (the margin is for a busy machine: a timing ratio, never an absolute bound).
    assert took(512_000) / took(64_000) < 24.0


@pytest.mark.parametrize(
    "data",
    [
        {"schema_version": SCHEMA_VERSION + 1},
        {"schema_version": SCHEMA_VERSION + 2, "type": [], "tenant": {}, "event_id": "e"},
        {"schema_version": SCHEMA_VERSION + 1, "type": "x", "tenant": "acme"},
    ],
)
def test_garbage_claiming_a_newer_version_is_invalid_not_held(data: dict[str, Any]) -> None:
    with pytest.raises(DecodeError) as info:
        decode({"event": json.dumps(data)})
    assert info.value.reason == "invalid"
    assert "must still have a type, a tenant and an event_id" in info.value.detail


def test_event_ids_are_random_version_4_uuids() -> None:
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for made in ids[:200]:
        parsed = uuid.UUID(hex=made)
        assert parsed.hex == made and parsed.version == 4 and parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize(
    "value",
    [2**64, -(2**63) - 1, 10**30, 1e300, -0.0, 0.1, "é", "\U0001f600", [1, [2, {"a": None}]]],
)
def test_numbers_and_text_decode_as_the_standard_parser_reads_them(value: Any) -> None:
    # The fast parser never turns a large integer into a float, or changes any value.
    data = appended()
    data["payload"]["message"]["metadata"] = {"v": value}
    decoded = decode(fields(data))
    kept = decoded.event.payload.message.metadata["v"]  # type: ignore[union-attr]
    assert kept == value and type(kept) is type(value)
    assert decoded.data == json.loads(fields(data)["event"])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"schema_version": 4, "x": "\\ud800"}', "invalid"),  # the fast parser refuses it
        ("{'a': 1}", "not_json"),
        ('{"a": 1,}', "not_json"),
        ("[1, 2", "not_json"),
    ],
)
def test_what_the_fast_parser_refuses_is_decided_as_before(text: str, reason: str) -> None:
    assert reason_of({"event": text}) == reason
