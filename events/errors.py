"""Errors of the events package."""

from __future__ import annotations

from typing import Any


class EventError(Exception):
    """Root of the events package's errors."""


class DecodeError(EventError):
    """An entry that is not a valid event: dead-lettered with ``reason``."""

    def __init__(self, reason: str, detail: str, *, event_id: str = "", tenant: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.event_id = event_id
        self.tenant = tenant


class NewerSchemaError(EventError):
    """An event of a schema version newer than this code: its partition waits for an
    upgrade of the consumers (it is never dead-lettered)."""

    def __init__(self, version: int, supported: int) -> None:
        super().__init__(
            f"event schema version {version} is newer than this worker's {supported}: "
            f"upgrade the consumers first, then the producers; the partition waits"
        )
        self.version = version
        self.supported = supported


class PublishError(EventError):
    """An event that was not published."""


class RedisUnavailableError(PublishError):
    """Redis could not be reached: the event was not published."""


class PublishOutcomeUnknownError(PublishError):
    """The publish may or may not have reached Redis. Publish again with the same
    idempotency key: it is applied at most once."""

    def __init__(self, message: str, *, idempotency_keys: list[str]) -> None:
        super().__init__(message)
        self.idempotency_keys = idempotency_keys


class PartiallyPublishedError(PublishError):
    """Redis refused some events of a batch (out of memory, read-only replica, ...) and
    accepted the others."""

    def __init__(
        self, message: str, *, published: list[Any], failed: list[tuple[int, str]]
    ) -> None:
        super().__init__(message)
        self.published = published
        self.failed = failed


class BacklogFullError(PublishError):
    """A stream already holds more than the backlog bound (its consumers are behind or
    stopped): nothing was published to it. Retry later (the SDK can wait:
    ``Publisher(backlog_wait=...)``)."""

    def __init__(self, message: str, *, partition: int, held: int) -> None:
        super().__init__(message)
        self.partition = partition
        self.held = held


class ReadOnlyError(PublishError):
    """A write to a memory the agent may only read."""
