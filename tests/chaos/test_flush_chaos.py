"""Chaos with flushes: workers running all three processors (``memstream run all``) are
killed (-9), paused past their lease (SIGSTOP) and replaced while producers append at
full speed to small-budget FIFO memories and ask for flushes now and then. Once all
settles, every memory holds exactly every applied message newer than the oldest it
kept, in order; the rest was removed by flushes, whose counters say so; its totals are
exact and it is back under its threshold."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from events import Publisher, Receipt
from memory import FlushStrategy, MemoryRef, Message, ResourceRegistry, Role, partition_for
from processors.tokenizers import Tokenizers
from store import (
    Group,
    Keys,
    MemoryReader,
    OutcomeStatus,
    RedisClient,
    Scripts,
    WaitTimeoutError,
    connect,
)
from tests.chaos.harness import (
    LEASE_TTL_S,
    PARTITIONS,
    ROOT,
    Fleet,
    Proc,
    all_leased_by,
    applied_appends,
    dead_letters,
    lease_pid,
    leases,
    unsettled,
    wait_for,
)

pytestmark = pytest.mark.chaos

GROUPS = [g.value for g in Group]
RESOURCE_YAML = "resource: memory\nid: chat-fifo\nmax_tokens: 1500\nflushing:\n  type: fifo\n"
LIMIT, THRESHOLD = 1500, 0.8
MEMORIES = 6
PRODUCERS = 4
MAX_PER_PRODUCER = 3_000  # a bound; producers stop when the chaos is over
FLUSH_EVERY = 20  # every 20th append of a producer is preceded by a manual flush request
PAUSE_S = 8.0  # longer than the lease TTL
assert PAUSE_S > LEASE_TTL_S
FILLER = " ".join(f"w{i}" for i in range(20))  # a message is about 50 tokens


@dataclass
class Appended:
    """What producers published to one memory and what became of it."""

    seqs: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (producer, n)
    late: list[tuple[Receipt, tuple[int, int]]] = field(default_factory=list)  # wait timed out


@dataclass
class Producers:
    """Producers in this process: each appends, waiting for every outcome, to the memories
    in turn, until told to stop."""

    publisher: Publisher
    refs: list[MemoryRef]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    appended: defaultdict[str, Appended] = field(default_factory=lambda: defaultdict(Appended))
    published: int = 0
    flushes: int = 0
    finished: int = 0

    @property
    def running(self) -> bool:
        return self.finished < PRODUCERS

    async def produce(self, producer: int) -> None:
        try:
            await self._produce(producer)
        finally:
            self.finished += 1

    async def _produce(self, producer: int) -> None:
        for n in range(MAX_PER_PRODUCER):
            if self.stop.is_set():
                return
            ref = self.refs[(producer + n) % len(self.refs)]
            if n % FLUSH_EVERY == FLUSH_EVERY - 1:
                strategy = FlushStrategy.FIFO if n % (2 * FLUSH_EVERY) else None
                await self.publisher.request_flush(ref, strategy=strategy)
                self.flushes += 1
            message = Message(
                role=Role.USER,
                content=f"p{producer} n{n} {FILLER}",
                metadata={"producer": producer, "n": n},
            )
            key = f"flush-chaos:{producer}:{n}"
            published = await self.publisher.append(ref, message, idempotency_key=key)
            self.published += 1
            receipt = published.receipt
            assert receipt is not None
            try:
                outcome = await self.publisher.wait_applied(receipt, timeout=30)
            except WaitTimeoutError:  # a partition in the middle of a takeover
                self.appended[ref.key].late.append((receipt, (producer, n)))
                continue
            self.record(ref, (producer, n), outcome.status, outcome.seq)

    def record(
        self, ref: MemoryRef, who: tuple[int, int], status: OutcomeStatus, seq: int | None
    ) -> None:
        assert status is OutcomeStatus.APPLIED and seq is not None, (ref, who, status)
        seqs = self.appended[ref.key].seqs
        assert seq not in seqs, f"{ref}: seq {seq} given to {seqs[seq]} and {who}"
        seqs[seq] = who

    async def resolve_late(self) -> int:
        late = [(ref, r, who) for ref in self.refs for r, who in self.appended[ref.key].late]
        for ref, receipt, who in late:
            outcome = await self.publisher.wait_applied(receipt, timeout=30)
            self.record(ref, who, outcome.status, outcome.seq)
        return len(late)


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[str], RedisClient]]:
    made: list[RedisClient] = []

    def make(url: str) -> RedisClient:
        made.append(connect(url))
        return made[-1]

    yield make
    for c in made:
        await c.aclose()


def spread_refs(n: int) -> list[MemoryRef]:
    """``n`` memories of chat-fifo, each in another partition."""
    refs: list[MemoryRef] = []
    taken: set[int] = set()
    for i in itertools.count():
        ref = MemoryRef.parse(f"acme/chat-fifo/flush-{i}")
        p = partition_for(ref.memory_id, PARTITIONS)
        if p not in taken:
            taken.add(p)
            refs.append(ref)
        if len(refs) == n:
            return refs
    raise AssertionError("unreachable")


async def everything_leased(client: RedisClient, keys: Keys, pids: list[int]) -> bool:
    return all([await all_leased_by(client, keys, pids, g) for g in GROUPS])


async def owned(client: RedisClient, keys: Keys, pid: int) -> dict[str, set[int]]:
    """The partitions ``pid`` leases, by group."""
    found: dict[str, set[int]] = {}
    for g in GROUPS:
        held = await leases(client, keys, g)
        found[g] = {p for p, v in held.items() if v and lease_pid(v) == pid}
    return found


async def victim(
    client: RedisClient, keys: Keys, among: list[Proc], ours: set[int]
) -> tuple[Proc, dict[str, set[int]]]:
    """The worker of ``among`` leasing the most of the test's partitions (any group)."""
    held = {w.name: await owned(client, keys, w.pid) for w in among}

    def score(w: Proc) -> int:
        return sum(len(ps & ours) for ps in held[w.name].values())

    worker = max(among, key=score)
    return worker, held[worker.name]


