"""Append benchmark: memstream publish-to-applied against a plain RPUSH baseline, on one
Redis server, in one run. See benchmarks/README.md for the method and the figures.

    .venv/bin/python benchmarks/append.py --repeat 3
    .venv/bin/python benchmarks/append.py --redis-url redis://host:6379 --json
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from baseline import run_baseline
from harness import (
    ClockOffset,
    RedisTarget,
    WorkerError,
    calibrate,
    load_average,
    machine_info,
    redis_info,
    source_version,
)
from peer import missing as peer_missing
from peer import run_peer
from pydantic import ValidationError
from report import (
    BrokenRunError,
    Result,
    add_report_arguments,
    cross_ratios,
    emit,
    log,
    one_line,
    render,
    summarize,
)
from scenario import MODES, RESOURCE, ROOT, TENANT, Options, Scenario, scenarios, workflow_of
from sdk import event_for, run_memstream, warm_up

from memory import ResourceRegistry
from processors.settings import Settings
from store import connect, describe

#: What other benchmarks import from here.
__all__ = ["RESOURCE", "TENANT", "Options", "Scenario", "event_for", "warm_up", "workflow_of"]


async def run_one(opts: Options, url: str, s: Scenario, log_dir: Path) -> Result:
    if s.system == "baseline":
        return await run_baseline(opts, url, s)
    if s.system == "memstream":
        return await run_memstream(opts, url, s, log_dir)
    return await run_peer(opts, url, s)


async def run(opts: Options, settings: Settings) -> dict[str, Any]:
    """Every scenario, ``--repeat`` times, on one server; the report. ``settings`` are
    what the appender processes will read from the same environment."""
    target = (
        RedisTarget(opts.redis_url, "", False)
        if opts.redis_url
        else RedisTarget.start(appendonly=opts.aof)
    )
    log_dir = Path(tempfile.mkdtemp(prefix="memstream-bench-logs-"))
    try:
        client = connect(target.url)
        try:
            info = await redis_info(client)
            offset: ClockOffset = await calibrate(client)
        finally:
            await client.aclose()
        target.version = str(info.get("redis_version", target.version))
        load_start = load_average()
        peers: dict[str, str] = {}
        if opts.peer and (why := peer_missing()):
            peers[opts.peer] = why
            log(f"peer {opts.peer}: {why}")
            opts = replace(opts, peer=None)
        elif opts.peer:
            peers[opts.peer] = (
                f"RedisChatMessageHistory, one per memory, add_message per message from "
                f"{opts.producers} threads; key TTL {opts.peer_ttl or 'none'} s"
            )
        runs: list[list[Result]] = []
        plan_ = scenarios(opts)
        for r in range(opts.repeat):
            results: list[Result] = []
            for s in plan_:
                log(f"[{r + 1}/{opts.repeat}] {s.system} {s.label} (batch {s.batch}) ...")
                result = await run_one(opts, target.url, s, log_dir)
                log(f"    {one_line(result)}")
                results.append(result)
            runs.append(results)
        report: dict[str, Any] = {
            "benchmark": "append",
            "source": source_version(ROOT),
            "config": {
                "messages": opts.messages,
                "memories": opts.memories,
                "batch": opts.batch,
                "producers": opts.producers,
                "workers": opts.workers,
                "partitions": opts.partitions,
                "appender_batch": settings.batch_size,
                "appender_block_s": settings.block,
                "content_bytes": opts.content_bytes,
                "wait_messages": opts.wait_messages,
                "wait_batch": opts.wait_batch,
                "rate": opts.rate,
                "workflows": opts.workflows,
                "modes": list(opts.modes),
                "scale_workers": opts.scale_workers,
                "peer_ttl_s": opts.peer_ttl,
                "open_loop": opts.rate > 0,
                "repeat": opts.repeat,
                "tenant": TENANT,
                "resource": RESOURCE,
            },
            "redis": {
                "version": target.version,
                "url": describe(target.url),
                "temporary": target.started,
                "binary": target.binary,
                "aof": opts.aof if target.started else None,
                "clock_rtt_ms": round(offset.rtt_ms, 3),
            },
            "machine": {
                **machine_info(),
                "loadavg_start": load_start,
                "loadavg_end": load_average(),
            },
            "summary": summarize(runs),
            "ratios": cross_ratios(runs),
            "peers": peers,
            "runs": [[asdict(r) for r in results] for results in runs],
        }
    except BaseException:
        log(f"appender worker logs kept in {log_dir}")
        raise
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    finally:
        target.stop()
    return report


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="memstream publish-to-applied throughput and latency against a plain "
        "RPUSH baseline, on one Redis server",
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--messages", type=int, default=20_000, help="N messages (default 20000)")
    p.add_argument("--memories", type=int, default=200, help="M memories (default 200)")
    p.add_argument("--batch", type=int, default=100, help="messages per publish (default 100)")
    p.add_argument("--producers", type=int, default=4, help="concurrent producers (default 4)")
    p.add_argument("--workers", type=int, default=1, help="appender processes (default 1)")
    p.add_argument("--partitions", type=int, default=16, help="partition count (default 16)")
    p.add_argument(
        "--mode",
        default="all",
        help="batched: --batch messages per publish; single: one message per publish; wait: "
        "--wait-batch messages per publish(wait=True), read-your-writes; several with commas "
        "(single,wait); all (default): the three",
    )
    p.add_argument(
        "--scale-workers",
        type=int,
        default=0,
        help="N > 0: run batched memstream once more with N appender workers, right after "
        "the first, and report the throughput ratio (default 0: no)",
    )
    p.add_argument(
        "--peer",
        choices=["none", "langchain"],
        default="none",
        help="langchain: the batched scenario's messages through langchain-community's "
        "RedisChatMessageHistory too (skipped, with a note, when it is not installed)",
    )
    p.add_argument(
        "--peer-ttl",
        type=int,
        default=None,
        help="the peer's key TTL in seconds, 0 for none (default: the resource's TTL, as "
        "memstream keeps its memories)",
    )
    p.add_argument(
        "--wait-messages", type=int, default=2000, help="N of the wait scenario (default 2000)"
    )
    p.add_argument(
        "--wait-batch", type=int, default=1, help="messages per publish in the wait scenario"
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of every scenario (default 1)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="offered load, messages/s over all producers (default 0: as fast as they can)",
    )
    p.add_argument("--content-bytes", type=int, default=200, help="message size (default 200)")
    p.add_argument(
        "--workflows",
        type=int,
        default=0,
        help="K > 0: every message carries workflow_id, one of K (memory m: workflow m mod K), "
        "so the appender tracks each memory's writer (default 0: no workflow id)",
    )
    p.add_argument("--aof", action="store_true", help="temporary server with appendonly yes")
    p.add_argument("--timeout", type=float, default=300.0, help="longest wait for the appender")
    add_report_arguments(p, ROOT / "memories")
    p.add_argument(
        "--worker-command",
        default="",
        help="command that runs `memstream` for the workers, e.g. to profile them: "
        "'python -m cProfile -o w.prof -m processors.cli' (default: the venv's memstream)",
    )
    a = p.parse_args(argv)
    for name in (
        "messages",
        "memories",
        "batch",
        "producers",
        "workers",
        "partitions",
        "repeat",
        "wait_batch",
    ):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.workflows < 0:
        p.error("--workflows must be at least 0")
    modes = MODES if a.mode == "all" else tuple(m.strip() for m in a.mode.split(","))
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--mode must be all or some of {', '.join(MODES)}, separated by commas")
    if a.scale_workers < 0:
        p.error("--scale-workers must be at least 0")
    if a.memories < a.producers:
        p.error("--memories must be at least --producers (each producer owns its memories)")
    return Options(
        messages=a.messages,
        memories=a.memories,
        batch=a.batch,
        producers=a.producers,
        workers=a.workers,
        partitions=a.partitions,
        modes=modes,
        wait_messages=a.wait_messages,
        wait_batch=a.wait_batch,
        repeat=a.repeat,
        rate=a.rate,
        content_bytes=a.content_bytes,
        redis_url=a.redis_url,
        aof=a.aof,
        timeout=a.timeout,
        resources=a.resources.resolve(),
        json=a.json,
        save=a.save,
        worker_command=tuple(shlex.split(a.worker_command)),
        workflows=a.workflows,
        scale_workers=a.scale_workers,
        peer=None if a.peer == "none" else a.peer,
        peer_ttl=-1 if a.peer_ttl is None else a.peer_ttl,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    try:
        settings = Settings(partitions=opts.partitions, resources=str(opts.resources))
    except ValidationError as e:
        log(f"the appender processes would refuse these MEMSTREAM_* settings: {e}")
        return 2
    if opts.peer_ttl < 0:
        resource = ResourceRegistry.load(settings.resource_paths()).find(RESOURCE)
        ttl = resource.ttl_ms // 1000 if resource is not None else 0
        opts = replace(opts, peer_ttl=ttl)
    try:
        report = asyncio.run(run(opts, settings))
    except (BrokenRunError, WorkerError) as e:
        log(f"broken run, no figures: {e}")
        return 2
    emit(report, render, save=opts.save, as_json=opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
