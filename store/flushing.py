"""The summarizer's side of the store: a consistent snapshot of a memory to plan over,
and the end of every flush attempt in one fenced script (``finish_flush.lua``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memory import StoredMessage
from store.errors import LeaseLostError
from store.keys import Group, Keys
from store.lease import Lease
from store.scripts import Scripts


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One memory as a flush sees it."""

    memory_id: str
    exists: bool
    gen: int = 0
    messages: list[StoredMessage] = field(default_factory=list)
    digests: dict[int, str] = field(default_factory=dict)  # seq -> SHA-1 of the stored text
    counts: dict[int, int] = field(default_factory=dict)  # seq -> stored token count
    last_used: dict[int, int] = field(default_factory=dict)  # seq -> ms
    uses: dict[int, int] = field(default_factory=dict)  # seq -> reads into a context
    mark: str | None = None  # the flush request that holds this generation's mark
    tokens: int = 0
    count: int = 0


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """A memory's limits as the end of a flush checks them (to re-arm)."""

    tokens: int | None
    messages: int | None
    threshold: float


@dataclass(frozen=True, slots=True)
class Change:
    """What a flush writes: messages removed, and a summary in place of others."""

    strategy: str
    entry: str  # the flush request's entry id (the summary's origin)
    remove: Sequence[int] = ()
    summarize: Sequence[int] = ()
    # seq -> the digest of the stored message the plan saw (``Snapshot.digests``): the
    # plan applies only if each is still exactly that message
    digests: Mapping[int, str] = field(default_factory=dict)
    summary: str | None = None  # the summary message's JSON (role, content, covers)
    summary_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FlushEnd:
    status: str  # applied | ended | stale_generation | no_memory
    tokens: int
    messages: int
    rearmed: bool
    protected: bool


def _flat(values: Sequence[str]) -> dict[str, str]:
    return dict(zip(values[::2], values[1::2], strict=True))


class Flushes:
    def __init__(self, scripts: Scripts, keys: Keys) -> None:
        self._scripts = scripts
        self._keys = keys

    def stream(self, partition: int) -> str:
        return self._keys.flush(partition)

    async def snapshot(self, partition: int, memory_id: str) -> Snapshot:
        k = self._keys.memory(partition, memory_id)
        meta_flat, texts, tok_flat, digests = await self._scripts(
            "flush_snapshot", [k.log, k.meta, k.tok], []
        )
        meta = _flat(meta_flat)
        if not meta:
            return Snapshot(memory_id, exists=False)
        counts: dict[int, int] = {}
        last_used: dict[int, int] = {}
        uses: dict[int, int] = {}
        for name, value in _flat(tok_flat).items():
            if name.isdigit():
                counts[int(name)] = int(value)
            elif name.startswith("a:"):
                last_used[int(name[2:])] = int(value)
            elif name.startswith("f:"):
                uses[int(name[2:])] = int(value)
        messages = [StoredMessage.model_validate_json(t) for t in texts]
        return Snapshot(
            memory_id,
            exists=True,
            gen=int(meta.get("gen") or 0),
            messages=messages,
            digests={m.seq: str(d) for m, d in zip(messages, digests, strict=True)},
            counts=counts,
            last_used=last_used,
            uses=uses,
            mark=meta.get("flush_request") if meta.get("flush_gen") == meta.get("gen") else None,
            tokens=int(meta.get("tokens") or 0),
            count=int(meta.get("count") or 0),
        )

    async def finish(
        self,
        lease: Lease,
        memory_id: str,
        *,
        gen: int,
        entries: Sequence[str],
        requests: Sequence[str],
        rearm: str,
        limits: BudgetLimits,
        change: Change | None = None,
        note: str | None = None,
        plan: Mapping[str, Any] | None = None,
        letter: Mapping[str, str] | None = None,
    ) -> FlushEnd | None:
        """End a flush attempt (see ``finish_flush.lua``); None when ``change`` no longer
        applies (a planned message is gone): plan again from a fresh snapshot."""
        p = lease.partition
        k = self._keys.memory(p, memory_id)
        args: dict[str, Any] = {
            "memory": memory_id,
            "gen": gen,
            "entries": list(entries),
            "requests": list(requests),
            "rearm": rearm,
            "limits": {
                "threshold": limits.threshold,
                **({"tokens": limits.tokens} if limits.tokens else {}),
                **({"messages": limits.messages} if limits.messages else {}),
            },
        }
        if change is not None:
            args["plan"] = {
                "strategy": change.strategy,
                "entry": change.entry,
                "remove": list(change.remove),
                "summarize": list(change.summarize),
                "digests": {str(seq): digest for seq, digest in change.digests.items()},
                **(
                    {
                        "summary": change.summary,
                        "summary_tokens": change.summary_tokens,
                        "position": max(change.summarize),
                    }
                    if change.summary is not None and change.summarize
                    else {}
                ),
            }
        if note:
            args["note"] = note
        if plan is not None:
            args["plan_text"] = json.dumps(plan, separators=(",", ":"))
        if letter is not None:
            args["letter"] = [x for kv in letter.items() for x in kv]
        reply = await self._scripts(
            "finish_flush",
            [
                self._keys.lease(p, Group.SUMMARIZER),
                self._keys.flush(p),
                self._keys.attempts(p, Group.SUMMARIZER),
                self._keys.dlq(p),
                k.log,
                k.meta,
                k.tok,
            ],
            [lease.value, Group.SUMMARIZER.value, json.dumps(args, separators=(",", ":"))],
        )
        if reply[0] == "stale":
            raise LeaseLostError(p, Group.SUMMARIZER.value)
        if reply[0] == "changed":
            return None
        return FlushEnd(
            status=str(reply[1]),
            tokens=int(reply[2]),
            messages=int(reply[3]),
            rearmed=bool(int(reply[4])),
            protected=bool(int(reply[5])),
        )
