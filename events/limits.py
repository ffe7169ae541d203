"""Size limits of what producers send, enforced by the SDK before publishing and by the
appender on what reaches it (a producer in another language may not check them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from events.codec import DEFAULT_MAX_EVENT_BYTES
from memory import Message

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
DEFAULT_MAX_MESSAGES = 1000
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BACKLOG = 100_000


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """``max_event_bytes``: one event's JSON; ``max_message_bytes``: one message's JSON;
    ``max_messages``: messages of one event (a replace) and events of one publish call;
    ``max_request_bytes``: all events of one publish call; ``max_backlog``: entries an
    ingest (or the lifecycle) stream may hold before publishing to it is refused with
    BacklogFullError (0: no bound)."""

    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_backlog: int = DEFAULT_MAX_BACKLOG

    def __post_init__(self) -> None:
        if self.max_backlog < 0:
            raise ValueError("max_backlog must be 0 (no bound) or more")
        for name in ("max_event_bytes", "max_message_bytes", "max_messages", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def message_problem(
        self, messages: Sequence[Message], *, event_chars: int | None = None
    ) -> str | None:
        """Why these messages (of one event) are over a limit, or None. With
        ``event_chars``, the length of the event's JSON text: an event whose text cannot
        hold a message over the limit (4 bytes at most a character) is not measured."""
        if len(messages) > self.max_messages:
            return (
                f"{len(messages)} messages, over the limit of {self.max_messages} per event "
                f"(MEMSTREAM_MAX_MESSAGES); split the replace into a replace and appends"
            )
        if event_chars is not None and 4 * event_chars <= self.max_message_bytes:
            return None
        for i, message in enumerate(messages):
            size = len(message.model_dump_json(exclude_none=True).encode("utf-8"))
            if size > self.max_message_bytes:
                return (
                    f"message {i} is {size} bytes, over the {self.max_message_bytes}-byte "
                    f"limit of one message (MEMSTREAM_MAX_MESSAGE_BYTES)"
                )
        return None
