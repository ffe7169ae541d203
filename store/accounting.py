"""The accountant's side of the store: messages to count, and counts applied by one
fenced script (``apply_counts.lua``) that also trips flush thresholds and acknowledges."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
    # The memory's index of protected messages (read_context.lua), kept under the
    # fingerprint of the resource's priority rules: the counted messages they protect,
    # and, when the index is not of these rules, every message they protect.
    rules: str | None = None
    protected: list[int] = field(default_factory=list)
    rebuild: list[int] | None = None


@dataclass(slots=True)
class ToCount:
    """What the accountant reads of one memory before counting."""

    messages: dict[int, StoredMessage]  # the wanted messages still stored, by sequence
    # Every message of the memory, when its index of protected messages is not of the
    # rules asked for and messages were counted already: the index is to be rebuilt.
    every: list[StoredMessage] | None = None


class Accounts:
    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys

    async def messages(
        self,
        partition: int,
        wanted: dict[str, set[int]],
        rules: Mapping[str, str] | None = None,
    ) -> dict[str, ToCount]:
        """The stored messages of each memory with the given sequences (a message that
        is gone is simply missing); with ``rules`` (memory id -> fingerprint of its
        priority rules), every message of each memory whose index of protected messages
        is of other rules, once messages of it were counted. One round trip, and one
        more for the memories whose index is to be rebuilt."""
        rules = rules or {}
        memories = list(wanted)
        pipe = self._client.pipeline(transaction=False)
        for memory_id in memories:
            seqs = wanted[memory_id]
            k = self._keys.memory(partition, memory_id)
            pipe.zrangebyscore(k.log, min(seqs), max(seqs))
            if memory_id in rules:
                pipe.hget(k.tok, "prot")
                pipe.hget(k.meta, "counted")
        replies = iter(await pipe.execute())
        found: dict[str, ToCount] = {}
        stale: list[str] = []
        for memory_id in memories:
            messages = (StoredMessage.model_validate_json(m) for m in next(replies))
            found[memory_id] = ToCount({m.seq: m for m in messages if m.seq in wanted[memory_id]})
            if memory_id in rules:
                index, counted = next(replies), next(replies)
                if index != rules[memory_id] and int(counted or 0) > 0:
                    stale.append(memory_id)
        if stale:
            pipe = self._client.pipeline(transaction=False)
            for memory_id in stale:
                pipe.zrange(self._keys.memory(partition, memory_id).log, 0, -1)
            for memory_id, members in zip(stale, await pipe.execute(), strict=True):
                found[memory_id].every = [StoredMessage.model_validate_json(m) for m in members]
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
                **({"rules": m.rules, "protected": m.protected} if m.rules else {}),
                **({"rebuild": m.rebuild} if m.rules and m.rebuild is not None else {}),
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
