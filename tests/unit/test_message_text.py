"""The stored text of a message: written from the message as sent when that is exact,
else from the model; either way what a reader gets back is the model's message."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from memory import Message
from processors.appender import message_text

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELD = st.sampled_from(
    ["role", "content", "name", "tool_call_id", "metadata", "priority", "tool_calls"]
)
VALUES = (
    st.sampled_from(["user", "assistant", "system", "tool"])
    | JSON
    | st.sampled_from([{"type": "note"}, [{"type": "text", "text": "hi"}], "5", True, 2**70])
)


def stored(message: Message, sent: dict[str, Any] | None) -> Any:
    return json.loads(message_text(message, workflow_id="wf-1", agent_id=None, sent=sent))


@settings(max_examples=3000, deadline=None)
@given(st.dictionaries(FIELD, VALUES, min_size=1, max_size=7))
def test_a_message_stored_as_sent_reads_back_as_the_model_writes_it(sent: dict[str, Any]) -> None:
    try:
        message = Message.model_validate(sent)
    except ValidationError:
        return
    assert stored(message, sent) == stored(message, None)


@pytest.mark.parametrize(
    "sent",
    [
        {"role": "user", "content": "hi", "priority": "5"},  # coerced by validation
        {"role": "user", "content": "hi", "priority": True},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": "hi", "metadata": {"n": 2**70}},
    ],
)
def test_a_message_validation_changes_or_orjson_cannot_write_is_written_from_the_model(
    sent: dict[str, Any],
) -> None:
    message = Message.model_validate(sent)
    assert message_text(message, workflow_id=None, agent_id=None, sent=sent) == (
        message_text(message, workflow_id=None, agent_id=None)
    )


def test_an_sdk_message_is_stored_byte_for_byte_as_the_model_writes_it() -> None:
    message = Message(role="user", content="héllo", metadata={"k": [1, 2.5, None]}, priority=3)
    sent = json.loads(message.model_dump_json())
    kept = message_text(message, workflow_id="wf", agent_id="a", sent=sent)
    assert kept == message_text(message, workflow_id="wf", agent_id="a")
