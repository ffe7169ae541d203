"""Flush plans: which messages a flush removes and which it folds into a summary.

Pure functions over a snapshot of one memory (its counted messages, their token counts
and how readers used them). The summarizer applies a plan with one script that
succeeds only if every planned message is still there and the generation is unchanged,
so a plan never has to guess what arrives while it is made.

A flush brings a memory from its threshold down to its *target*
(``flushing.target`` x each limit the memory has). Protected messages (priority at or
above ``priority.protected``, system messages by default) are never removed. Each
strategy is an order in which messages go:

- ``fifo`` (``simple_fifo``): oldest first.
- ``priority``: lowest priority first, oldest first within a level.
- ``lru``: least recently read into a context first (never read: by when it was
  written); it removes until the memory is at its target on every limit it has.
- ``token_aware_lru``: the same order, but it stops as soon as the *token* target is
  met (a buffer memory keeps more messages than with ``lru``).
- ``lfu``: least often read first, then least recently.
- ``hybrid_summary``: the oldest ``summarize_oldest_percent`` of the messages (more if
  that is not enough to reach the target) and every earlier summary are folded into
  one summary of at most ``summary_tokens``; the rest is kept.

With ``token_allocation``, the shares are budgets after a flush: summaries (long-term)
within ``long_term`` x the limit, other evictable messages (short-term) within
``short_term`` x the limit. Protected messages are the system share; when they alone
exceed the target, the plan says so (``over_budget_protected``) instead of removing
them.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from memory.message import StoredMessage
from memory.privacy import compile_pattern
from memory.resource import FlushStrategy, MemoryResource, MemoryType, Priority

#: The smallest summary worth writing, in tokens (with its message framing).
MIN_SUMMARY_TOKENS = 16

#: Part of ``Priorities.fingerprint``: change it when what makes a message protected
#: changes in code (``Priorities.is_protected``, ``text_of``), so that indexes of
#: protected messages built before are rebuilt.
PROTECTION_RULES_VERSION = 1


def _floor(x: float) -> int:
    """floor() of a share of a limit, exact for decimal shares (0.57 x 100 is 57)."""
    return math.floor(round(x, 9))


@dataclass(frozen=True, slots=True)
class Counted:
    """One counted message of a snapshot, and how readers used it."""

    message: StoredMessage
    tokens: int
    last_used: int = 0  # ms; 0: never read into a context
    uses: int = 0

    @property
    def seq(self) -> int:
        return self.message.seq

    @property
    def recency(self) -> int:
        return self.last_used or self.message.at


@dataclass(frozen=True, slots=True)
class Limits:
    """What a flush must reach: targets (None where the memory has no such limit)."""

    tokens: int | None = None
    messages: int | None = None
    short_term: int | None = None
    long_term: int | None = None

    @classmethod
    def target_of(cls, resource: MemoryResource) -> Limits:
        share = resource.flushing.target
        token_limit = (
            resource.token_limit if resource.type is not MemoryType.MESSAGE_COUNT_BASED else None
        )
        message_limit = (
            resource.max_messages if resource.type is not MemoryType.TOKEN_BASED else None
        )
        allocation = resource.token_allocation
        return cls(
            tokens=_floor(share * token_limit) if token_limit else None,
            messages=max(1, _floor(share * message_limit)) if message_limit else None,
            short_term=_floor(allocation.short_term * token_limit)
            if allocation and token_limit
            else None,
            long_term=_floor(allocation.long_term * token_limit)
            if allocation and token_limit
            else None,
        )


class Outcome(enum.StrEnum):
    PLANNED = "planned"  # something to remove or summarize
    AT_TARGET = "at_target"  # nothing to do
    PROTECTED = "over_budget_protected"  # over target, and nothing left that may go


@dataclass(frozen=True, slots=True)
class Plan:
    """What a flush does: remove ``remove``, fold ``summarize`` into one summary of at
    most ``summary_budget`` tokens (placed where the newest of them was)."""

    strategy: FlushStrategy
    outcome: Outcome
    remove: tuple[int, ...] = ()
    summarize: tuple[int, ...] = ()
    summary_budget: int = 0
    tokens_before: int = 0
    tokens_after: int = 0  # with the summary at its full budget
    messages_before: int = 0
    messages_after: int = 0
    covers: tuple[int, ...] = field(default=())  # the summary's covered sequences

    @property
    def seqs(self) -> tuple[int, ...]:
        """Every sequence the plan takes out of the memory."""
        return tuple(sorted(self.remove + self.summarize))

    @property
    def empty(self) -> bool:
        return not self.remove and not self.summarize

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.value,
            "outcome": self.outcome.value,
            "remove": list(self.remove),
            "summarize": list(self.summarize),
            "summary_budget": self.summary_budget,
            "tokens": [self.tokens_before, self.tokens_after],
            "messages": [self.messages_before, self.messages_after],
        }


class Priorities:
    """A message's priority: explicit, else the highest of its role's and its matching
    keywords'. Summaries rank just below the protected level.

    ``fingerprint`` names what decides which messages are protected (the protected
    level, the roles and the keyword patterns at or above it): an index of protected
    messages built under one fingerprint holds under any rules with the same one."""

    def __init__(self, priority: Priority) -> None:
        self._roles = priority.roles
        self._keywords = [(compile_pattern(k.pattern), k.priority) for k in priority.keywords]
        self.protected = priority.protected
        # Only keywords that reach the protected level can make a message protected.
        self._protecting = [p for p, value in self._keywords if value >= self.protected]
        rules = {
            "version": PROTECTION_RULES_VERSION,
            "protected": self.protected,
            "roles": sorted(r.value for r, v in priority.roles.items() if v >= self.protected),
            "keywords": sorted(
                k.pattern for k in priority.keywords if k.priority >= self.protected
            ),
        }
        text = json.dumps(rules, sort_keys=True, separators=(",", ":"))
        self.fingerprint = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]

    def of(self, message: StoredMessage) -> int:
        if message.is_summary:
            return self.protected - 1
        if message.priority is not None:
            return message.priority
        level = self._roles.get(message.role, 0)
        if self._keywords:
            text = text_of(message)
            for pattern, value in self._keywords:
                if value > level and pattern.search(text):
                    level = value
        return level

    def is_protected(self, message: StoredMessage) -> bool:
        """``of(message) >= protected`` (never a summary), matching only the keywords
        that reach the protected level."""
        if message.is_summary:
            return False
        if message.priority is not None:
            return message.priority >= self.protected
        if self._roles.get(message.role, 0) >= self.protected:
            return True
        if self._protecting:
            text = text_of(message)
            return any(pattern.search(text) for pattern in self._protecting)
        return False


class PrioritiesCache:
    """``Priorities`` per resource, built (its patterns compiled) once for each
    ``Priority`` object: a registry reload brings new objects, which are built anew."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._built: dict[int, tuple[Priority, Priorities]] = {}

    def of(self, priority: Priority) -> Priorities:
        found = self._built.get(id(priority))
        if found is not None and found[0] is priority:
            return found[1]
        if len(self._built) >= self._size:
            self._built.clear()
        built = Priorities(priority)
        self._built[id(priority)] = (priority, built)  # holds the object: its id stays its own
        return built


