"""Telling transient failures from an entry's fault, and backing off between tries."""

from __future__ import annotations

import random

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

#: Refusals of Redis itself (memory, replication, cluster state, loading, permissions):
#: they say nothing about the entry and must never count as its attempts (DESIGN rule
#: 5). Redis 7 drops the error code from a refusal inside a script, so the texts are
#: matched too.
_TRANSIENT_CLASSES = (
    OutOfMemoryError,
    ReadOnlyError,
    BusyLoadingError,
    NoPermissionError,
    AuthenticationError,
)
_TRANSIENT_TEXTS = (
    "OOM",
    "used memory",
    "NOREPLICAS",
    "MISCONF",
    "READONLY",
    "read only replica",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "LOADING",
    "NOSCRIPT",
    "NOPERM",
    "NOAUTH",
    "WRONGPASS",
    "MOVED",
    "ASK ",
    "CROSSSLOT",
)


def is_entry_fault(error: ResponseError) -> bool:
    """A script failed in a way the same input would fail again (a Lua error), rather
    than being refused by Redis for a reason of its own."""
    if isinstance(error, _TRANSIENT_CLASSES):
        return False
    text = str(error)
    if any(marker in text for marker in _TRANSIENT_TEXTS):
        return False
    return "user_script" in text or "Error running script" in text


class Backoff:
    """Exponential backoff with full jitter, capped (and safe however long it runs)."""

    def __init__(self, base: float = 0.05, cap: float = 2.0, tries: int = 0) -> None:
        self.base, self.cap, self.tries = base, cap, tries

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** min(self.tries, 32))
        self.tries += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.tries = 0


def id_order(entry_id: str) -> tuple[int, int]:
    """A stream id as something that sorts like it."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
