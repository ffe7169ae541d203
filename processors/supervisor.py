"""``memstream run PROCESSOR --workers N``: N worker processes of one processor on this
machine, supervised. Each is an ordinary ``memstream run`` (its own member of the
consumer groups, its own leases); the supervisor passes signals on (SIGTERM and SIGINT
stop them, SIGHUP reloads their resources), restarts one that dies, and returns once
all have stopped."""

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
        delay = RESTART_DELAY
        while True:
            proc = await asyncio.create_subprocess_exec(*command.argv(index), env=env)
            procs[index] = proc
            log.info("worker %d of %d started (pid %d)", index + 1, count, proc.pid)
            code = await proc.wait()
            if stopping.is_set() or (command.until_idle and code == 0):
                return code
            log.error("worker %d (pid %d) exited with %d; starting it again", index, proc.pid, code)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stopping.wait()
            if stopping.is_set():
                return code
            delay = min(delay * 2, 30.0)

    try:
        codes = await asyncio.gather(*(keep(i) for i in range(count)))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0 if all(code == 0 for code in codes) else 1