def text_of(message: StoredMessage) -> str:
    """The text of a message's content (its text parts, joined)."""
    content = message.content
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    return "\n".join(p.text for p in content if p.text)


@dataclass(slots=True)
class _Measure:
    """Running totals of what a plan keeps, checked against the limits."""

    limits: Limits
    tokens: int
    messages: int
    short: int  # evictable messages that are not summaries
    long: int  # summaries

    @classmethod
    def of(cls, entries: Sequence[Counted], protected: set[int], limits: Limits) -> _Measure:
        return cls(
            limits,
            tokens=sum(e.tokens for e in entries),
            messages=len(entries),
            short=sum(
                e.tokens for e in entries if e.seq not in protected and not e.message.is_summary
            ),
            long=sum(e.tokens for e in entries if e.message.is_summary),
        )

    def take(self, e: Counted, sign: int = 1) -> None:
        self.tokens -= sign * e.tokens
        self.messages -= sign
        if e.message.is_summary:
            self.long -= sign * e.tokens
        else:
            self.short -= sign * e.tokens

    def with_summary(self, tokens: int) -> _Measure:
        return replace(
            self, tokens=self.tokens + tokens, messages=self.messages + 1, long=self.long + tokens
        )

    def violated(self, *, tokens_only: bool = False) -> set[str]:
        lim = self.limits
        out = set()
        if lim.tokens is not None and self.tokens > lim.tokens:
            out.add("tokens")
        if tokens_only and lim.tokens is not None:
            return out
        if lim.messages is not None and self.messages > lim.messages:
            out.add("messages")
        if lim.short_term is not None and self.short > lim.short_term:
            out.add("short")
        if lim.long_term is not None and self.long > lim.long_term:
            out.add("long")
        return out

    @staticmethod
    def helps(e: Counted, violated: set[str]) -> bool:
        if violated & {"tokens", "messages"}:
            return True
        return ("long" if e.message.is_summary else "short") in violated


