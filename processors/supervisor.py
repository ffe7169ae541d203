"""``memstream run PROCESSOR --workers N``: N worker processes of one processor on this
machine, supervised. Each is an ordinary ``memstream run`` (its own member of the
consumer groups, its own leases); the supervisor passes signals on (SIGTERM and SIGINT
stop them, SIGHUP reloads their resources), restarts one that dies (giving up, and
stopping them all with exit code 1, after 5 quick failures in a row: a bad setting
should fail loudly), and returns once all have stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: A worker that dies is started again after this many seconds (doubling, up to 30 s).
RESTART_DELAY = 1.0
#: A worker that ran this long was healthy: its next failure starts the count again.
HEALTHY_SECONDS = 60.0
#: Failures in a row (each within HEALTHY_SECONDS of its start) before giving up.
MAX_QUICK_FAILURES = 5
#: How long a worker may take to stop after SIGTERM before it is killed.
STOP_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    processor: str
    resources: str | None
    partitions: int | None
    until_idle: bool
    metrics_port: int | None

    def argv(self, index: int) -> list[str]:
        args = [sys.executable, "-m", "processors.cli", "run", self.processor]
        if self.resources:
            args += ["--resources", self.resources]
        if self.partitions:
            args += ["--partitions", str(self.partitions)]
        if self.until_idle:
            args.append("--until-idle")
        if self.metrics_port:
            args += ["--metrics-port", str(self.metrics_port + index)]
        return args


async def supervise(command: WorkerCommand, count: int, redis_url: str) -> int:
    """Run ``count`` workers until a stop signal (or, with ``until_idle``, until they all
    finished); the exit code: 0 when every worker stopped cleanly."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    procs: dict[int, asyncio.subprocess.Process] = {}
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("MEMSTREAM_METRICS_PORT", None)  # each worker gets its own port (argv)

    def forward(sig: signal.Signals) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
        for proc in procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)

    async def keep(index: int) -> int:
        delay, quick = RESTART_DELAY, 0
        while True:
            if stopping.is_set():
                return 0
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(*command.argv(index), env=env)
            procs[index] = proc
            if stopping.is_set():  # the signal came while it was being started
                proc.send_signal(signal.SIGTERM)
            log.info("worker %d of %d started (pid %d)", index + 1, count, proc.pid)
            code = await proc.wait()
            if stopping.is_set() or (command.until_idle and code == 0):
                return code
            if loop.time() - started > HEALTHY_SECONDS:
                delay, quick = RESTART_DELAY, 0
            quick += 1
            if quick > MAX_QUICK_FAILURES:
                log.error(
                    "worker %d of %d failed %d times in a row; stopping them all",
                    index + 1,
                    count,
                    quick,
                )
                forward(signal.SIGTERM)
                return code or 1
            log.error(
                "worker %d of %d (pid %d) exited with %d; starting it again in %gs",
                index + 1,
                count,
                proc.pid,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stopping.wait()
            delay = min(delay * 2, 30.0)

    try:
        codes = await asyncio.gather(*(keep(i) for i in range(count)))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await _end_all(list(procs.values()))
    return 0 if all(code == 0 for code in codes) else 1


async def _end_all(procs: list[asyncio.subprocess.Process]) -> None:
    """No worker outlives the supervisor: SIGTERM, then SIGKILL after a grace."""
    alive = [p for p in procs if p.returncode is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in alive:
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