async def when_flushing(client: RedisClient, keys: Keys, partitions: set[int]) -> bool:
    """As soon as one of ``partitions`` has a flush request read but not yet acknowledged
    (to strike in the middle of a flush), or False after 3 seconds."""
    deadline = time.monotonic() + 3.0
    while partitions and time.monotonic() < deadline:
        for p in partitions:
            if int((await client.xpending(keys.flush(p), Group.SUMMARIZER.value))["pending"]):
                return True
        await asyncio.sleep(0.01)
    return False


async def not_settled(
    client: RedisClient, keys: Keys, reader: MemoryReader, refs: list[MemoryRef]
) -> list[str]:
    """What is still going on: stream entries not yet delivered or acknowledged in any
    group, messages not counted yet, flushes pending."""
    left = []
    for g in GROUPS:
        streams = await unsettled(client, keys, g)
        if streams:
            left.append(f"{g}: {streams}")
    for ref in refs:
        view = await reader.read(ref, last=1)
        if view.counted != view.count or view.flush_pending:
            left.append(f"{ref}: counted {view.counted}/{view.count}, flush {view.flush_pending}")
    return left


async def memory_problems(
    reader: MemoryReader, ref: MemoryRef, appended: Appended, registry: ResourceRegistry
) -> list[str]:
    """Everything wrong with one settled memory (see the module docstring)."""
    view = await reader.read(ref)
    where = f"{ref} (partition {view.partition})"
    if not view.exists or not view.messages:
        return [f"{where}: missing or empty"]
    problems = []
    applied = sorted(appended.seqs)
    present = [m.seq for m in view.messages]
    if present != sorted(present) or len(set(present)) != len(present):
        problems.append(f"{where}: sequences out of order: {present}")
    entries = [tuple(map(int, m.entry.split("-"))) for m in view.messages]
    if any(b <= a for a, b in itertools.pairwise(entries)):
        problems.append(f"{where}: not in stream order")
    who = [(int(m.metadata["producer"]), int(m.metadata["n"])) for m in view.messages]
    wrong = [(s, w) for s, w in zip(present, who, strict=True) if appended.seqs.get(s) != w]
    if wrong:
        problems.append(f"{where}: messages not the ones applied at their seq: {wrong[:5]}")
    for producer in range(PRODUCERS):
        ns = [n for p, n in who if p == producer]
        if ns != sorted(ns):
            problems.append(f"{where}: producer {producer} out of order: {ns}")
    kept = [s for s in applied if s >= present[0]]
    if present != kept:
        lost = sorted(set(kept) - set(present))
        problems.append(f"{where}: lost {len(lost)} newer than the oldest kept: {lost[:10]}")
    if any(m.is_summary for m in view.messages) or len({m.gen for m in view.messages}) > 1:
        problems.append(f"{where}: a summary or several generations")
    removed = sum(int(v) for k, v in view.meta.items() if k.startswith("removed:"))
    if removed != len(applied) - len(present):
        problems.append(
            f"{where}: flushes removed {removed}, but {len(applied)} applied and "
            f"{len(present)} present"
        )
    if view.count != len(view.messages):
        problems.append(f"{where}: count {view.count} != {len(view.messages)} messages")
    counts = [c for c in view.token_counts if c is not None]
    counter = Tokenizers().for_resource(registry[ref.resource])
    recount = sum(counter.message(m.to_message()) for m in view.messages)
    if not view.tokens == sum(counts) == recount or len(counts) != len(view.messages):
        problems.append(
            f"{where}: tokens {view.tokens}, stored counts {sum(counts)} "
            f"({len(counts)} of {len(view.messages)}), recount {recount}"
        )
    if view.tokens >= THRESHOLD * LIMIT:
        problems.append(f"{where}: {view.tokens} tokens, at or over the threshold")
    if int(view.meta.get("flushes", 0)) < 1:
        problems.append(f"{where}: never flushed")
    return problems


