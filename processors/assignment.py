"""Which worker should own which partition: rendezvous (highest random weight) hashing
over the live members, so a worker joining or leaving moves only its share."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def weight(worker: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{worker}/{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(partition: int, members: Sequence[str]) -> str | None:
    if not members:
        return None
    return max(members, key=lambda w: (weight(w, partition), w))


def assigned(worker: str, members: Iterable[str], partitions: int) -> set[int]:
    """The partitions ``worker`` should own among ``members``."""
    live = sorted(set(members) | {worker})
    return {p for p in range(partitions) if owner(p, live) == worker}
