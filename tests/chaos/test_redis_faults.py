"""Chaos: Redis itself killed (-9, no clean shutdown) while producers publish and every
processor runs, then started again on the same port and data directory.

With ``appendfsync always`` no acknowledged publish may be lost: afterwards every memory
holds exactly its messages, in order. With ``appendfsync everysec`` the last writes
before the kill may be lost; what was lost must be a suffix of each producer's
acknowledged publishes, and everything else converges: nothing applied twice, every
memory in order, no partition stuck. Either way the workers reconnect by themselves,
register their scripts again (the restarted server has none) and take their leases
again."""

from __future__ import annotations

import asyncio
import functools
import itertools
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from events import Publisher
from store import (
    Group,
    Keys,
    MemoryReader,
    RedisClient,
    RedisServerProcess,
    Scripts,
    connect,
)
from tests.chaos.harness import (
    LEASE_TTL_S,
    PARTITIONS,
    Fleet,
    Proc,
    all_leased_by,
    applied_appends,
    check_exact,
    dead_letters,
    held_back,
    lease_fence,
    lease_pid,
    leases,
    unsettled,
    wait_for,
    wait_settled,
)
from tests.chaos.producer import memory_key, publish_one, ref_of, share
from tests.conftest import DEFAULT_FLAVOUR, FLAVOURS, own_server

pytestmark = pytest.mark.chaos

PRODUCERS, MESSAGES, MEMORIES = 3, 3_000, 60
RATE = 150.0  # messages/s over all producers, at most: over 20 s of publishing
DOWN_S = LEASE_TTL_S + 2.0  # longer than a lease: every lease has to be taken again
GROUPS = [g.value for g in Group]


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[str], RedisClient]]:
    made: list[RedisClient] = []

    def make(url: str) -> RedisClient:
        made.append(connect(url))
        return made[-1]

    yield make
    for c in made:
        await c.aclose()


@dataclass
class Producers:
    """Producers in this process (so the test knows which publishes were acknowledged
    before the kill): each publishes its share one at a time, retrying a publish whose
    outcome is unknown with the same idempotency key, as the harness producers do."""

    url: str
    keys: Keys
    run: str
    acked: dict[int, list[int]] = field(default_factory=dict)  # producer -> seqs, in order
    tasks: list[asyncio.Task[int]] = field(default_factory=list)

    def start(self) -> None:
        for producer in range(PRODUCERS):
            self.acked[producer] = []
            self.tasks.append(asyncio.create_task(self._produce(producer)))

    async def _produce(self, producer: int) -> int:
        client = connect(self.url)
        retries = 0
        try:
            publisher = Publisher(client, keys=self.keys, default_partitions=PARTITIONS)
            for m in share(producer, PRODUCERS, MESSAGES, MEMORIES):
                # Paced from one publish to the next: no burst to catch up after Redis
                # was down, so publishing goes on well past the restart.
                await asyncio.sleep(PRODUCERS / RATE)
                retries += await publish_one(publisher, self.run, m)
                self.acked[producer].append(m.seq)
        finally:
            await client.aclose()
        return retries

    @property
    def publishing(self) -> bool:
        return any(not t.done() for t in self.tasks)

    def snapshot(self) -> dict[int, list[int]]:
        return {p: list(seqs) for p, seqs in self.acked.items()}

    async def wait(self, timeout: float) -> int:
        """Until every producer is done; the retries they made."""
        done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} producers still publishing after {timeout:g}s"
        return sum(t.result() for t in done)


async def progressed(client: RedisClient, keys: Keys, n: int) -> bool:
    return await applied_appends(client, keys) >= n


async def taken_again(
    client: RedisClient,
    keys: Keys,
    pids: list[int],
    group: str,
    before: dict[int, str | None],
) -> bool:
    """Every partition of ``group`` is leased by one of ``pids`` again, each lease
    acquired anew (a higher fence than the lease held before the kill)."""
    now = await leases(client, keys, group)
    return all(
        value is not None
        and lease_pid(value) in pids
        and lease_fence(value) > lease_fence(before[p] or "0:")
        for p, value in now.items()
    )


async def noscript_replies(client: RedisClient) -> int:
    """NOSCRIPT errors the server answered since it started (INFO errorstats, 6.2+)."""
    stats = await client.info("errorstats")
    return int(stats.get("errorstat_NOSCRIPT", {}).get("count", 0))


@dataclass
class Restart:
    """What a run through a Redis kill measured."""

    acked_before: dict[int, list[int]]
    acked: dict[int, list[int]]
    resumed_s: float  # restart -> the first apply after it
    leased_s: float  # restart -> every lease of every group held again
    retries: int