async def kill_and_pause(
    fleet: Fleet, client: RedisClient, producers: Producers, ours: set[int]
) -> Proc:
    """While producers publish: kill -9 the worker leasing most of the test's partitions
    (in the middle of a flush if it can) and start another; then SIGSTOP the next such
    worker for longer than its lease and continue it. Returns the paused worker."""
    keys = fleet.keys
    await asyncio.sleep(3.0)
    killed, killed_owned = await victim(client, keys, fleet.live_workers(), ours)
    mid_flush = await when_flushing(client, keys, killed_owned[Group.SUMMARIZER] & ours)
    killed.kill()
    print(
        f"kill -9 {killed.name} after {producers.published} appends (mid-flush: {mid_flush}; "
        f"summarizer partitions {sorted(killed_owned[Group.SUMMARIZER])})"
    )
    fleet.start_worker("all")

    await asyncio.sleep(3.0)
    paused, paused_owned = await victim(client, keys, fleet.live_workers(), ours)
    mid_flush = await when_flushing(client, keys, paused_owned[Group.SUMMARIZER] & ours)
    paused.pause()
    paused_at = time.monotonic()
    print(f"SIGSTOP {paused.name} after {producers.published} appends (mid-flush: {mid_flush})")

    async def taken_over() -> bool:
        return not any((await owned(client, keys, paused.pid)).values())

    await wait_for(taken_over, timeout=45, what=f"the leases of {paused.name} taken over")
    await asyncio.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
    assert producers.running, "producers must publish through the chaos"
    paused.resume()
    print(f"SIGCONT {paused.name} after {time.monotonic() - paused_at:.1f}s")
    await asyncio.sleep(2.0)
    return paused


