"""Chaos harness: worker and producer processes, and what the tests read from Redis.

Workers are real ``memstream run appender`` processes (or any other ``memstream run``
processor, ``all`` for the three in one process); producers run
``tests/chaos/producer.py``. Every process writes its stdout and stderr to a log file;
``Fleet.close`` terminates everything it started (continuing paused processes first) and
``Fleet.dump_logs`` prints the logs when a test fails.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from store import GROUP_TOPIC, Group, Keys, MemoryReader, RedisClient, Scripts, connect
from tests.chaos.producer import plan, ref_of

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv" / "bin"
PYTHON = str(VENV / "python")
MEMSTREAM = str(VENV / "memstream")
PARTITIONS = 16
LEASE_TTL_S = 5.0
APPENDER = Group.APPENDER.value

T = TypeVar("T")


def worker_env(url: str, namespace: str, state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
    env.update(
        REDIS_URL=url,
        MEMSTREAM_NAMESPACE=namespace,
        MEMSTREAM_LEASE_TTL=f"{LEASE_TTL_S:g}s",
        MEMSTREAM_HEARTBEAT="1s",
        MEMSTREAM_STRICT_SCRIPT_KEYS="1",
        MEMSTREAM_RESOURCES=str(ROOT / "memories"),
        MEMSTREAM_PARTITIONS=str(PARTITIONS),
        MEMSTREAM_STATE_DIR=str(state_dir),
        PYTHONUNBUFFERED="1",
    )
    return env


class Proc:
    """One child process with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)
        self.paused = False

    def pause(self) -> None:
        assert self.alive, f"{self.name} is not running"
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, grace: float = 5.0) -> None:
        """Continue (if paused), SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.popen is None or not self.alive:
            return
        self.resume()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    """The processes of one test against one Redis (or Cluster) and namespace."""

    url: str
    namespace: str
    base: Path
    run: str = "run"
    workers: list[Proc] = field(default_factory=list)
    producers: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.base / "state").mkdir(parents=True, exist_ok=True)
        (self.base / "logs").mkdir(parents=True, exist_ok=True)
        self.env = worker_env(self.url, self.namespace, self.base / "state")

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    def _log(self, name: str) -> Path:
        return self.base / "logs" / f"{name}.log"

    # Workers.

    def start_worker(self, processors: str = "appender") -> Proc:
        """Start ``memstream run <processors>`` (appender, accountant, summarizer, all)."""
        name = f"worker{len(self.workers)}"
        proc = Proc(name, [MEMSTREAM, "run", processors], self.env, self._log(name))
        self.workers.append(proc.start())
        return proc

    def add_resources(self, *folders: Path) -> None:
        """Processes started from now on load these resource folders (or files) too."""
        paths = [str(f) for f in folders]
        self.env["MEMSTREAM_RESOURCES"] = ":".join([*paths, self.env["MEMSTREAM_RESOURCES"]])

    def live_workers(self) -> list[Proc]:
        return [w for w in self.workers if w.alive]

    def worker_by_pid(self, pid: int) -> Proc | None:
        return next((w for w in self.workers if w.popen is not None and w.pid == pid), None)

    def restart(self, worker: Proc, processors: str = "appender") -> Proc:
        """kill -9 ``worker`` (if still running) and start a new worker in its place."""
        worker.kill()
        return self.start_worker(processors)

    # Producers.

    def start_producers(
        self, producers: int, messages: int, memories: int, rate: float = 0.0
    ) -> list[Proc]:
        started = []
        for i in range(producers):
            name = f"producer{len(self.producers)}"
            argv = [
                PYTHON, "-m", "tests.chaos.producer",
                "--url", self.url, "--namespace", self.namespace, "--run", self.run,
                "--producer", str(i), "--producers", str(producers),
                "--messages", str(messages), "--memories", str(memories),
                "--rate", str(rate),
            ]  # fmt: skip
            proc = Proc(name, argv, self.env, self._log(name)).start()
            self.producers.append(proc)
            started.append(proc)
        return started

    def publishing(self) -> bool:
        return any(p.alive for p in self.producers)

    async def wait_producers(self, timeout: float) -> None:
        """Until every producer exited; fails on a non-zero exit or the deadline."""
        await wait_for(
            lambda: _ready(not self.publishing()), timeout=timeout, what="producers to finish"
        )
        failed = {p.name: p.returncode for p in self.producers if p.returncode != 0}
        assert not failed, f"producers failed: {failed}"

    # Cleanup and diagnostics.

    def close(self) -> None:
        for proc in [*self.producers, *self.workers]:
            try:
                proc.stop(grace=3.0)
            except Exception as e:  # keep terminating the others
                print(f"could not stop {proc.name}: {e!r}")

    def dump_logs(self, tail: int = 120) -> None:
        for proc in [*self.workers, *self.producers]:
            lines = proc.log_text().splitlines()
            shown = lines if len(lines) <= tail + 20 else [*lines[:20], "...", *lines[-tail:]]
            status = "running" if proc.alive else f"exit {proc.returncode}"
            pid = proc.popen.pid if proc.popen else "-"
            print(f"\n===== {proc.name} (pid {pid}, {status}) {proc.log} =====")
            print("\n".join(shown))


async def _ready(value: bool) -> bool:
    return value


async def wait_for(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


# What the tests read from Redis.


def lease_pid(value: str) -> int:
    """The process id in a lease value ``<fence>:<host>-<pid>-<hex>:<nonce>``."""
    worker = value.split(":")[1]
    return int(worker.rsplit("-", 2)[-2])


def lease_fence(value: str) -> int:
    return int(value.split(":", 1)[0])


async def leases(client: RedisClient, keys: Keys, group: str = APPENDER) -> dict[int, str | None]:
    """Each partition's lease value of ``group`` (None when nobody holds it); the
    cleanup group has one partition (the lifecycle stream)."""
    count = 1 if group == Group.CLEANUP.value else PARTITIONS
    return {p: await client.get(keys.lease(p, group)) for p in range(count)}


async def owned_by(client: RedisClient, keys: Keys, pid: int, group: str = APPENDER) -> set[int]:
    held = await leases(client, keys, group)
    return {p for p, v in held.items() if v and lease_pid(v) == pid}


async def all_leased_by(
    client: RedisClient, keys: Keys, pids: Iterable[int], group: str = APPENDER
) -> bool:
    """Every partition is leased (in ``group``), each by one of ``pids``."""
    wanted = set(pids)
    held = await leases(client, keys, group)
    return all(v is not None and lease_pid(v) in wanted for v in held.values())


async def applied_appends(client: RedisClient, keys: Keys) -> int:
    """Messages appended so far in the namespace (the per-partition sequence counters
    never go back, so this counts every append ever applied, duplicates included)."""
    total = 0
    for p in range(PARTITIONS):
        total += int(await client.hget(keys.counters(p), "seq") or 0)
    return total


async def pending_counts(
    client: RedisClient, keys: Keys, partitions: Iterable[int]
) -> dict[int, int]:
    """Entries read but not yet acknowledged (applied), per partition's ingest stream."""
    wanted = sorted(partitions)
    pipe = client.pipeline(transaction=False)
    for p in wanted:
        pipe.xpending(keys.ingest(p), APPENDER)
    replies = await pipe.execute()
    return {p: int(r["pending"]) for p, r in zip(wanted, replies, strict=True)}


