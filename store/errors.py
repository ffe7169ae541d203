"""Errors of the store package."""

from __future__ import annotations

from collections.abc import Sequence


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


class PartitionCountChangedError(StoreError):
    """A partition belongs to another partition count than the caller's: the count was
    changed (or is being changed) by ``memstream repartition``. Start the process again
    once the change has finished."""

    def __init__(self, partition: int, mine: int, belongs: str) -> None:
        now = (
            "is being changed"
            if belongs == "moving"
            else f"is now {belongs}, not the {mine} this process read when it started"
        )
        super().__init__(
            f"partition {partition}: the partition count {now}; start the process again "
            f"once `memstream repartition` has finished"
        )
        self.partition = partition
        self.mine = mine
        self.belongs = belongs


class RepartitionError(StoreError):
    """Root of the errors of a repartition."""


class RepartitionRefusedError(RepartitionError):
    """A precondition does not hold; ``problems`` says what is wrong and what to do."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("the partition count cannot change now:\n  " + "\n  ".join(self.problems))


class RepartitionInProgressError(RepartitionError):
    """The partition count is changing (or changed since this process read it)."""
