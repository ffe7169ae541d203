"""The Redis Streams side of the partitioned runtime: fenced reads, claims, attempts,
settlements, retention and waiting for data (DESIGN rules 2, 3, 5 and 8)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from store.connection import RedisClient
from store.errors import LeaseLostError
from store.keys import GROUP_TOPIC, SINGLE_PARTITION_TOPICS, TOPIC_GROUPS, Group, Keys, Topic
from store.lease import Lease
from store.scripts import Scripts

CLAIM_PAGE = 1000
DEFAULT_READ_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class StreamEntry:
    """One delivered entry; ``fields`` is None when the entry is gone from the stream
    (one per entry on the hot path: not frozen, see ``store.Target``)."""

    id: str
    fields: dict[str, str] | None
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Delivery:
    source: str  # 'pending' (redelivered to this consumer) or 'new'
    entries: list[StreamEntry]
    tail: str  # the stream's last id when read, to wait for more after it
    more: bool = False  # the byte budget cut the read short: more entries are waiting


@dataclass(frozen=True, slots=True)
class Claim:
    claimed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    removed_consumers: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Settle:
    """An entry to acknowledge with an outcome; with ``letter``, dead-lettered first.
    ``tenant`` is recorded with the outcome when its detail names the tenant's data (a
    workflow id), so that erasing the tenant finds it."""

    id: str
    status: str
    reason: str | None = None
    detail: str | None = None
    letter: dict[str, str] | None = None
    tenant: str | None = None


def _fields(flat: Sequence[str] | None) -> dict[str, str] | None:
    if not flat:
        return None
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


async def ensure_groups(
    scripts: Scripts, keys: Keys, partition: int, topics: Sequence[Topic] | None = None
) -> int:
    """Create the consumer groups of a partition's topics (all, or ``topics``: a
    producer creates those of the streams it writes) at id 0; returns how many (the
    lifecycle stream has partition 0 only)."""
    streams: list[str] = []
    groups: list[str] = []
    for topic, topic_groups in TOPIC_GROUPS.items():
        if partition and topic in SINGLE_PARTITION_TOPICS:
            continue
        if topics is not None and topic not in topics:
            continue
        for group in topic_groups:
            streams.append(keys.topic(topic, partition))
            groups.append(group.value)
    return int(await scripts("create_groups", streams, groups))


class PartitionStreams:
    """One group's view of the partitioned stream it consumes."""

    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys, group: Group) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self.group = group
        self.topic: Topic = GROUP_TOPIC[group]

    @property
    def client(self) -> RedisClient:
        return self._client

    def stream(self, partition: int) -> str:
        return self._keys.topic(self.topic, partition)

    def _fenced(self, lease: Lease) -> tuple[str, str]:
        return (
            self._keys.lease(lease.partition, self.group),
            self._keys.attempts(lease.partition, self.group),
        )

    async def read(
        self,
        lease: Lease,
        consumer: str,
        count: int,
        max_bytes: int = DEFAULT_READ_BYTES,
        skip: Sequence[str] = (),
    ) -> Delivery:
        """Entries pending for ``consumer`` first (but those in ``skip``, which the
        processor is still working on), else new ones (fenced), up to ``count`` entries
        or about ``max_bytes`` of entry data."""
        lease_key, attempts = self._fenced(lease)
        reply = await self._scripts(
            "read_entries",
            [lease_key, self.stream(lease.partition), attempts],
            [lease.value, self.group.value, consumer, count, max_bytes, *skip],
        )
        if reply[0] == "stale":
            raise LeaseLostError(lease.partition, self.group.value)
        _, source, raw_entries, counted, tail, more = reply
        entries = [
            StreamEntry(str(raw[0]), _fields(raw[1]), int(counted[i] or 0))
            for i, raw in enumerate(raw_entries)
        ]
        return Delivery(str(source), entries, str(tail), bool(int(more)))

    async def claim_all(self, lease: Lease, consumer: str, page: int = CLAIM_PAGE) -> Claim:
        """Claim every pending entry of the partition from any consumer (takeover); the
        lowest pending entry counts one attempt unless the previous holder released the
        partition cleanly or the partition is held at that entry."""
        lease_key, attempts = self._fenced(lease)
        cursor = "0-0"
        claimed: list[str] = []
        gone: list[str] = []
        while True:
            held = self._keys.held(lease.partition, self.group)
            released = self._keys.released(lease.partition, self.group)
            reply = await self._scripts(
                "claim_pending",
                [lease_key, self.stream(lease.partition), attempts, held, released],
                [lease.value, self.group.value, consumer, cursor, page],
            )
            if reply[0] == "stale":
                raise LeaseLostError(lease.partition, self.group.value)
            _, cursor, page_claimed, page_gone, removed = reply
            claimed.extend(page_claimed)
            gone.extend(page_gone)
            if cursor == "0-0":
                return Claim(claimed, gone, list(removed))

    async def count_attempt(self, lease: Lease, entry_id: str) -> int:
        lease_key, attempts = self._fenced(lease)
        reply = await self._scripts("count_attempt", [lease_key, attempts], [lease.value, entry_id])
        if reply[0] == "stale":
            raise LeaseLostError(lease.partition, self.group.value)
        return int(reply[1])

    async def settle(
        self, lease: Lease, settles: Sequence[Settle], outcome_ttl_ms: int
    ) -> list[str | None]:
        """Acknowledge entries with outcomes (dead-lettering those with a letter)."""
        if not settles:
            return []
        lease_key, attempts = self._fenced(lease)
        buckets: list[str] = []
        payload = []
        for s in settles:
            bucket = self._keys.outcomes(lease.partition, s.id, self.group.value)
            if bucket not in buckets:
                buckets.append(bucket)
            item: dict[str, object] = {
                "id": s.id,
                "o": buckets.index(bucket) + 1,
                "status": s.status,
            }
            if s.reason:
                item["reason"] = s.reason
            if s.detail:
                item["detail"] = s.detail
            if s.tenant:
                item["tenant"] = s.tenant
            if s.letter is not None:
                item["letter"] = [x for kv in s.letter.items() for x in kv]
            payload.append(item)
        reply = await self._scripts(
            "settle_entries",
            [
                lease_key,
                self.stream(lease.partition),
                attempts,
                self._keys.dlq(lease.partition),
                *buckets,
            ],
            [lease.value, self.group.value, outcome_ttl_ms, json.dumps(payload)],
        )
        if reply[0] == "stale":
            raise LeaseLostError(lease.partition, self.group.value)
        return [str(x) if x else None for x in reply[1]]

    async def trim(self, partition: int, *, exact: bool = False) -> int | None:
        """Trim acknowledged entries; None when a group is missing (nothing trimmed)."""
        return await trim_stream(self._scripts, self.stream(partition), self.topic, exact=exact)

    async def lag(self, partition: int, cap: int = 10_000) -> int | None:
        """Entries of the partition's stream not yet delivered to the group (Redis 7
        keeps the figure; on 6.2 they are counted, up to ``cap``); None without the
        group."""
        stream = self.stream(partition)
        try:
            infos = await self._client.execute_command("XINFO", "GROUPS", stream)
        except ResponseError:
            return None
        for info in infos:
            group = info if isinstance(info, dict) else _fields([str(x) for x in info]) or {}
            if group.get("name") == self.group.value:
                return await group_lag(self._client, stream, group, cap)
        return None

    async def wait(self, partition: int, after: str, block_ms: int) -> bool:
        """Block until the stream has an entry after ``after`` (delivers nothing)."""
        reply = await self._client.xread({self.stream(partition): after}, count=1, block=block_ms)
        return bool(reply)


async def group_lag(
    client: RedisClient, stream: str, group: Mapping[str, Any], cap: int = 10_000
) -> int:
    """A group's undelivered entries, from its XINFO GROUPS record: Redis 7 keeps the
    figure; on 6.2 they are counted, up to ``cap``."""
    if group.get("lag") not in (None, "None"):
        return int(group["lag"])
    last = str(group.get("last-delivered-id", "0-0"))
    start = f"({last}" if last != "0-0" else "-"
    return len(await client.xrange(stream, min=start, count=cap) or [])


async def trim_stream(
    scripts: Scripts, stream: str, topic: Topic, *, exact: bool = False
) -> int | None:
    groups = [g.value for g in TOPIC_GROUPS[topic]]
    reply = await scripts("trim_stream", [stream], ["=" if exact else "~", *groups])
    if reply[0] == "trimmed":
        return int(reply[1])
    return None
