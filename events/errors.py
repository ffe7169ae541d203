"""Errors of the events package."""

from __future__ import annotations

from typing import Any

from redis.exceptions import OutOfMemoryError

#: How Redis words a refusal for lack of memory: "OOM command not allowed when used
#: memory > 'maxmemory'." (Redis 7 drops the "OOM" code inside a script).
_OOM_TEXT = "used memory > 'maxmemory'"


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


class RedisOutOfMemoryError(RedisUnavailableError):
    """Redis refused the events for lack of memory (``maxmemory`` reached under the
    ``noeviction`` policy): nothing was published. Publish again (with the same
    idempotency keys) once memory is freed or ``maxmemory`` is raised."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "Redis is out of memory (used memory is over its maxmemory) and refused the "
            "events: nothing was published; publish them again once the processors have "
            "caught up and trimmed their streams or maxmemory is raised "
            f"(Redis said: {detail.strip()})"
        )
        self.detail = detail


def is_out_of_memory(error: BaseException | str) -> bool:
    """Is ``error`` (an exception, or a reply's text) Redis refusing a write because it
    is out of memory? True also for the refusal of a write inside a script."""
    if isinstance(error, OutOfMemoryError):
        return True
    text = str(error)
    return _OOM_TEXT in text or text.startswith("OOM ") or "-OOM " in text


class PartitionsChangingError(RedisUnavailableError):
    """``memstream repartition`` is changing the partition count: nothing was published.
    Publish again once it has finished (a publisher reads the new count by itself)."""


class PublishOutcomeUnknownError(PublishError):
    """The publish may or may not have reached Redis. Publish again with the same
    idempotency key: it is applied at most once."""

    def __init__(self, message: str, *, idempotency_keys: list[str]) -> None:
        super().__init__(message)
        self.idempotency_keys = idempotency_keys


class PartiallyPublishedError(PublishError):
    """Some events of a batch were published and others were not: Redis refused them
    (out of memory, a full stream, a read-only replica, ...), or a Redis Cluster node
    could not be reached (its breaker open: not sent; no reply: outcome unknown). Each
    of ``failed`` is ``(index in the batch, why)``; publish those again with the same
    idempotency keys (each is applied at most once)."""

    def __init__(
        self,
        message: str,
        *,
        published: list[Any],
        failed: list[tuple[int, str]],
        unconfirmed: list[Any] | None = None,
        transient: bool = False,
    ) -> None:
        """``unconfirmed``: of ``published``, those a durable publisher could not confirm
        on its replicas (publish them again with the same idempotency keys too).
        ``transient``: every failed event failed because Redis (a Cluster node) could not
        be reached, none because Redis refused it: publishing them again later works."""
        super().__init__(message)
        self.published = published
        self.failed = failed
        self.unconfirmed = unconfirmed or []
        self.transient = transient


class BacklogFullError(PublishError):
    """A stream already holds more than the backlog bound (its consumers are behind or
    stopped): nothing was published to it. Retry later (the SDK can wait:
    ``Publisher(backlog_wait=...)``)."""

    def __init__(self, message: str, *, partition: int, held: int) -> None:
        super().__init__(message)
        self.partition = partition
        self.held = held


class NotDurableError(PublishError):
    """A durable publish (``Publisher(durable=N)``) whose events ARE published on the
    master but were not confirmed by N replicas within the timeout: a failover now could
    lose them. Publishing them again with the same idempotency keys is safe (each is
    applied at most once) and waits for the replicas again."""

    def __init__(
        self,
        message: str,
        *,
        published: list[Any],
        unconfirmed: list[Any],
        replicas: int,
        required: int,
    ) -> None:
        super().__init__(message)
        self.published = published
        self.unconfirmed = unconfirmed
        self.replicas = replicas
        self.required = required


class ReadOnlyError(PublishError):
    """A write to a memory the agent may only read."""