async def run_through_kill(
    server: RedisServerProcess,
    fleet: Fleet,
    client_for: Callable[[str], RedisClient],
) -> Restart:
    """Two ``memstream run all`` workers, producers publishing; SIGKILL Redis at 30%,
    keep it down longer than a lease, start it again on the same port and data
    directory; check the workers come back by themselves (same processes, scripts
    registered again, every lease taken again) and survive a SCRIPT FLUSH; wait until
    everything published is settled by every processor."""
    client = client_for(server.url)
    keys = fleet.keys
    workers = [fleet.start_worker("all") for _ in range(2)]
    pids = [w.pid for w in workers]
    for group in GROUPS:
        await wait_for(
            functools.partial(all_leased_by, client, keys, pids, group),
            timeout=45,
            what=f"the workers to lease every {group} partition",
        )
    assert all(w.alive for w in workers), [(w.name, w.returncode) for w in workers]
    producers = Producers(server.url, keys, fleet.run)
    producers.start()
    await wait_for(
        lambda: progressed(client, keys, MESSAGES * 3 // 10), timeout=60, what="30% applied"
    )

    fences = {g: await leases(client, keys, g) for g in GROUPS}
    acked_before = producers.snapshot()
    server.kill(signal.SIGKILL)
    assert producers.publishing, "Redis must die while producers publish"
    killed_at = time.monotonic()
    await asyncio.sleep(DOWN_S)
    server.start()
    restarted_at = time.monotonic()
    print(f"\nRedis killed (-9) and restarted after {restarted_at - killed_at:.1f}s")
    client = client_for(server.url)  # the old client's pooled connection is broken
    applied_then = await applied_appends(client, keys)
    await wait_for(
        lambda: progressed(client, keys, applied_then + 1),
        timeout=60,
        what="the first apply after the restart",
    )
    resumed_s = time.monotonic() - restarted_at
    for group in GROUPS:
        await wait_for(
            functools.partial(taken_again, client, keys, pids, group, fences[group]),
            timeout=60,
            what=f"the same workers to lease every {group} partition again, newly fenced",
        )
    leased_s = time.monotonic() - restarted_at
    assert all(w.alive for w in workers), (
        f"a worker died with Redis: {[(w.name, w.returncode) for w in workers]}"
    )
    version = str((await client.info("server"))["redis_version"])
    if int(version.split(".", maxsplit=1)[0]) >= 7:
        # The restarted server had no scripts: the workers were told so, and loaded them
        # (Redis 6.2 writes SCRIPT LOAD to its append-only file and loads them back).
        assert await noscript_replies(client) >= 1, "no NOSCRIPT after the restart"

    # Once more, while running: every script of the server dropped at once.
    assert producers.publishing, "the script flush must happen while producers publish"
    strict = Scripts(client, strict=True)  # the workers' scripts (strict keys in tests)
    apply_sha = strict._shas["apply_batch"]
    noscript = await noscript_replies(client)
    pipe = client.pipeline(transaction=True)
    pipe.script_flush()
    pipe.script_exists(apply_sha)
    _, exists = await pipe.execute()
    assert exists == [False], "SCRIPT FLUSH left the apply script loaded"
    applied_then = await applied_appends(client, keys)
    await wait_for(
        lambda: progressed(client, keys, applied_then + 100),
        timeout=60,
        what="applies to go on after SCRIPT FLUSH",
    )
    assert await noscript_replies(client) > noscript, "no NOSCRIPT after SCRIPT FLUSH"
    assert (await client.script_exists(apply_sha)) == [True], "the workers did not reload"

    retries = await producers.wait(timeout=150)
    assert all(w.alive for w in workers), "a worker died"
    await wait_settled(client, keys, timeout=90)
    for group in (Group.ACCOUNTANT.value, Group.SUMMARIZER.value):
        await wait_for(
            functools.partial(_settled, client, keys, group),
            timeout=60,
            what=f"every {group} entry to be settled",
        )
    return Restart(acked_before, producers.snapshot(), resumed_s, leased_s, retries)


async def _settled(client: RedisClient, keys: Keys, group: str) -> bool:
    return not await unsettled(client, keys, group)


async def uncounted(client: RedisClient, keys: Keys) -> dict[str, str]:
    """Memories whose messages the accountant has not all counted."""
    reader = MemoryReader(client, Scripts(client), keys)
    left = {}
    for i in range(MEMORIES):
        ref = ref_of(memory_key(i))
        view = await reader.read(ref)
        meta = await client.hmget(
            keys.memory(view.partition, ref.memory_id).meta, "count", "counted"
        )
        if meta[0] != meta[1]:
            left[ref.key] = f"count {meta[0]}, counted {meta[1]}"
    return left


async def applied_pairs(client: RedisClient, keys: Keys) -> tuple[list[tuple[int, int]], list[str]]:
    """Every applied (producer, seq), and what is wrong with each memory beyond lost
    messages: applied twice, out of order, sequences or entries not increasing, several
    generations, a count that does not match."""
    reader = MemoryReader(client, Scripts(client), keys)
    pairs: list[tuple[int, int]] = []
    problems: list[str] = []
    for i in range(MEMORIES):
        key = memory_key(i)
        view = await reader.read(ref_of(key))
        got = [(int(m.metadata["producer"]), int(m.metadata["seq"])) for m in view.messages]
        pairs.extend(got)
        twice = sorted(pair for pair, n in Counter(got).items() if n > 1)
        if twice:
            problems.append(f"{key}: applied twice: {twice[:10]}")
        for producer in range(PRODUCERS):
            order = [s for p, s in got if p == producer]
            if order != sorted(order):
                problems.append(f"{key}: producer {producer} out of order: {order}")
        seqs = [m.seq for m in view.messages]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            problems.append(f"{key}: sequences not increasing: {seqs}")
        entries = [tuple(map(int, m.entry.split("-"))) for m in view.messages]
        if any(b <= a for a, b in itertools.pairwise(entries)):
            problems.append(f"{key}: not applied in stream order")
        if len({m.gen for m in view.messages}) > 1:
            problems.append(f"{key}: several generations")
        if view.count != len(view.messages):
            problems.append(f"{key}: meta count {view.count} != {len(view.messages)} messages")
    return pairs, problems


def _live(workers: list[Proc]) -> bool:
    return all(w.alive for w in workers)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
async def test_redis_killed_with_appendfsync_always_loses_no_acknowledged_publish(
    flavour: str,
    server_factory: list[RedisServerProcess],
    tmp_path: Path,
    fleets: Callable[[str], Fleet],
    client_for: Callable[[str], RedisClient],
) -> None:
    started = time.monotonic()
    server = own_server(server_factory, tmp_path, flavour, extra_args=["--appendfsync", "always"])
    fleet = fleets(server.url)
    run = await run_through_kill(server, fleet, client_for)
    await check_exact(server.url, fleet.keys, PRODUCERS, MESSAGES, MEMORIES)
    client = client_for(server.url)
    assert await uncounted(client, fleet.keys) == {}
    assert _live(fleet.workers)
    print(
        f"appendfsync always, Redis {flavour}: 0 acknowledged publishes lost "
        f"({sum(map(len, run.acked_before.values()))} acknowledged before the kill); "
        f"applies resumed {run.resumed_s:.1f}s and every lease was held again "
        f"{run.leased_s:.1f}s after the restart; {run.retries} publishes retried; "
        f"{time.monotonic() - started:.1f}s"
    )


@pytest.mark.timeout(240)
async def test_redis_killed_with_appendfsync_everysec_loses_at_most_a_suffix_and_converges(
    server_factory: list[RedisServerProcess],
    tmp_path: Path,
    fleets: Callable[[str], Fleet],
    client_for: Callable[[str], RedisClient],
) -> None:
    started = time.monotonic()
    server = own_server(
        server_factory, tmp_path, DEFAULT_FLAVOUR, extra_args=["--appendfsync", "everysec"]
    )
    fleet = fleets(server.url)
    keys = fleet.keys
    run = await run_through_kill(server, fleet, client_for)
    client = client_for(server.url)
    pairs, problems = await applied_pairs(client, keys)
    assert not problems, f"{len(problems)} memories are wrong:\n" + "\n".join(problems[:30])
    applied = set(pairs)
    assert len(applied) == len(pairs) == await applied_appends(client, keys), "applied twice"
    lost: dict[int, list[int]] = {}
    for producer, before in run.acked_before.items():
        missing = [s for s in before if (producer, s) not in applied]
        # Only the last publishes before the kill may be gone, never one before them.
        assert missing == before[len(before) - len(missing) :], (
            f"producer {producer} lost {missing}, not a suffix of its {len(before)} "
            f"publishes acknowledged before the kill"
        )
        lost[producer] = missing
        after = run.acked[producer][len(before) :]
        late = [s for s in after if (producer, s) not in applied]
        assert not late, f"producer {producer}: publishes after the kill lost: {late[:10]}"
    assert sum(map(len, run.acked.values())) == MESSAGES
    assert await dead_letters(client, keys) == {}
    assert await held_back(client, keys) == {}
    assert await uncounted(client, keys) == {}
    assert _live(fleet.workers)
    total_lost = sum(map(len, lost.values()))
    print(
        f"appendfsync everysec, Redis {DEFAULT_FLAVOUR}: {total_lost} of "
        f"{sum(map(len, run.acked_before.values()))} publishes acknowledged before the kill "
        f"lost ({ {p: len(s) for p, s in lost.items()} }); applies resumed "
        f"{run.resumed_s:.1f}s and every lease was held again {run.leased_s:.1f}s after "
        f"the restart; {run.retries} publishes retried; {time.monotonic() - started:.1f}s"
    )
