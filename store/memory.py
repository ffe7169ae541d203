"""The materialized memory's write side: the appender's batch, applied by one fenced
script (``apply_batch.lua``) that also records outcomes and acknowledges."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from store.errors import LeaseLostError
from store.keys import Group, Keys, outcome_minute
from store.lease import Lease
from store.replicas import run_then_wait
from store.scripts import Scripts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the store remembers what it needs for exactly-once apply."""

    idempotency_ms: int = 24 * 3600 * 1000
    tombstone_ms: int = 7 * 24 * 3600 * 1000
    outcome_ms: int = 10 * 60 * 1000
    backup_ms: int = 7 * 24 * 3600 * 1000

    def __post_init__(self) -> None:
        if self.tombstone_ms < self.idempotency_ms:
            raise ValueError(
                "the tombstone TTL must not be shorter than the idempotency window: "
                "a repeat after a delete would be applied again"
            )


@dataclass(slots=True)
class Target:
    """The entry an op comes from and the memory it changes (one per message on the hot
    path: not frozen, which would set every field through object.__setattr__)."""

    entry_id: str
    memory_id: str
    ttl_ms: int
    event_id: str
    idempotency_key: str | None = None
    replay_of: str | None = None
    letter_event: str | None = None  # what a dead letter of this op keeps as its event
    workflow: str | None = None  # the workflow writing it (appends and replaces)
    on_workflow_end: str = "keep"  # the policy when its last workflow ends
    grace_ms: int = 0  # expire: how long it stays after


@dataclass(frozen=True, slots=True)
class Ending:
    """A workflow's end, to apply to the memories it wrote in one partition."""

    entry_id: str
    event_id: str
    tenant: str
    workflow: str
    memories: Sequence[Target]  # the memories its index names (ttl and policy of each)
    more: bool = False  # more memories than one call takes: the entry stays pending


