"""Privacy: redaction of every text a message carries (never its roles or ids), messages
that are never persisted, linear-time RE2 patterns, and secrets masked in log lines."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from memory import MemoryResource, Message, PrivacyPolicy, Role, load_resource_file, mask_secrets
from memory.privacy import DEFAULT_REDACTION, MASK
from processors.logs import SecretMask

ROOT = Path(__file__).resolve().parents[2]
SSN = r"\b\d{3}-\d{2}-\d{4}\b"
EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
POLICY = PrivacyPolicy(redact_patterns=[SSN, EMAIL])
R = DEFAULT_REDACTION


# --- redaction --------------------------------------------------------------------


def test_redaction_replaces_every_pattern_in_string_content() -> None:
    message = Message(role=Role.USER, content="ssn 123-45-6789, mail ann@example.com, ok 12-3")
    redacted = POLICY.redact(message)
    assert redacted.content == f"ssn {R}, mail {R}, ok 12-3"
    assert redacted.role is Role.USER
    assert message.content == "ssn 123-45-6789, mail ann@example.com, ok 12-3"


def test_redaction_reaches_the_text_of_content_parts_and_keeps_their_type() -> None:
    message = Message.model_validate(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "call me: 123-45-6789"},
                {"type": "image_url", "image_url": {"url": "https://x.test/ann@example.com"}},
                {"type": "text", "text": "nothing here"},
            ],
        }
    )
    redacted = POLICY.redact(message)
    assert isinstance(redacted.content, list)
    parts = [p.model_dump(exclude_none=True) for p in redacted.content]
    assert parts == [
        {"type": "text", "text": f"call me: {R}"},
        {"type": "image_url", "image_url": {"url": f"https://x.test/{R}"}},
        {"type": "text", "text": "nothing here"},
    ]


def test_redaction_reaches_the_name_tool_call_arguments_and_ids() -> None:
    message = Message.model_validate(
        {
            "role": "assistant",
            "name": "ann@example.com",
            "tool_calls": [
                {
                    "id": "call-123-45-6789",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"ssn": "123-45-6789"}'},
                }
            ],
        }
    )
    redacted = POLICY.redact(message)
    assert redacted.name == R
    assert redacted.tool_calls is not None
    [call] = redacted.tool_calls
    assert call.function.arguments == f'{{"ssn": "{R}"}}'
    assert call.function.name == "lookup"
    assert (call.id, call.type) == (f"call-{R}", "function")


def test_a_tool_call_id_is_redacted_the_same_way_as_the_call_it_links_to() -> None:
    call_id = "call-123-45-6789"
    message = Message(role=Role.TOOL, content="found 123-45-6789", tool_call_id=call_id)
    redacted = POLICY.redact(message)
    assert redacted.content == f"found {R}"
    assert redacted.role is Role.TOOL
    assistant = Message.model_validate(
        {
            "role": "assistant",
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    )
    [call] = POLICY.redact(assistant).tool_calls or []
    assert redacted.tool_call_id == call.id == f"call-{R}"


def test_redaction_reaches_string_metadata_values_at_any_depth() -> None:
    message = Message(
        role=Role.USER,
        content="hi",
        priority=7,
        metadata={
            "email": "ann@example.com",
            "count": 123456789,
            "flag": True,
            "nested": {"list": ["123-45-6789", 5, {"deep": "x ann@example.com"}]},
        },
    )
    redacted = POLICY.redact(message)
    assert redacted.metadata == {
        "email": R,
        "count": 123456789,
        "flag": True,
        "nested": {"list": [R, 5, {"deep": f"x {R}"}]},
    }
    assert redacted.priority == 7


def test_metadata_values_under_keys_named_id_or_type_are_redacted_too() -> None:
    """``id`` and ``type`` are structural only in a message's own fields: inside metadata
    they are user data, and a pattern there would reach Redis."""
    message = Message(
        role=Role.USER,
        content="hi",
        metadata={"customer": {"id": "123-45-6789", "type": "mail ann@example.com"}},
    )
    redacted = POLICY.redact(message)
    assert redacted.metadata == {"customer": {"id": R, "type": f"mail {R}"}}


def test_without_patterns_a_message_is_returned_as_it_is() -> None:
    message = Message(role=Role.USER, content="ssn 123-45-6789")
    assert PrivacyPolicy().redact(message) is message
    assert not PrivacyPolicy().active


def test_the_redaction_string_defaults_and_can_be_chosen() -> None:
    assert PrivacyPolicy().default_redaction_string == "[REDACTED]" == DEFAULT_REDACTION
    policy = PrivacyPolicy(redact_patterns=[SSN], default_redaction_string="<gone>")
    assert policy.redact_text("a 123-45-6789 b 987-65-4321") == "a <gone> b <gone>"


def test_patterns_apply_in_order_to_the_result_of_the_previous_one() -> None:
    policy = PrivacyPolicy(redact_patterns=["secret", r"\[X\]"], default_redaction_string="[X]")
    assert policy.redact_text("a secret") == "a [X]"
    policy = PrivacyPolicy(redact_patterns=["abc", "xx"], default_redaction_string="x")
    assert policy.redact_text("abcx") == "x"


def test_the_shipped_privacy_heavy_resource_redacts_its_identifiers() -> None:
    resource = load_resource_file(ROOT / "memories" / "patient-intake.yaml")
    assert isinstance(resource, MemoryResource)
    policy = resource.privacy_policy
    text = "ssn 123-45-6789 tel +1 (555) 010-9999 mail a.b@clinic.org passport AB1234567"
    gone = "[REMOVED]"
    assert policy.redact_text(text) == f"ssn {gone} tel {gone} mail {gone} passport {gone}"


# --- persistence ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "persists"),
    [
        (Message(role=Role.SYSTEM, content="prompt"), False),
        (Message(role=Role.TOOL, content="out", tool_call_id="c1"), False),
        (Message(role=Role.USER, content="hi"), True),
        (Message(role=Role.ASSISTANT, content="hi"), True),
        (Message(role=Role.USER, content="x", metadata={"type": "diagnostic"}), False),
        (Message(role=Role.USER, content="x", metadata={"type": "chat"}), True),
        (Message(role=Role.USER, content="x", metadata={"type": ["diagnostic"]}), True),
        (Message(role=Role.USER, content="x", metadata={"kind": "diagnostic"}), True),
        (Message(role=Role.USER, content="x", metadata={"type": "Diagnostic"}), True),
    ],
)
def test_persists_is_false_by_role_or_by_metadata_type(message: Message, persists: bool) -> None:
    policy = PrivacyPolicy(non_persistable_message_types=["system", "tool", "diagnostic"])
    assert policy.active
    assert policy.persists(message) is persists


def test_every_message_persists_without_non_persistable_types() -> None:
    assert PrivacyPolicy().persists(Message(role=Role.SYSTEM, content="x"))


# --- linear time ------------------------------------------------------------------


def test_a_catastrophic_pattern_runs_in_linear_time() -> None:
    """``(a+)+$`` on ``aaa...b`` backtracks exponentially with Python's re (30 characters
    take minutes); RE2 answers at once."""
    policy = PrivacyPolicy(redact_patterns=["(a+)+$"])
    text = "a" * 100_000 + "b"
    started = time.perf_counter()
    assert policy.redact_text(text) == text
    assert time.perf_counter() - started < 2.0
    assert policy.redact_text("x" + "a" * 100_000) == "x" + R


def test_a_nested_quantifier_on_a_long_message_redacts_in_linear_time() -> None:
    policy = PrivacyPolicy(redact_patterns=[r"(\w+\s?)*!"])
    message = Message(role=Role.USER, content="word " * 20_000 + "?")
    started = time.perf_counter()
    assert policy.redact(message).content == message.content
    assert time.perf_counter() - started < 2.0


# --- secrets in logs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ('{"api_key": "sk-live-123", "user": "bob"}', f'{{"api_key": {MASK}, "user": "bob"}}'),
        ("{'password': 'hunter2', 'user': 'bob'}", f"{{'password': {MASK}, 'user': 'bob'}}"),
        ("api_key=sk-live-123 user=bob", f"api_key={MASK} user=bob"),
        ("connect password=hunter2, retry=3", f"connect password={MASK}, retry=3"),
        ("token=abc.def", f"token={MASK}"),
        ('{"access_token":"a\\"b", "n": 1}', f'{{"access_token":{MASK}, "n": 1}}'),
        ("Authorization: Bearer abc.def", f"Authorization: {MASK}"),
        ("headers {'authorization': 'Basic dXNlcg=='}", f"headers {{'authorization': {MASK}}}"),
        ("client_secret=xyz; next=1", f"client_secret={MASK}; next=1"),
        ("X-API-KEY: K1, other: 2", f"X-API-KEY: {MASK}, other: 2"),
        ("secret: s3cr3t", f"secret: {MASK}"),
    ],
)
def test_values_of_secret_looking_keys_are_masked(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "tokens counted: 5",
        "the token was fine",
        "passwords are nice",
        "user=bob id=42",
        '{"user": "bob", "n": 3}',
        "appended 3 messages to acme/customer-support/support-42",
    ],
)
def test_other_text_is_left_alone(text: str) -> None:
    assert mask_secrets(text) == text


@pytest.mark.parametrize(
    "text", ["max_tokens=4000", '{"tokens": 5, "user": "bob"}', "total_tokens=812 over budget"]
)
def test_token_counts_are_not_secrets(text: str) -> None:
    """A token-budgeted memory logs its counts; only token values (``token=``,
    ``access_token``) are secrets."""
    assert mask_secrets(text) == text


@pytest.fixture
def masked_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(SecretMask())
    logger = logging.getLogger("tests.unit.test_privacy.masked")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def test_the_log_filter_masks_a_secret_passed_as_a_percent_argument(
    masked_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = masked_log
    logger.warning("calling %s with api_key=%s", "openai", "sk-live-123")
    logger.info("metadata %s", {"password": "hunter2", "user": "bob"})
    assert stream.getvalue().splitlines() == [
        f"WARNING calling openai with api_key={MASK}",
        f"INFO metadata {{'password': {MASK}, 'user': 'bob'}}",
    ]
    assert "sk-live-123" not in stream.getvalue()
    assert "hunter2" not in stream.getvalue()


def test_the_log_filter_leaves_other_lines_and_their_arguments_alone(
    masked_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = masked_log
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    keep.addFilter(SecretMask())
    logger.addHandler(keep)
    try:
        logger.info("applied %d messages to %s", 3, "acme/customer-support/k")
    finally:
        logger.removeHandler(keep)
    assert stream.getvalue() == "INFO applied 3 messages to acme/customer-support/k\n"
    assert records[0].args == (3, "acme/customer-support/k")


def test_words_that_merely_start_like_auth_are_not_masked() -> None:
    assert mask_secrets("author: bob, authority=high") == "author: bob, authority=high"
    assert mask_secrets("auth=xyz") == "auth=***"


def test_metadata_keys_and_numbers_are_redacted_too() -> None:
    policy = PrivacyPolicy(redact_patterns=[r"\b\d{3}-\d{2}-\d{4}\b", r"\b\d{16}\b"])
    message = Message(
        role=Role.USER,
        content="hi",
        metadata={"123-45-6789": "x", "card": 4111111111111111, "count": 3},
    )
    metadata = policy.redact(message).metadata
    assert "123-45-6789" not in json.dumps(metadata)
    assert metadata["card"] == "[REDACTED]" and metadata["count"] == 3
    [renamed] = [k for k in metadata if k.startswith("[REDACTED]#")]
    assert metadata[renamed] == "x"


def test_the_redaction_string_is_taken_literally() -> None:
    policy = PrivacyPolicy(
        redact_patterns=[r"\d{3}-\d{2}-\d{4}"], default_redaction_string=r"\g<0>"
    )
    assert policy.redact_text("ssn 123-45-6789") == r"ssn \g<0>"


def test_an_empty_redaction_string_is_refused() -> None:
    with pytest.raises(ValidationError):
        PrivacyPolicy(redact_patterns=["x"], default_redaction_string="")


def test_a_traceback_is_masked_too() -> None:
    from processors.logs import TextFormatter

    formatter = TextFormatter("%(message)s")
    try:
        raise ValueError("bad config password=hunter2")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, "f", 1, "failed", None, sys.exc_info())
    text = formatter.format(record)
    assert "hunter2" not in text and "password=***" in text


PHONE = r"\d{10,}"


def test_a_dead_letter_keeps_the_envelope_numbers_and_made_ids_and_redacts_the_rest() -> None:
    policy = PrivacyPolicy(redact_patterns=[PHONE, SSN, EMAIL])
    event = {
        "schema_version": 3,
        "type": "message.appended",
        "event_id": "0123456789abcdef0123456789abcdef",
        "tenant": "acme",
        "published_at_ms": 1796661865194,
        "partitions": 16,
        "idempotency_key": "call 5551234567",
        "payload": {
            "memory": {"resource": "patient-intake", "key": "k"},
            "workflow_id": "intake-joe@example.com",
            "message": {"role": "user", "content": "SSN 123-45-6789, phone 5551234567"},
        },
    }
    kept = json.loads(policy.redact_event(json.dumps(event)))
    for field in ("schema_version", "type", "event_id", "tenant", "published_at_ms", "partitions"):
        assert kept[field] == event[field]
    assert kept["idempotency_key"] == f"call {R}"
    assert kept["payload"]["workflow_id"] == R
    assert kept["payload"]["message"]["content"] == f"SSN {R}, phone {R}"


def test_an_event_id_made_by_the_producer_is_redacted_like_its_other_text() -> None:
    event = {"type": "message.appended", "event_id": "joe@example.com", "payload": {}}
    assert json.loads(POLICY.redact_event(json.dumps(event)))["event_id"] == R


@pytest.mark.parametrize(
    "message",
    [
        {"role": ["user"], "content": "123-45-6789"},
        {"role": {"a": 1}, "content": "123-45-6789"},
        {"role": None, "metadata": [1, 2], "content": "123-45-6789"},
        {"role": "user", "metadata": {"type": ["x"]}, "content": "123-45-6789"},
    ],
)
def test_a_dead_letter_of_any_json_is_redacted_and_never_raises(message: object) -> None:
    policy = PrivacyPolicy(redact_patterns=[SSN], non_persistable_message_types=["system"])
    event = {"type": "message.appended", "payload": {"message": message, "messages": [message]}}
    kept = policy.redact_event(json.dumps(event))
    assert "123-45-6789" not in kept
    assert R in kept


def test_a_dead_letter_nested_past_any_parser_is_redacted_as_text() -> None:
    text = '{"payload": ' + "[" * 5000 + '"123-45-6789"' + "]" * 5000 + "}"
    kept = POLICY.redact_event(text)
    assert "123-45-6789" not in kept and R in kept