def plan_flush(
    entries: Sequence[Counted],
    resource: MemoryResource,
    strategy: FlushStrategy | None = None,
) -> Plan:
    """The plan of ``strategy`` (by default the resource's) for a snapshot of counted
    messages, oldest first."""
    strategy = strategy or resource.flushing.type
    limits = Limits.target_of(resource)
    priorities = Priorities(resource.priority)
    protected = {e.seq for e in entries if priorities.is_protected(e.message)}
    measure = _Measure.of(entries, protected, limits)
    before = (measure.tokens, measure.messages)
    tokens_only = strategy is FlushStrategy.TOKEN_AWARE_LRU
    if not measure.violated(tokens_only=tokens_only):
        return Plan(
            strategy,
            Outcome.AT_TARGET,
            tokens_before=before[0],
            tokens_after=before[0],
            messages_before=before[1],
            messages_after=before[1],
        )
    candidates = [e for e in entries if e.seq not in protected]
    if strategy is FlushStrategy.HYBRID_SUMMARY:
        plan = _hybrid(candidates, measure, resource, before)
        if plan is not None:
            return plan
        # No summary fits: what hybrid keeps is the newest, so it removes the oldest.
        order = _ORDERS[FlushStrategy.FIFO](candidates, priorities)
    else:
        order = _ORDERS[strategy](candidates, priorities)
    removed = []
    for e in order:
        violated = measure.violated(tokens_only=tokens_only)
        if not violated:
            break
        if measure.helps(e, violated):
            measure.take(e)
            removed.append(e.seq)
    # Removing what it could is a plan; the memory may still be over (protected
    # messages alone), which the end of the flush records for health.
    return Plan(
        strategy,
        Outcome.PLANNED if removed else Outcome.PROTECTED,
        remove=tuple(sorted(removed)),
        tokens_before=before[0],
        tokens_after=measure.tokens,
        messages_before=before[1],
        messages_after=measure.messages,
    )