def _compact_json(value: object) -> bytes | str:
    """``value`` as compact JSON: orjson's UTF-8, or the standard encoder for what orjson
    refuses (integers past 64 bits, lone surrogates), as it always was."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ApplyBatch:
    """The ops of one appender batch, in stream order, for ``MemoryStore.apply``."""

    def __init__(self, keys: Keys, partition: int) -> None:
        self._keys = keys
        self.partition = partition
        self.ops: list[dict[str, object]] = []
        self.mems: list[dict[str, object]] = []
        # The appends' and replaces' message texts, in op order: script arguments of
        # their own (ops name theirs by offset), so none is encoded twice.
        self.texts: list[str] = []
        self._mem_index: dict[str, int] = {}
        self.buckets: list[str] = []
        self._bucket_of: dict[int, int] = {}  # minute of entry ids -> bucket number
        self.indexes: list[str] = []  # index keys, referred to by number
        self._index_of: dict[str, int] = {}
        # Per (tenant, workflow): the memories written earlier in this batch.
        self.written: dict[tuple[str, str], set[str]] = {}
        # When each entry's event was published (producer's clock, ms), for metrics.
        self.published_at: dict[str, int] = {}
        self.size = 0  # bytes of event and message text, to keep script calls bounded

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def entry_ids(self) -> list[str]:
        return [str(op["id"]) for op in self.ops]

    def _bucket(self, entry_id: str) -> int:
        minute = outcome_minute(entry_id)
        number = self._bucket_of.get(minute)
        if number is None:
            self.buckets.append(self._keys.outcomes(self.partition, entry_id))
            number = self._bucket_of[minute] = len(self.buckets)
        return number

    def _index(self, key: str) -> int:
        number = self._index_of.get(key)
        if number is None:
            self.indexes.append(key)
            number = self._index_of[key] = len(self.indexes)
        return number

    def _memory(self, target: Target) -> int:
        index = self._mem_index.get(target.memory_id)
        if index is None:
            tenant, resource, _ = target.memory_id.split("/", 2)
            p = self.partition
            self.mems.append(
                {
                    "id": target.memory_id,
                    "ttl": target.ttl_ms,
                    "t": self._index(self._keys.tenant_index(p, tenant)),
                    "r": self._index(self._keys.resource_index(p, tenant, resource)),
                    "e": self._index(self._keys.ended(p, tenant)),
                    "pol": target.on_workflow_end,
                    "grace": target.grace_ms,
                }
            )
            index = self._mem_index[target.memory_id] = len(self.mems)
        return index

    def _workflow_index(self, tenant: str, workflow: str) -> int:
        return self._index(self._keys.workflow_index(self.partition, tenant, workflow))

    def _memory_op(self, kind: str, target: Target) -> dict[str, object]:
        op: dict[str, object] = {
            "id": target.entry_id,
            "o": self._bucket(target.entry_id),
            "k": kind,
            "m": self._memory(target),
            "ev": target.event_id,
        }
        if target.workflow and kind in ("append", "replace", "restore"):
            tenant = target.memory_id.split("/", 1)[0]
            op["wf"] = target.workflow
            op["w"] = self._workflow_index(tenant, target.workflow)
            self.written.setdefault((tenant, target.workflow), set()).add(target.memory_id)
        if target.idempotency_key:
            op["idem"] = target.idempotency_key
        if target.replay_of:
            op["replay"] = target.replay_of
        if target.letter_event is not None:
            op["lev"] = target.letter_event
        self.ops.append(op)
        return op

    def append(self, target: Target, message: str) -> None:
        """Append one message; ``message`` is its JSON object text (no ``seq`` field)."""
        self._messages(self._memory_op("append", target), [message])

    def replace(self, target: Target, messages: Sequence[str]) -> None:
        """Replace the whole memory (a new generation) with ``messages``."""
        self._messages(self._memory_op("replace", target), messages)

    def _messages(self, op: dict[str, object], messages: Sequence[str]) -> None:
        op["mi"], op["mn"] = len(self.texts), len(messages)
        self.texts.extend(_object_text(m) for m in messages)
        self.size += sum(len(m) for m in messages)

    def touches(self, memory_id: str) -> bool:
        """Whether an op of this batch changes the memory already."""
        index = self._mem_index.get(memory_id)
        return index is not None and any(op.get("m") == index for op in self.ops)

    def restore(self, target: Target, backup_id: str) -> None:
        """Replace the memory with its backup ``backup_id`` (a new generation), if that is
        its latest backup and still kept. The script decides it from the stored backup,
        so it must be the first op of its memory in the batch (start a new batch)."""
        if self.touches(target.memory_id):
            raise ValueError("a restore must be the first op of its memory in a batch")
        self._memory_op("restore", target)["bk"] = backup_id

    def command(
        self,
        kind: str,
        target: Target,
        fields: dict[str, str] | None = None,
        *,
        backup: bool = False,
        writers: Sequence[str] = (),
    ) -> None:
        """A clear, delete or flush request (``fields`` go into the flush request); a
        clear with ``backup`` keeps the messages under the clear's entry id first; a
        delete takes the memory out of the index of each of its ``writers`` (workflows)."""
        if kind not in ("clear", "delete", "flush"):
            raise ValueError(f"unknown memory command {kind!r}")
        op = self._memory_op(kind, target)
        if fields:
            op["fields"] = [x for kv in fields.items() for x in kv]
        if backup and kind == "clear":
            op["backup"] = True
        if kind == "delete":
            tenant = target.memory_id.split("/", 1)[0]
            every = set(writers) | {
                w for (t, w), ids in self.written.items() if t == tenant and target.memory_id in ids
            }
            if every:
                op["ws"] = {w: self._workflow_index(tenant, w) for w in sorted(every)}

    def ended(self, ending: Ending) -> None:
        """A workflow ended: the memories it wrote lose it as a writer; the policy of
        each runs when it has no writer left. Idempotent."""
        p = self.partition
        self.ops.append(
            {
                "id": ending.entry_id,
                "o": self._bucket(ending.entry_id),
                "k": "ended",
                "ev": ending.event_id,
                "tn": ending.tenant,
                "wf": ending.workflow,
                "w": self._workflow_index(ending.tenant, ending.workflow),
                "e": self._index(self._keys.ended(p, ending.tenant)),
                "ms": [self._memory(t) for t in ending.memories],
                "more": ending.more,
            }
        )

    def written_by(self, tenant: str, workflow: str) -> set[str]:
        """The memories the workflow wrote earlier in this batch."""
        return set(self.written.get((tenant, workflow), ()))

    def erase(self, target: Target, seq: int) -> None:
        """Erase message ``seq`` and every summary that covers it."""
        self._memory_op("erase", target)["seq"] = seq

    def dead_letter(
        self,
        entry_id: str,
        *,
        reason: str,
        detail: str,
        event: str,
        source: str,
        memory_id: str | None = None,
        event_id: str = "",
        replay_of: str | None = None,
        replay_key: str | None = None,
    ) -> None:
        """Refuse an entry into the dead letter stream. A refused replay keeps its
        ``replay_of`` and ``replay_key``, so replaying the letter stays safe."""
        letter = {"event": event, "reason": reason, "detail": detail, "entry": entry_id}
        letter["source"] = source
        if memory_id:
            letter["memory"] = memory_id
        if replay_of:
            letter["replay_of"] = replay_of
        if replay_key:
            letter["replay_key"] = replay_key
        self.ops.append(
            {
                "id": entry_id,
                "o": self._bucket(entry_id),
                "k": "dlq",
                "ev": event_id,
                "reason": reason,
                "detail": detail,
                "letter": [x for kv in letter.items() for x in kv],
            }
        )
        self.size += len(event)

    def drop(self, entry_id: str, *, reason: str, detail: str, event_id: str = "") -> None:
        """Refuse an entry by policy (not bad input): acknowledged with its outcome,
        never stored and never dead-lettered."""
        self.ops.append(
            {
                "id": entry_id,
                "o": self._bucket(entry_id),
                "k": "drop",
                "ev": event_id,
                "reason": reason,
                "detail": detail,
            }
        )

    def erased(self, entry_id: str) -> None:
        self.ops.append({"id": entry_id, "o": self._bucket(entry_id), "k": "erased", "ev": ""})


def _object_text(message: str) -> str:
    text = message.strip()
    if not (text.startswith("{") and text.endswith("}")) or text == "{}":
        raise ValueError("a message must be a non-empty JSON object")
    return text


@dataclass(frozen=True, slots=True)
class Lookups:
    """What the appender reads before a batch with workflow ends or deletes: the
    memories each ending workflow's index names (up to a limit) and each deleted
    memory's writers, so the script can declare every key it touches."""

    workflow_memories: dict[tuple[str, str], list[str]]
    writers: dict[str, list[str]]


