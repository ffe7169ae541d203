"""Dead letters: listing them and replaying one (DESIGN rule 10)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memory import partition_for
from store.config import get_partitions
from store.connection import RedisClient
from store.keys import Keys
from store.scripts import Scripts


def _strings(fields: Mapping[Any, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (fields or {}).items()}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    partition: int
    id: str
    fields: dict[str, str]

    @property
    def reason(self) -> str:
        return self.fields.get("reason", "")


class DeadLetters:
    def __init__(self, client: RedisClient, scripts: Scripts, keys: Keys) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys

    async def list(self, partition: int | None = None, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of one partition, or of each partition."""
        if partition is None:
            partitions = list(range(await get_partitions(self._client, self._keys)))
        else:
            partitions = [partition]
        found: list[DeadLetter] = []
        for p in partitions:
            for entry_id, fields in await self._client.xrange(self._keys.dlq(p), count=count) or []:
                found.append(DeadLetter(p, str(entry_id), _strings(fields)))
        return found

    async def get(self, partition: int, letter_id: str) -> DeadLetter | None:
        entries = await self._client.xrange(self._keys.dlq(partition), letter_id, letter_id)
        if not entries:
            return None
        return DeadLetter(partition, str(entries[0][0]), _strings(entries[0][1]))

    async def replay(self, partition: int, letter_id: str) -> str | None:
        """Re-publish a dead letter's event to its stream and remove the letter (see
        ``replay_routed``); returns the new entry id, or None when there is no such
        dead letter."""
        routed = await self.replay_routed(partition, letter_id)
        return None if routed is None else routed[1]

    async def replay_routed(self, partition: int, letter_id: str) -> tuple[int, str] | None:
        """Re-publish a dead letter's event to its stream (the partition's ingest
        stream, or the lifecycle stream for a lifecycle event) and remove the letter;
        returns the partition and the new entry id, or None when there is no such dead
        letter.

        A ``misrouted`` letter (its producer used another partition count) goes to the
        ingest stream of its memory's partition under the current count: it is first
        moved to that partition's dead letters (with ``moved_from``), then replayed from
        there, each stream written in a step of its own partition."""
        letter = await self.get(partition, letter_id)
        if letter is None:
            return None
        memory_id = letter.fields.get("memory")
        if letter.reason == "misrouted" and memory_id:
            target = partition_for(memory_id, await get_partitions(self._client, self._keys))
            if target != partition:
                origin = letter.fields.get("moved_from") or f"{partition}:{letter.id}"
                fields: dict[Any, Any] = {**letter.fields, "moved_from": origin}
                moved = str(await self._client.xadd(self._keys.dlq(target), fields))
                await self._client.xdel(self._keys.dlq(partition), letter.id)
                partition, letter_id = target, moved
                letter = DeadLetter(target, moved, fields)
        lifecycle = self._keys.lifecycle
        from_lifecycle = partition == 0 and letter.fields.get("source") == lifecycle
        # A letter moved to another partition keeps the fallback key of where it was
        # first written, so a replay of each of two copies is applied once.
        origin = letter.fields.get("moved_from") or f"{partition}:{letter_id}"
        reply = await self._scripts(
            "replay_dead_letter",
            [
                self._keys.dlq(partition),
                lifecycle if from_lifecycle else self._keys.ingest(partition),
            ],
            [letter_id, f"dlq:{origin}"],
        )
        return (partition, str(reply[1])) if reply[0] == "ok" else None