def _hybrid(
    candidates: Sequence[Counted],
    measure: _Measure,
    resource: MemoryResource,
    before: tuple[int, int],
) -> Plan | None:
    """Fold every earlier summary and the oldest messages into one summary; None when
    no summary of a useful size fits the target."""
    limits = measure.limits
    budget = resource.flushing.summary_tokens
    if limits.long_term is not None:
        budget = min(budget, limits.long_term)
    if budget < MIN_SUMMARY_TOKENS:
        return None  # no summary fits the long-term share: remove instead
    summaries = [e for e in candidates if e.message.is_summary]
    messages = [e for e in candidates if not e.message.is_summary]
    if not messages:
        return None
    share = resource.flushing.summarize_oldest_percent
    n = min(len(messages), max(1, math.ceil(round(share * len(messages), 9))))
    folded = list(summaries)
    for e in summaries:
        measure.take(e)
    for e in messages[:n]:
        measure.take(e)
        folded.append(e)
    rest = messages[n:]

    def fits(summary: int) -> bool:
        return not measure.with_summary(summary).violated()

    while not fits(budget) and rest:
        e = rest.pop(0)
        measure.take(e)
        folded.append(e)
    if not fits(budget):
        # Shrink the summary to what the token target leaves room for.
        room = budget
        if limits.tokens is not None:
            room = min(room, limits.tokens - measure.tokens)
        if limits.long_term is not None:
            room = min(room, limits.long_term - measure.long)
        if room < MIN_SUMMARY_TOKENS or not fits(room):
            for e in folded:  # undo: the caller falls back to removing the oldest
                measure.take(e, sign=-1)
            return None
        budget = room
    covers: list[int] = []
    for e in sorted(folded, key=lambda x: x.seq):
        covers.extend(e.message.covers if e.message.is_summary and e.message.covers else [e.seq])
    return Plan(
        FlushStrategy.HYBRID_SUMMARY,
        Outcome.PLANNED,
        summarize=tuple(sorted(e.seq for e in folded)),
        summary_budget=budget,
        tokens_before=before[0],
        tokens_after=measure.tokens + budget,
        messages_before=before[1],
        messages_after=measure.messages + 1,
        covers=tuple(sorted(covers)),
    )


def _fifo(candidates: Sequence[Counted], _: Priorities) -> list[Counted]:
    return sorted(candidates, key=lambda e: e.seq)


def _priority(candidates: Sequence[Counted], p: Priorities) -> list[Counted]:
    return sorted(candidates, key=lambda e: (p.of(e.message), e.seq))


def _lru(candidates: Sequence[Counted], _: Priorities) -> list[Counted]:
    return sorted(candidates, key=lambda e: (e.recency, e.seq))


def _lfu(candidates: Sequence[Counted], _: Priorities) -> list[Counted]:
    return sorted(candidates, key=lambda e: (e.uses, e.recency, e.seq))


_ORDERS: dict[FlushStrategy, Callable[[Sequence[Counted], Priorities], list[Counted]]] = {
    FlushStrategy.FIFO: _fifo,
    FlushStrategy.SIMPLE_FIFO: _fifo,
    FlushStrategy.PRIORITY: _priority,
    FlushStrategy.LRU: _lru,
    FlushStrategy.TOKEN_AWARE_LRU: _lru,
    FlushStrategy.LFU: _lfu,
}


def fit_budget(
    entries: Sequence[Counted], budget: int, priorities: Priorities
) -> tuple[list[Counted], bool]:
    """What a reader may put in a context of ``budget`` tokens, oldest first: protected
    messages first, then the newest others that still fit. When the protected messages
    alone exceed the budget, the newest of them that fit, and True (over budget).
    ``store/lua/read_context.lua`` applies the same rule in Redis when every message is
    counted (tests/store/test_read_context.py compares the two)."""
    flags = [priorities.is_protected(e.message) for e in entries]
    protected = [e for e, flag in zip(entries, flags, strict=True) if flag]
    room = budget
    chosen: set[int] = set()
    over = sum(e.tokens for e in protected) > budget
    for e in reversed(protected):
        if e.tokens <= room:
            chosen.add(e.seq)
            room -= e.tokens
    if not over:
        for e, flag in zip(reversed(entries), reversed(flags), strict=True):
            if flag:
                continue
            if e.tokens > room:
                break  # no gaps: an older message never skips past a newer one left out
            chosen.add(e.seq)
            room -= e.tokens
    return [e for e in entries if e.seq in chosen], over
