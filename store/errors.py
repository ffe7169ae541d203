"""Errors of the store package."""

from __future__ import annotations


class StoreError(Exception):
    """Root of the store package's errors."""


class ConnectionSetupError(StoreError):
    """A Redis URL or embedded server that cannot be used; the message says what to do."""


class LeaseLostError(StoreError):
    """A fenced step was refused: the caller no longer holds the partition's lease."""

    def __init__(self, partition: int, group: str) -> None:
        super().__init__(
            f"lease on partition {partition} for {group} is no longer held by this worker; "
            f"its step was refused and changed nothing"
        )
        self.partition = partition
        self.group = group


class ScriptKeyError(StoreError):
    """A Lua script touched a key it did not declare (raised in strict-key mode)."""


class GenerationChangedError(StoreError):
    """A page of a paginated read belongs to another generation than the first page
    (the memory was cleared, replaced or deleted in between): start over."""

    def __init__(self, memory_id: str, expected: int, found: int) -> None:
        super().__init__(
            f"{memory_id} is at generation {found}, not {expected}: it was cleared, "
            f"replaced or deleted since the first page; read it again from the start"
        )
        self.expected = expected
        self.found = found


class NotConfiguredError(StoreError):
    """Redis holds no memstream configuration yet (no partition count)."""


class WaitTimeoutError(StoreError):
    """An entry's outcome was not known within the wait; it may still be applied later."""

    def __init__(self, message: str, *, partition: int, entry_id: str) -> None:
        super().__init__(message)
        self.partition = partition
        self.entry_id = entry_id


class OutcomeMismatchError(StoreError):
    """The outcome under an entry id belongs to another event: the publish was lost."""

    def __init__(self, message: str, *, partition: int, entry_id: str) -> None:
        super().__init__(message)
        self.partition = partition
        self.entry_id = entry_id