async def when_busy(
    client: RedisClient, keys: Keys, partitions: Iterable[int], timeout: float = 3.0
) -> bool:
    """Return as soon as one of ``partitions`` has entries read but not yet applied (to
    strike a worker in the middle of a batch), or False after ``timeout`` seconds."""
    wanted = list(partitions)
    deadline = time.monotonic() + timeout
    while wanted and time.monotonic() < deadline:
        if any((await pending_counts(client, keys, wanted)).values()):
            return True
    return False


def _idcmp(a: str, b: str) -> int:
    ax, bx = tuple(map(int, a.split("-"))), tuple(map(int, b.split("-")))
    return (ax > bx) - (ax < bx)


def stream_of(keys: Keys, group: str, p: int) -> str:
    """The stream ``group`` consumes: ingest (appender), changes (accountant), flush
    (summarizer) or, for partition 0, lifecycle (cleanup)."""
    return keys.topic(GROUP_TOPIC[Group(group)], p)


async def unsettled(client: RedisClient, keys: Keys, group_name: str = APPENDER) -> dict[int, str]:
    """Partitions whose stream (of ``group_name``, the ingest stream by default) still has
    pending or undelivered entries."""
    left: dict[int, str] = {}
    for p in range(1 if group_name == Group.CLEANUP.value else PARTITIONS):
        stream = stream_of(keys, group_name, p)
        if not await client.exists(stream):
            continue
        groups = {g["name"]: g for g in await client.xinfo_groups(stream)}
        group = groups.get(group_name)
        if group is None:
            left[p] = f"no {group_name} group"
            continue
        last = await client.xrevrange(stream, count=1)
        tail = last[0][0] if last else "0-0"
        delivered = str(group["last-delivered-id"])
        if int(group["pending"]) or _idcmp(delivered, tail) < 0:
            left[p] = f"pending {group['pending']}, delivered {delivered}, tail {tail}"
    return left


