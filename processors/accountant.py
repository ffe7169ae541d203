"""The accountant: counts the tokens of every applied message (with its memory's model),
keeps each memory's exact token total and its index of the messages its resource's
priority rules protect (what budget reads find older than their window), and emits a
flush request when a memory reaches its resource's threshold. It consumes
``changes:{p}``, the appender's change events."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from memory import MemoryRef, MemoryResource, ResourceRegistry, StoredMessage
from memory.flush import PrioritiesCache
from memory.tokens import TokenCounter
from processors.metrics import Metrics
from processors.port import Batch, Handled
from processors.tokenizers import Tokenizers
from store import Accounts, Group, MemoryCounts, StreamEntry

log = logging.getLogger(__name__)

#: A flush mark older than this many flush lock TTLs is set again (its flush was lost).
MARK_TTLS = 2
#: Messages one step counts at most (a change names up to a whole appender batch of one
#: memory's messages): the entries past it wait, pending, for the next step. A step
#: always takes its first entry, however many it names.
MAX_STEP_MESSAGES = 2_000


def _wanted(entry: StreamEntry) -> tuple[str, int, list[int]] | None:
    """(memory id, generation, sequences to count) of a change event, if it adds any."""
    fields = entry.fields or {}
    kind = fields.get("type")
    try:
        gen = int(fields.get("gen", ""))
        if kind == "appended":
            # One message (seq), or a batch's run of one memory's messages (seqs).
            seqs = fields.get("seqs")
            if seqs is not None:
                return fields["memory"], gen, [int(s) for s in seqs.split(",")]
            return fields["memory"], gen, [int(fields["seq"])]
        if kind == "replaced" and int(fields.get("first_seq", 0)) > 0:
            first, last = int(fields["first_seq"]), int(fields["last_seq"])
            return fields["memory"], gen, list(range(first, last + 1))
    except (KeyError, ValueError):
        log.warning("change entry %s is malformed; skipped", entry.id)
    return None


def step_of(
    entries: Sequence[StreamEntry], limit: int
) -> tuple[list[StreamEntry], list[tuple[str, int, list[int]] | None]]:
    """The first entries of a batch whose changes name at most ``limit`` messages (the
    first entry always), and what each names."""
    taken: list[StreamEntry] = []
    changes: list[tuple[str, int, list[int]] | None] = []
    total = 0
    for entry in entries:
        found = _wanted(entry)
        total += len(found[2]) if found is not None else 0
        if taken and total > limit:
            break
        taken.append(entry)
        changes.append(found)
    return taken, changes


class Accountant:
    """The processor of ``changes:{p}``."""

    group = Group.ACCOUNTANT

    def __init__(
        self,
        accounts: Accounts,
        registry: ResourceRegistry,
        tokenizers: Tokenizers,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._accounts = accounts
        self.registry = registry  # replaced as a whole on reload (SIGHUP)
        self._tokenizers = tokenizers
        self._priorities = PrioritiesCache()

    async def process(self, batch: Batch) -> Handled:
        entries, changes = step_of(batch.entries, MAX_STEP_MESSAGES)
        wanted: dict[tuple[str, int], set[int]] = defaultdict(set)
        for found in changes:
            if found is not None:
                wanted[(found[0], found[1])].update(found[2])
        by_memory: dict[str, set[int]] = defaultdict(set)
        resources: dict[str, MemoryResource] = {}
        for (memory_id, _), wanted_seqs in wanted.items():
            by_memory[memory_id] |= wanted_seqs
            resource = self.registry.find(MemoryRef.parse_id(memory_id).resource)
            if resource is not None:  # else no longer loaded: nothing to count it with
                resources[memory_id] = resource
        rules = {
            memory_id: self._priorities.of(resource.priority).fingerprint
            for memory_id, resource in resources.items()
        }
        read = await self._accounts.messages(batch.partition, by_memory, rules) if by_memory else {}
        memories: list[_Tally] = []
        for (memory_id, gen), seqs in wanted.items():
            resource = resources.get(memory_id)
            if resource is None:
                continue
            priorities = self._priorities.of(resource.priority)
            stored = read[memory_id]
            mine = [
                stored.messages[seq]
                for seq in sorted(seqs)
                if seq in stored.messages and stored.messages[seq].gen == gen
            ]
            every = stored.every
            budget = _budget(memory_id, gen, resource)
            budget.rules = priorities.fingerprint
            budget.protected = [m.seq for m in mine if priorities.is_protected(m)]
            budget.rebuild = (
                None
                if every is None
                else [m.seq for m in every if m.gen == gen and priorities.is_protected(m)]
            )
            counter = self._tokenizers.for_resource(resource)
            memories.append(_Tally(budget, counter, mine))
        self._count(memories)
        counts = [t.budget for t in memories]
        started = time.perf_counter()
        await self._accounts.apply(batch.lease, counts, [e.id for e in entries])
        try:  # the counts are applied: metrics never fail them
            m, group = self._metrics, self.group.value
            m.apply_seconds.labels(group).observe(time.perf_counter() - started)
            m.tokens_counted.inc(sum(n for c in counts for _, n in c.counts))
            m.settled(group, [("count", "applied")] * len(entries))
        except Exception:
            log.exception("recording the metrics of a batch failed")
        return Handled(partial=len(entries) < len(batch.entries))

    def _count(self, memories: list[_Tally]) -> None:
        """Count every message of the batch, in one batch per counter (memories of one
        model share it), and fill in each memory's counts."""
        by_counter: dict[int, list[_Tally]] = defaultdict(list)
        for tally in memories:
            by_counter[id(tally.counter)].append(tally)
        for tallies in by_counter.values():
            tokens = tallies[0].counter.messages([m for t in tallies for m in t.messages])
            i = 0
            for t in tallies:
                n = len(t.messages)
                t.budget.counts = [
                    (m.seq, c) for m, c in zip(t.messages, tokens[i : i + n], strict=True)
                ]
                i += n


@dataclass(frozen=True, slots=True)
class _Tally:
    """One memory generation of a batch: what ``apply_counts`` gets for it, the counter
    of its model and the messages it counts."""

    budget: MemoryCounts
    counter: TokenCounter
    messages: list[StoredMessage]


def _budget(memory_id: str, gen: int, resource: MemoryResource) -> MemoryCounts:
    """What ``apply_counts`` needs of a memory besides its counts: its limits and
    threshold, and the id of the flush request it writes if the memory trips it."""
    return MemoryCounts(
        memory_id=memory_id,
        gen=gen,
        token_limit=resource.token_limit
        if resource.type.value in ("token_based", "buffer")
        else None,
        message_limit=resource.max_messages
        if resource.type.value in ("message_count_based", "buffer")
        else None,
        threshold=resource.flushing.summarize_threshold,
        request=uuid.uuid4().hex,
        mark_ms=int(MARK_TTLS * resource.locking.flush_ttl * 1000),
    )