async def check_all(
    fleet: Fleet,
    client: RedisClient,
    producers: Producers,
    registry: ResourceRegistry,
) -> None:
    """Once settled: every memory is right (``memory_problems``), every append applied
    once, no dead letters, nothing held back, every lease with a live worker."""
    keys = fleet.keys
    reader = MemoryReader(client, Scripts(client), keys)
    problems = []
    for ref in producers.refs:
        problems += await memory_problems(reader, ref, producers.appended[ref.key], registry)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
    for ref in producers.refs:
        view = await reader.read(ref, last=1)
        print(
            f"{ref.key}: {len(producers.appended[ref.key].seqs)} applied, {view.count} kept "
            f"({view.tokens} tokens), {view.meta.get('flushes')} flushes removed "
            f"{view.meta.get('removed:fifo')}"
        )
    total = sum(len(a.seqs) for a in producers.appended.values())
    assert total == producers.published
    assert await applied_appends(client, keys) == total, "appends applied != published"
    letters = await dead_letters(client, keys)
    if letters:
        first = await client.xrange(keys.dlq(min(letters)), count=3)
        raise AssertionError(f"dead letters per partition {letters}; first: {first}")
    for g in GROUPS:
        count = 1 if g == Group.CLEANUP.value else PARTITIONS
        held = {p: await client.get(keys.held(p, g)) for p in range(count)}
        assert not any(held.values()), f"{g}: partitions held back: {held}"
    await wait_for(
        lambda: everything_leased(client, keys, [w.pid for w in fleet.live_workers()]),
        timeout=45,
        what="every partition of every group to be leased by a live worker",
    )


@pytest.mark.timeout(240)
async def test_flushes_racing_crashes_and_pauses_lose_nothing(
    chaos_url: str,
    tmp_path: Path,
    fleets: Callable[[str], Fleet],
    client_for: Callable[[str], RedisClient],
) -> None:
    started = time.monotonic()
    folder = tmp_path / "resources"
    folder.mkdir()
    (folder / "chat-fifo.yaml").write_text(RESOURCE_YAML, encoding="utf-8")
    registry = ResourceRegistry.load([ROOT / "memories", folder])
    fleet = fleets(chaos_url)
    fleet.add_resources(folder)
    client = client_for(chaos_url)
    keys = fleet.keys
    refs = spread_refs(MEMORIES)
    workers = [fleet.start_worker("all") for _ in range(3)]
    await wait_for(
        lambda: everything_leased(client, keys, [w.pid for w in workers]),
        timeout=45,
        what="3 workers to lease every partition of every group",
    )
    print(f"\nworkers up after {time.monotonic() - started:.1f}s")

    producers = Producers(Publisher(client, keys=keys, default_partitions=PARTITIONS), refs)
    tasks = [asyncio.create_task(producers.produce(i)) for i in range(PRODUCERS)]
    try:
        ours = {partition_for(r.memory_id, PARTITIONS) for r in refs}
        paused = await kill_and_pause(fleet, client, producers, ours)
    finally:
        producers.stop.set()
        await asyncio.gather(*tasks)
    published_at = time.monotonic()
    late = await producers.resolve_late()
    print(
        f"{producers.published} appends and {producers.flushes} flush requests published "
        f"({late} outcomes waited for after the chaos)"
    )

    reader = MemoryReader(client, Scripts(client), keys)

    async def settled() -> bool:
        return not await not_settled(client, keys, reader, refs)

    try:
        await wait_for(settled, timeout=60, what="everything to settle")
    except AssertionError as e:
        raise AssertionError(f"{e}: {await not_settled(client, keys, reader, refs)}") from None
    print(f"settled {time.monotonic() - published_at:.1f}s after the last publish")
    await check_all(fleet, client, producers, registry)
    assert "lost" in paused.log_text(), f"{paused.name} never noticed that it lost its leases"
    kind = "cluster" if "cluster" in chaos_url else "single server"
    print(f"flush chaos ({kind}): {time.monotonic() - started:.1f}s")