async def wait_settled(client: RedisClient, keys: Keys, timeout: float) -> None:
    """Until every ingest entry was delivered and acknowledged (applied or refused)."""

    async def settled() -> bool:
        return not await unsettled(client, keys)

    try:
        await wait_for(settled, timeout=timeout, what="every ingest entry to be settled")
    except AssertionError as e:
        raise AssertionError(f"{e}; unsettled: {await unsettled(client, keys)}") from None


async def dead_letters(client: RedisClient, keys: Keys) -> dict[int, int]:
    counts = {p: int(await client.xlen(keys.dlq(p))) for p in range(PARTITIONS)}
    return {p: n for p, n in counts.items() if n}


async def held_back(client: RedisClient, keys: Keys) -> dict[int, str]:
    held = {p: await client.get(keys.held(p, APPENDER)) for p in range(PARTITIONS)}
    return {p: v for p, v in held.items() if v}


async def exactness_problems(
    client: RedisClient, keys: Keys, producers: int, messages: int, memories: int
) -> list[str]:
    """Every memory holds exactly its messages: none lost, none twice, each producer's
    in publish order, with strictly increasing sequences, applied in stream order."""
    expected = plan(producers, messages, memories)
    reader = MemoryReader(client, Scripts(client), keys)
    problems: list[str] = []
    for key, pairs in expected.items():
        view = await reader.read(ref_of(key))
        got = [(int(m.metadata["producer"]), int(m.metadata["seq"])) for m in view.messages]
        where = f"{key} (partition {view.partition})"
        if not view.exists:
            problems.append(f"{where}: missing")
            continue
        twice = sorted(pair for pair, n in Counter(got).items() if n > 1)
        if twice:
            problems.append(f"{where}: applied twice: {twice[:10]}")
        lost = sorted(set(pairs) - set(got))
        if lost:
            problems.append(f"{where}: lost {len(lost)}: {lost[:10]}")
        extra = sorted(set(got) - set(pairs))
        if extra:
            problems.append(f"{where}: unexpected {extra[:10]}")
        for producer in sorted({p for p, _ in pairs}):
            order = [s for p, s in got if p == producer]
            if order != sorted(order):
                problems.append(f"{where}: producer {producer} out of order: {order}")
        seqs = [m.seq for m in view.messages]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            problems.append(f"{where}: sequences not strictly increasing: {seqs}")
        entries = [m.entry for m in view.messages]
        if any(_idcmp(b, a) <= 0 for a, b in itertools.pairwise(entries)):
            problems.append(f"{where}: not applied in stream order: {entries}")
        if len({m.gen for m in view.messages}) > 1:
            problems.append(
                f"{where}: several generations {sorted({m.gen for m in view.messages})}"
            )
        if view.count != len(view.messages):
            problems.append(f"{where}: meta count {view.count} != {len(view.messages)} messages")
    return problems


async def check_exact(url: str, keys: Keys, producers: int, messages: int, memories: int) -> None:
    """The exactness checks of a finished chaos run (see ``exactness_problems``), plus
    no dead letters, no partition held back and exactly ``messages`` appends applied."""
    client = connect(url)
    try:
        problems = await exactness_problems(client, keys, producers, messages, memories)
        assert not problems, f"{len(problems)} memories are wrong:\n" + "\n".join(problems[:30])
        letters = await dead_letters(client, keys)
        if letters:
            first = await client.xrange(keys.dlq(min(letters)), count=3)
            raise AssertionError(f"dead letters per partition {letters}; first: {first}")
        held = await held_back(client, keys)
        assert held == {}, f"partitions held back: {held}"
        assert await applied_appends(client, keys) == messages, "appends applied != published"
    finally:
        await client.aclose()