class MemoryStore:
    """Applies appender batches to the materialized memory."""

    def __init__(
        self,
        scripts: Scripts,
        keys: Keys,
        retention: Retention | None = None,
        *,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        """With ``replicas``, every batch is followed by a WAIT for that many replicas
        (at most ``replica_timeout`` seconds) before the appender goes on: a failover
        then takes back at most the batch in flight, whose entries are pending again on
        the new master and are applied again (its effects and its acknowledgement
        replicate together, so nothing is applied twice)."""
        self._scripts = scripts
        self._keys = keys
        self.retention = retention or Retention()
        self.replicas = replicas
        self._replica_ms = max(1, int(replica_timeout * 1000))
        self.unconfirmed = 0  # batches fewer replicas than ``replicas`` confirmed

    async def lookups(
        self,
        partition: int,
        workflows: Sequence[tuple[str, str]],
        deleted: Sequence[str],
        limit: int,
    ) -> Lookups:
        """The first ``limit + 1`` memories of each (tenant, workflow)'s index, and the
        workflows writing each memory of ``deleted``, in one round trip."""
        if not workflows and not deleted:
            return Lookups({}, {})
        pipe = self._scripts.client.pipeline(transaction=False)
        for tenant, workflow in workflows:
            pipe.zrange(self._keys.workflow_index(partition, tenant, workflow), 0, limit)
        for memory_id in deleted:
            pipe.hkeys(self._keys.memory(partition, memory_id).meta)
        replies = await pipe.execute()
        found = {pair: [str(m) for m in replies[i]] for i, pair in enumerate(workflows)}
        writers = {
            memory_id: [str(f)[3:] for f in replies[len(workflows) + i] if str(f).startswith("wf:")]
            for i, memory_id in enumerate(deleted)
        }
        return Lookups(found, writers)

    async def apply(self, lease: Lease, batch: ApplyBatch) -> list[str]:
        """The statuses of ``apply_with_reasons``."""
        return (await self.apply_with_reasons(lease, batch))[0]

    async def _apply(self, partition: int, keys: list[str], args: list[Any]) -> Any:
        if not self.replicas:
            return await self._scripts("apply_batch", keys, args)
        reply, confirmed = await run_then_wait(
            self._scripts.client,
            self._scripts,
            "apply_batch",
            keys,
            args,
            self.replicas,
            self._replica_ms,
        )
        if isinstance(reply, BaseException):
            raise reply
        if confirmed < self.replicas and reply[0] != "stale":
            self.unconfirmed += 1
            log.warning(
                "partition %d: a batch was confirmed by %d of %d replicas within %d ms; a "
                "failover now would take it back (it is applied again from the stream)",
                partition,
                confirmed,
                self.replicas,
                self._replica_ms,
            )
        return reply

    async def apply_with_reasons(
        self, lease: Lease, batch: ApplyBatch
    ) -> tuple[list[str], list[str]]:
        """Apply, record outcomes and acknowledge, in one fenced step; the status of
        every op, and the reason of each refused one ('' for the others).

        Returns one status per op (applied, duplicate, skipped, refused, erased,
        partial: an ended op with more to do, left pending); raises
        LeaseLostError, having changed nothing, when the lease is not held.
        """
        if not batch.ops:
            return [], []
        p = lease.partition
        keys = self._keys
        memory_keys = [k for mem in batch.mems for k in keys.memory(p, str(mem["id"])).all()]
        if any(op["k"] == "ended" for op in batch.ops[:-1]):
            raise ValueError("a workflow's end must be the last op of its batch")
        script_keys = (
            [
                keys.lease(p, Group.APPENDER),
                keys.ingest(p),
                keys.changes(p),
                keys.dlq(p),
                keys.flush(p),
                keys.counters(p),
                keys.attempts(p, Group.APPENDER),
                *batch.buckets,
                *batch.indexes,
                *memory_keys,
            ],
            [
                lease.value,
                Group.APPENDER.value,
                len(batch.buckets),
                _compact_json(batch.ops),
                _compact_json(batch.mems),
                self.retention.idempotency_ms,
                self.retention.tombstone_ms,
                self.retention.outcome_ms,
                self.retention.backup_ms,
                len(batch.indexes),
                *batch.texts,
            ],
        )
        reply = await self._apply(p, *script_keys)
        if reply[0] == "stale":
            raise LeaseLostError(p, Group.APPENDER.value)
        return [str(s) for s in reply[1]], [str(r) for r in reply[2]]
