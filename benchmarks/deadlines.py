"""Deadlines benchmark: what a socket timeout costs per Redis call on this redis-py and
Python, one command and one pipeline, against the same calls without any timeout, on
one Redis server, in one run. See benchmarks/README.md.

    .venv/bin/python benchmarks/deadlines.py --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from harness import RedisTarget, load_average, machine_info, redis_info, source_version
from redis.asyncio import Redis
from report import emit, log, spread

from store import connect, describe

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 3.3  # the processes' default: a third of the 10 s lease TTL


@dataclass(frozen=True, slots=True)
class Options:
    calls: int
    pipeline: int
    repeat: int
    redis_url: str | None
    json: bool
    save: Path | None


@dataclass
class Result:
    variant: str
    shape: str  # command | pipeline
    cpu_us: float  # this process's CPU per call
    wall_us: float
    tasks_per_call: float  # asyncio Tasks created per call


#: name -> (how the client is made, whether each call is wrapped in asyncio.timeout).
#: redis-py 8 gives its connections a 5 s socket timeout unless told None.
VARIANTS: dict[str, tuple[Callable[[str], Any], bool]] = {
    "redis-py, no timeout": (
        lambda url: Redis.from_url(url, decode_responses=True, socket_timeout=None),
        False,
    ),
    "redis-py, socket_timeout": (
        lambda url: Redis.from_url(url, decode_responses=True, socket_timeout=TIMEOUT),
        False,
    ),
    "redis-py, asyncio.timeout per call": (
        lambda url: Redis.from_url(url, decode_responses=True, socket_timeout=None),
        True,
    ),
    "memstream connect()": (lambda url: connect(url, socket_timeout=TIMEOUT), False),
}


async def measure(
    client: Any, shape: str, calls: int, size: int, per_call_timeout: bool
) -> tuple[float, float, float]:
    """CPU and wall microseconds per call, and Tasks created per call."""

    async def command() -> None:
        await client.get("bench:deadline")

    async def pipeline() -> None:
        pipe = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.get("bench:deadline")
        await pipe.execute()

    call: Callable[[], Awaitable[None]] = command if shape == "command" else pipeline
    if per_call_timeout:
        inner = call

        async def bounded() -> None:
            async with asyncio.timeout(TIMEOUT):
                await inner()

        call = bounded
    for _ in range(200):  # warm up
        await call()
    loop = asyncio.get_running_loop()
    started: list[object] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        started.append(None)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await call()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        loop.set_task_factory(None)
    return cpu * 1e6 / calls, wall * 1e6 / calls, len(started) / calls


async def one_round(url: str, opts: Options) -> list[Result]:
    results = []
    for shape in ("command", "pipeline"):
        calls = opts.calls if shape == "command" else max(1, opts.calls // opts.pipeline)
        for name, (make, per_call) in VARIANTS.items():
            client = make(url)
            try:
                cpu, wall, tasks = await measure(client, shape, calls, opts.pipeline, per_call)
            finally:
                await client.aclose()
            results.append(Result(name, shape, cpu, wall, tasks))
    return results


def summarize(runs: list[list[Result]]) -> dict[str, Any]:
    """Medians over the rounds; each variant's CPU per call against the one without a
    timeout, taken within each round."""
    out: dict[str, Any] = {}
    for shape in ("command", "pipeline"):
        floor = "redis-py, no timeout"
        for name in VARIANTS:
            rs = [next(r for r in run if (r.variant, r.shape) == (name, shape)) for run in runs]
            bases = [next(r for r in run if (r.variant, r.shape) == (floor, shape)) for run in runs]
            out.setdefault(shape, {})[name] = {
                "cpu_us": spread([r.cpu_us for r in rs]),
                "wall_us": spread([r.wall_us for r in rs]),
                "tasks_per_call": rs[0].tasks_per_call,
                "cpu_ratio": spread([r.cpu_us / b.cpu_us for r, b in zip(rs, bases, strict=True)]),
            }
    return out


def render(report: dict[str, Any]) -> str:
    c, n = report["config"], report["config"]["repeat"]

    def f(s: dict[str, float], digits: int = 1) -> str:
        text = f"{s['median']:.{digits}f}"
        return text + (f" [{s['min']:.{digits}f}-{s['max']:.{digits}f}]" if n > 1 else "")

    lines = [
        f"memstream deadlines benchmark (source {report['source']})",
        f"  Redis {report['redis']['version']} at {report['redis']['url']}; redis-py "
        f"{report['redis_py']}, Python {report['machine']['python']}; load average "
        f"{report['machine']['loadavg_start']} -> {report['machine']['loadavg_end']}",
        f"  {c['calls']:,} commands, {c['calls'] // c['pipeline']:,} pipelines of "
        f"{c['pipeline']} GETs per variant and round; timeout {TIMEOUT}s; median of {n}",
        "",
        f"{'shape':<10}{'variant':<38}{'CPU us/call':>24}{'wall us/call':>26}"
        f"{'Tasks/call':>12}{'CPU vs none':>22}",
    ]
    for shape, variants in report["summary"].items():
        for name, e in variants.items():
            lines.append(
                f"{shape:<10}{name:<38}{f(e['cpu_us']):>24}{f(e['wall_us']):>26}"
                f"{e['tasks_per_call']:>12.1f}{f(e['cpu_ratio'], 2):>22}"
            )
    return "\n".join(lines)


async def run(opts: Options) -> dict[str, Any]:
    target = (
        RedisTarget(opts.redis_url, "", False)
        if opts.redis_url
        else RedisTarget.start(appendonly=False)
    )
    try:
        client = connect(target.url)
        try:
            info = await redis_info(client)
            await client.set("bench:deadline", "x" * 100)
            load_start = load_average()
            runs = []
            for r in range(opts.repeat):
                log(f"[{r + 1}/{opts.repeat}] ...")
                runs.append(await one_round(target.url, opts))
            await client.delete("bench:deadline")
        finally:
            await client.aclose()
        return {
            "benchmark": "deadlines",
            "source": source_version(ROOT),
            "redis_py": redis.__version__,
            "config": {"calls": opts.calls, "pipeline": opts.pipeline, "repeat": opts.repeat},
            "redis": {"version": str(info.get("redis_version")), "url": describe(target.url)},
            "machine": {
                **machine_info(),
                "python": platform.python_version(),
                "loadavg_start": load_start,
                "loadavg_end": load_average(),
            },
            "summary": summarize(runs),
            "runs": [[asdict(r) for r in run] for run in runs],
        }
    finally:
        target.stop()


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="what a socket timeout costs per Redis call: redis-py's per-connection "
        "timeout, one asyncio.timeout per call, and memstream's client, against no timeout",
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--calls", type=int, default=20_000, help="commands per variant and round")
    p.add_argument("--pipeline", type=int, default=10, help="commands per pipeline (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--save", type=Path, help="also write the JSON report to this file")
    a = p.parse_args(argv)
    if min(a.calls, a.pipeline, a.repeat) < 1:
        p.error("--calls, --pipeline and --repeat must be at least 1")
    return Options(a.calls, a.pipeline, a.repeat, a.redis_url, a.json, a.save)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    report = asyncio.run(run(opts))
    emit(report, render, save=opts.save, as_json=opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
