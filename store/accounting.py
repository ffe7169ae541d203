"""The accountant's side of the store: messages to count, and counts applied by one
fenced script (``apply_counts.lua``) that also trips flush thresholds and acknowledges."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from memory import StoredMessage
from store.connection import RedisClient
from store.errors import LeaseLostError
from store.keys import Group, Keys
from store.lease import Lease
from store.scripts import Scripts


@dataclass(slots=True)
class MemoryCounts:
    """Token counts for messages of one memory generation, and its budget."""

    memory_id: str
    gen: int
    counts: list[tuple[int, int]] = field(default_factory=list)
    token_limit: int | None = None
    message_limit: int | None = None
    threshold: float = 0.8
    request: str = ""
    mark_ms: int | None = None  # a flush mark older than this is set again


class Accounts:
    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys

    async def messages(
        self, partition: int, wanted: dict[str, set[int]]
    ) -> dict[str, dict[int, StoredMessage]]:
        """The stored messages of each memory with the given sequences (one round trip);
        a message that is gone is simply missing."""
        memories = list(wanted)
        pipe = self._client.pipeline(transaction=False)
        for memory_id in memories:
            seqs = wanted[memory_id]
            pipe.zrangebyscore(self._keys.memory(partition, memory_id).log, min(seqs), max(seqs))
        found: dict[str, dict[int, StoredMessage]] = {}
        for memory_id, members in zip(memories, await pipe.execute(), strict=True):
            messages = (StoredMessage.model_validate_json(m) for m in members)
            found[memory_id] = {m.seq: m for m in messages if m.seq in wanted[memory_id]}
        return found

    async def apply(
        self, lease: Lease, memories: Sequence[MemoryCounts], entry_ids: Sequence[str]
    ) -> tuple[int, int]:
        """Apply the counts, trip thresholds and acknowledge the entries, fenced; the
        number of messages counted and of flush requests written."""
        p = lease.partition
        memory_keys = []
        for mem in memories:
            k = self._keys.memory(p, mem.memory_id)
            memory_keys += [k.log, k.meta, k.tok]
        payload = [
            {
                "id": m.memory_id,
                "gen": m.gen,
                "counts": m.counts,
                "threshold": m.threshold,
                "request": m.request,
                **({"tokens": m.token_limit} if m.token_limit else {}),
                **({"messages": m.message_limit} if m.message_limit else {}),
                **({"mark_ms": m.mark_ms} if m.mark_ms else {}),
            }
            for m in memories
        ]
        reply = await self._scripts(
            "apply_counts",
            [
                self._keys.lease(p, Group.ACCOUNTANT),
                self._keys.changes(p),
                self._keys.attempts(p, Group.ACCOUNTANT),
                self._keys.flush(p),
                *memory_keys,
            ],
            [
                lease.value,
                Group.ACCOUNTANT.value,
                json.dumps(payload, separators=(",", ":")),
                json.dumps(list(entry_ids)),
            ],
        )
        if reply[0] == "stale":
            raise LeaseLostError(p, Group.ACCOUNTANT.value)
        return int(reply[1]), int(reply[2])
