"""A memory's health: its budget use, what it holds by priority and by role, and how its
flushes went. Built from one read of the memory (``memstream health REF``)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from memory import MemoryResource
from memory.flush import Counted, Limits, Priorities
from memory.resource import MemoryType
from memory.tokens import TokenCounter
from store import MemoryView

_PER_STRATEGY = ("flushes", "saved", "removed")


@dataclass(frozen=True, slots=True)
class Health:
    memory: str
    exists: bool
    generation: int
    messages: int
    tokens: int  # the accountant's exact total of the counted messages
    uncounted: int  # messages the accountant has not counted yet (its lag)
    token_limit: int | None
    message_limit: int | None
    budget_use: float | None  # the larger of tokens / limit and messages / limit
    threshold: float
    target: Limits
    by_priority: dict[int, dict[str, int]] = field(default_factory=dict)
    by_role: dict[str, dict[str, int]] = field(default_factory=dict)
    summaries: int = 0
    flush_pending: bool = False
    over_budget_protected: bool = False
    last_flush: dict[str, Any] | None = None
    per_strategy: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["target"] = {"tokens": self.target.tokens, "messages": self.target.messages}
        return data


def _iso(ms: str | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(int(ms) / 1000, dt.UTC).isoformat(timespec="seconds")


def health_of(view: MemoryView, resource: MemoryResource, counter: TokenCounter) -> Health:
    token_limit = (
        resource.token_limit if resource.type is not MemoryType.MESSAGE_COUNT_BASED else None
    )
    message_limit = resource.max_messages if resource.type is not MemoryType.TOKEN_BASED else None
    uses = []
    if token_limit:
        uses.append(view.tokens / token_limit)
    if message_limit:
        uses.append(view.count / message_limit)
    priorities = Priorities(resource.priority)
    by_priority: dict[int, Counter[str]] = {}
    by_role: dict[str, Counter[str]] = {}
    for m, c in zip(view.messages, view.token_counts, strict=True):
        entry = Counted(m, c if c is not None else counter.message(m))
        level = by_priority.setdefault(priorities.of(m), Counter())
        role = by_role.setdefault("summary" if m.is_summary else m.role.value, Counter())
        for bucket in (level, role):
            bucket["messages"] += 1
            bucket["tokens"] += entry.tokens
    meta = view.meta
    per_strategy: dict[str, dict[str, int]] = {}
    for name, value in meta.items():
        kind, _, strategy = name.partition(":")
        if kind in _PER_STRATEGY and strategy:
            per_strategy.setdefault(strategy, {})[kind] = int(value)
    last = None
    if "last_flush_at" in meta:
        last = {
            "at": _iso(meta["last_flush_at"]),
            "strategy": meta.get("last_flush_strategy"),
            "removed": int(meta.get("last_flush_removed") or 0),
            "saved": int(meta.get("last_flush_saved") or 0),
            "tokens_after": int(meta.get("last_flush_tokens") or 0),
        }
    if "last_flush_note" in meta and (
        last is None or int(meta.get("last_flush_note_at") or 0) > int(meta["last_flush_at"])
    ):
        last = {"at": _iso(meta.get("last_flush_note_at")), "ended": meta["last_flush_note"]}
    return Health(
        memory=view.ref.memory_id,
        exists=view.exists,
        generation=view.generation,
        messages=view.count,
        tokens=view.tokens,
        uncounted=view.count - view.counted,
        token_limit=token_limit,
        message_limit=message_limit,
        budget_use=round(max(uses), 4) if uses else None,
        threshold=resource.flushing.summarize_threshold,
        target=Limits.target_of(resource),
        by_priority={k: dict(v) for k, v in sorted(by_priority.items(), reverse=True)},
        by_role={k: dict(v) for k, v in sorted(by_role.items())},
        summaries=sum(1 for m in view.messages if m.is_summary),
        flush_pending=view.flush_pending,
        over_budget_protected="over_budget_protected" in meta,
        last_flush=last,
        per_strategy=per_strategy,
    )


def render(h: Health) -> str:
    if not h.exists:
        return f"{h.memory}: no such memory (generation {h.generation})"
    limits = []
    if h.token_limit:
        limits.append(f"{h.tokens}/{h.token_limit} tokens")
    if h.message_limit:
        limits.append(f"{h.messages}/{h.message_limit} messages")
    lines = [
        f"{h.memory}: generation {h.generation}, {h.messages} message(s), "
        + ", ".join(limits)
        + (
            f" ({h.budget_use:.0%} of budget; flush at {h.threshold:.0%})"
            if h.budget_use is not None
            else ""
        ),
        f"  accountant: {h.uncounted} message(s) not counted yet"
        if h.uncounted
        else "  accountant: caught up",
        "  flush: "
        + ("pending" if h.flush_pending else "none pending")
        + ("; OVER BUDGET with protected messages alone" if h.over_budget_protected else ""),
    ]
    if h.last_flush:
        lines.append("  last flush: " + ", ".join(f"{k} {v}" for k, v in h.last_flush.items()))
    for strategy, stats in sorted(h.per_strategy.items()):
        lines.append(
            f"  {strategy}: {stats.get('flushes', 0)} flush(es), {stats.get('removed', 0)} "
            f"message(s) removed, {stats.get('saved', 0)} tokens saved"
        )
    lines.append(
        "  by priority: "
        + ", ".join(
            f"{level}: {v['messages']} msg / {v['tokens']} tok"
            for level, v in h.by_priority.items()
        )
    )
    lines.append(
        "  by role: "
        + ", ".join(
            f"{role}: {v['messages']} msg / {v['tokens']} tok" for role, v in h.by_role.items()
        )
    )
    return "\n".join(lines)
