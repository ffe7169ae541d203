"""Partition leases with fencing (DESIGN rule 1).

A lease's value is ``<fence>:<worker>:<nonce>``; the fence comes from ``fence:{p}``,
incremented on every acquisition and never expiring. Every fenced script compares the
whole value, so a holder whose lease expired (a paused process, say) can change
nothing, even if it never noticed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from store.errors import PartitionCountChangedError
from store.keys import Keys
from store.scripts import Scripts


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease: what fenced scripts compare."""

    partition: int
    group: str
    value: str

    @property
    def fence(self) -> int:
        return int(self.value.split(":", 1)[0])


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds a lease, as read by status."""

    value: str
    ttl_ms: int

    @property
    def fence(self) -> int:
        return int(self.value.split(":", 1)[0])

    @property
    def worker(self) -> str:
        """The worker id (it may contain ':'; the fence and the hex nonce never do)."""
        return self.value.split(":", 1)[1].rsplit(":", 1)[0]


class Leases:
    """Acquire, refresh and release the leases of one group's partitions."""

    def __init__(
        self, scripts: Scripts, keys: Keys, group: str, ttl_ms: int, *, partitions: int = 0
    ) -> None:
        """``partitions``: the count the caller routes with; a lease of a partition that
        belongs to another count (``memstream repartition`` ran or runs) is refused with
        PartitionCountChangedError. 0: not checked (a topic of one partition)."""
        if ttl_ms < 1000:
            raise ValueError(f"lease TTL must be at least 1000 ms, got {ttl_ms}")
        self._scripts = scripts
        self._keys = keys
        self.group = group
        self.ttl_ms = ttl_ms
        self._nonces: dict[int, str] = {}
        self.partitions = partitions

    async def acquire(self, partition: int, worker: str) -> Lease | None:
        """The lease, or None while another worker holds it.

        The nonce of an attempt whose reply was lost is used again, so the retried call is
        recognised as the same acquisition instead of leaving an orphan lease behind."""
        nonce = self._nonces.setdefault(partition, secrets.token_hex(8))
        reply = await self._scripts(
            "acquire_lease",
            [
                self._keys.lease(partition, self.group),
                self._keys.fence(partition, self.group),
                self._keys.partition_count(partition),
            ],
            [worker, nonce, self.ttl_ms, self.partitions],
        )
        self._nonces.pop(partition, None)
        if int(reply[0]) == 1:
            return Lease(partition, self.group, str(reply[1]))
        if int(reply[0]) == 2:
            raise PartitionCountChangedError(partition, self.partitions, str(reply[1]))
        return None

    async def refresh(self, lease: Lease) -> bool:
        """Extend the lease; False if it was lost (expired or taken)."""
        reply = await self._scripts(
            "refresh_lease",
            [self._keys.lease(lease.partition, self.group)],
            [lease.value, self.ttl_ms],
        )
        return int(reply) == 1

    async def release_lost(self, lease: Lease) -> bool:
        """After giving a partition up because Redis could not be reached (its loop has
        stopped, nothing in flight): record the handover as clean, so the next holder
        charges no attempt, unless another worker acquired the partition meanwhile."""
        keys = [
            self._keys.lease(lease.partition, self.group),
            self._keys.released(lease.partition, self.group),
            self._keys.fence(lease.partition, self.group),
        ]
        return int(await self._scripts("release_lost", keys, [lease.value])) == 1

    async def release(self, lease: Lease) -> bool:
        """Give the lease up; False if it was not held any more."""
        keys = [
            self._keys.lease(lease.partition, self.group),
            self._keys.released(lease.partition, self.group),
        ]
        reply = await self._scripts("release_lease", keys, [lease.value])
        return int(reply) == 1
