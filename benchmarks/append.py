"""Append benchmark: memstream publish-to-applied against a plain RPUSH baseline, on one
Redis server, in one run. See benchmarks/README.md for the method and the figures.

    .venv/bin/python benchmarks/append.py --repeat 3
    .venv/bin/python benchmarks/append.py --redis-url redis://host:6379 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import (
    ClockOffset,
    Meter,
    RedisTarget,
    WorkerError,
    WorkerPool,
    calibrate,
    delete_keys,
    fresh_namespace,
    load_average,
    machine_info,
    now_ms,
    redis_info,
    source_version,
)
from pydantic import ValidationError
from report import (
    BrokenRunError,
    Result,
    add_report_arguments,
    emit,
    log,
    one_line,
    render,
    summarize,
)
from workload import (
    Item,
    chunks,
    drive,
    expected_counts,
    index_of,
    memory_key,
    message_for,
    plan,
    summary,
)

from events import AppendPayload, MemoryName, MessageAppended, Publisher, Receipt
from memory import MemoryRef, Message
from processors.appender import message_text
from processors.settings import Settings
from store import Keys, MemoryReader, RedisClient, Scripts, connect, describe

ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench"
WARMUP_TENANT = "bench-warmup"
RESOURCE = "customer-support"


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    memories: int
    batch: int
    producers: int
    workers: int
    partitions: int
    mode: str
    wait_messages: int
    wait_batch: int
    repeat: int
    rate: float
    content_bytes: int
    redis_url: str | None
    aof: bool
    timeout: float
    resources: Path
    json: bool
    save: Path | None = None
    worker_command: tuple[str, ...] = ()
    workflows: int = 0


@dataclass(frozen=True, slots=True)
class Scenario:
    system: str  # baseline | memstream
    label: str  # batched | single | wait
    batch: int
    messages: int
    wait: bool = False


def workflow_of(memory: int, workflows: int) -> str | None:
    """With --workflows K, the workflow that writes memory m: one of K, m mod K."""
    return f"wf-{memory % workflows:04d}" if workflows else None


# --- the baseline: RPUSH per memory, pipelined ----------------------------------------


async def run_baseline(opts: Options, url: str, scenario: Scenario) -> Result:
    prefix = fresh_namespace("bench-base")
    client = connect(url)
    lists = plan(scenario.messages, opts.memories, opts.producers)
    built = {item: message_for(item, opts.content_bytes) for items in lists for item in items}
    try:
        warm = client.pipeline(transaction=False)
        for i in range(100):
            warm.rpush(f"{prefix}:warmup", f"warmup {i}")
        await warm.execute()

        latencies: list[float] = []
        starts: list[float] = []
        ends: list[float] = []

        async def send(chunk: Sequence[Item]) -> None:
            texts = [
                (
                    f"{prefix}:{TENANT}/{RESOURCE}/{memory_key(item.memory)}",
                    message_text(
                        built[item],
                        workflow_id=workflow_of(item.memory, opts.workflows),
                        agent_id=None,
                    ),
                )
                for item in chunk
            ]
            t0 = now_ms()
            pipe = client.pipeline(transaction=False)
            for key, text in texts:
                pipe.rpush(key, text)
            await pipe.execute()
            t1 = now_ms()
            latencies.extend([t1 - t0] * len(chunk))
            starts.append(t0)
            ends.append(t1)

        meter = Meter(client)
        before = await meter.snapshot()
        await drive(lists, scenario.batch, opts.rate, send)
        usage = meter.usage(before, await meter.snapshot(), scenario.messages)

        expected = expected_counts(scenario.messages, opts.memories)
        problems: list[str] = []
        for m, count in enumerate(expected):
            key = f"{prefix}:{TENANT}/{RESOURCE}/{memory_key(m)}"
            stored = await client.lrange(key, 0, -1)
            got = [index_of(json.loads(text)["content"]) for text in stored]
            if got != list(range(count)):
                problems.append(f"{key}: {len(got)} messages, expected {count} in order")
        if problems:
            raise BrokenRunError("baseline: " + "; ".join(problems[:5]))

        duration_ms = max(ends) - min(starts)
        return Result(
            system="baseline",
            label=scenario.label,
            batch=scenario.batch,
            messages=scenario.messages,
            throughput=scenario.messages / (duration_ms / 1000),
            duration_s=duration_ms / 1000,
            publish_rate=scenario.messages / (duration_ms / 1000),
            latency_ms=summary(latencies),
            cpu_us_per_msg=usage.cpu_us_per_msg,
            redis_calls_per_msg=usage.redis_calls_per_msg,
            redis_top_calls=usage.redis_top_calls,
            background_cores=usage.background_cores,
            redis_bytes_per_msg=usage.redis_bytes_per_msg,
            checked=f"{opts.memories} lists hold exactly their messages, in order",
        )
    finally:
        with contextlib.suppress(Exception):
            await delete_keys(client, f"{prefix}:*")
        await client.aclose()


# --- memstream: publisher SDK -> ingest:{p} -> appender worker processes ------------------


def event_for(
    tenant: str, item: Item, message: Message, workflow_id: str | None = None
) -> MessageAppended:
    return MessageAppended(
        tenant=tenant,
        payload=AppendPayload(
            memory=MemoryName(resource=RESOURCE, key=memory_key(item.memory)),
            message=message,
            workflow_id=workflow_id,
        ),
    )


async def warm_up(publisher: Publisher, messages: int, timeout: float, workflows: int) -> None:
    """Publish to other memories (tenant bench-warmup) and wait until they are applied,
    so the timed run starts with warm connections, caches and code paths."""
    items = [Item(i % 16, i // 16) for i in range(messages)]
    receipts: list[Receipt] = []
    for chunk in chunks(items, 100):
        events = [
            event_for(
                WARMUP_TENANT, item, message_for(item, 64), workflow_of(item.memory, workflows)
            )
            for item in chunk
        ]
        receipts += [p.receipt for p in await publisher.publish_many(events)]
    last: dict[int, Receipt] = {r.partition: r for r in receipts}
    for receipt in last.values():
        outcome = await publisher.wait_applied(receipt, timeout)
        if not outcome.ok:
            raise BrokenRunError(
                f"warm-up entry {receipt.token} was {outcome.status}: {outcome.reason}: "
                f"{outcome.detail}"
            )


async def wait_all_applied(
    client: RedisClient, keys: Keys, last: dict[int, str], timeout: float, pool: WorkerPool
) -> None:
    """Until the last entry published to each partition has an outcome (a partition is
    applied in stream order, so everything before it has one too)."""
    deadline = time.monotonic() + timeout
    left = dict(last)
    while left:
        pipe = client.pipeline(transaction=False)
        for p, entry in left.items():
            pipe.hexists(keys.outcomes(p, entry), entry)
        found = await pipe.execute()
        for p, done in zip(list(left), found, strict=True):
            if done:
                del left[p]
        if not left:
            return
        pool.check_alive()
        if time.monotonic() > deadline:
            raise BrokenRunError(
                f"partitions {sorted(left)} not applied within {timeout:g}s "
                f"(raise --timeout, or see the worker log:\n{pool.log_tail(0)})"
            )
        await asyncio.sleep(0.05)


async def verify_memstream(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    opts: Options,
    scenario: Scenario,
    published: dict[str, float],
) -> dict[str, int]:
    """Every memory holds exactly its messages, in publish order, each once; no dead
    letters. Returns the apply time ("at", Redis clock, ms) of every published entry."""
    reader = MemoryReader(client, scripts, keys)
    expected = expected_counts(scenario.messages, opts.memories)
    applied_at: dict[str, int] = {}
    problems: list[str] = []
    for m, count in enumerate(expected):
        ref = MemoryRef(TENANT, RESOURCE, memory_key(m))
        view = await reader.read(ref)
        got = [index_of(msg.content) for msg in view.messages]
        if view.count != count or got != list(range(count)):
            problems.append(
                f"{ref.memory_id}: count {view.count}, {len(got)} messages, expected {count}"
                f"{'' if got == sorted(got) else ' (out of order)'}"
            )
        for msg in view.messages:
            token = f"{view.partition}/{msg.entry}"
            if token in applied_at:
                problems.append(f"{ref.memory_id}: entry {token} stored twice")
            applied_at[token] = msg.at
    missing = set(published) - set(applied_at)
    extra = set(applied_at) - set(published)
    if missing or extra:
        problems.append(f"{len(missing)} published entries not stored, {len(extra)} unknown")
    pipe = client.pipeline(transaction=False)
    for p in range(opts.partitions):
        pipe.xlen(keys.dlq(p))
    letters = sum(int(n) for n in await pipe.execute())
    if letters:
        problems.append(f"{letters} dead letters")
    if problems:
        raise BrokenRunError("memstream: " + "; ".join(problems[:5]))
    return applied_at


def entry_order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class MemstreamProducers:
    """What the producers send through the SDK and when: the publish call's start for
    every entry, the partitions' last entries, and (with wait) what the SDK saw."""

    def __init__(
        self,
        publisher: Publisher,
        built: dict[Item, Message],
        wait: bool,
        timeout: float,
        workflows: int = 0,
    ) -> None:
        self.publisher = publisher
        self.built = built
        self.workflows = workflows
        self.wait = wait
        self.timeout = timeout
        self.published: dict[str, float] = {}  # "<partition>/<entry id>" -> call start
        self.last_entry: dict[int, str] = {}
        self.calls: list[tuple[float, float, list[str]]] = []  # wait: start, end, tokens
        self.starts: list[float] = []
        self.ends: list[float] = []

    async def send(self, chunk: Sequence[Item]) -> None:
        events = [
            event_for(TENANT, item, self.built[item], workflow_of(item.memory, self.workflows))
            for item in chunk
        ]
        t0 = now_ms()
        results = await self.publisher.publish_many(events, wait=self.wait, timeout=self.timeout)
        t1 = now_ms()
        self.starts.append(t0)
        self.ends.append(t1)
        for r in results:
            self.published[r.receipt.token] = t0
            p, entry = r.receipt.partition, r.receipt.entry_id
            self.last_entry[p] = max(self.last_entry.get(p, "0-0"), entry, key=entry_order)
            if self.wait and (r.outcome is None or not r.outcome.ok):
                raise BrokenRunError(f"entry {r.receipt.token}: {r.outcome}")
        if self.wait:
            self.calls.append((t0, t1, [r.receipt.token for r in results]))

    def sdk_latencies(self) -> list[float]:
        """Per message: publish(wait=True) call start -> the call returned."""
        return [t1 - t0 for t0, t1, tokens in self.calls for _ in tokens]

    def wait_overheads(self, applied_at: dict[str, int], clock: ClockOffset) -> list[float]:
        """Per call: returned - the last of its messages applied (both Redis clock)."""
        return [
            clock.to_server(t1) - (max(applied_at[t] for t in tokens) + 0.5)
            for _, t1, tokens in self.calls
        ]

    def publish_rate(self) -> float:
        return len(self.published) / ((max(self.ends) - min(self.starts)) / 1000)


async def run_memstream(opts: Options, url: str, scenario: Scenario, log_dir: Path) -> Result:
    namespace = fresh_namespace("bench")
    keys = Keys(namespace)
    pool = WorkerPool(
        url, namespace, opts.resources, opts.partitions, opts.workers, log_dir, opts.worker_command
    )
    client = connect(url)
    lists = plan(scenario.messages, opts.memories, opts.producers)
    built = {item: message_for(item, opts.content_bytes) for items in lists for item in items}
    pool.start()
    try:
        await pool.wait_ready(client)
        scripts = Scripts(client)
        await scripts.load()
        publisher = Publisher(client, keys=keys, scripts=scripts)
        if await publisher.partitions() != opts.partitions:
            raise BrokenRunError("the workers stored another partition count")
        warmup = min(1000, max(100, scenario.messages // 10))
        await warm_up(publisher, warmup, opts.timeout, opts.workflows)
        producers = MemstreamProducers(
            publisher, built, scenario.wait, opts.timeout, opts.workflows
        )

        clock = await calibrate(client)
        meter = Meter(client, pool)
        before = await meter.snapshot()
        await drive(lists, scenario.batch, opts.rate, producers.send)
        await wait_all_applied(client, keys, producers.last_entry, opts.timeout, pool)
        usage = meter.usage(before, await meter.snapshot(), scenario.messages)
        clock_after = await calibrate(client)
        pool.check_alive()

        published = producers.published
        applied_at = await verify_memstream(client, scripts, keys, opts, scenario, published)
        # "at" is the Redis clock in whole ms (floored) when the apply script started:
        # +0.5 is the middle of that millisecond.
        latencies = [applied_at[tok] + 0.5 - clock.to_server(t0) for tok, t0 in published.items()]
        duration_ms = max(applied_at.values()) + 0.5 - clock.to_server(min(producers.starts))
        return Result(
            system="memstream",
            label=scenario.label,
            batch=scenario.batch,
            messages=scenario.messages,
            throughput=scenario.messages / (duration_ms / 1000),
            duration_s=duration_ms / 1000,
            publish_rate=producers.publish_rate(),
            latency_ms=summary(latencies),
            sdk_latency_ms=summary(producers.sdk_latencies()) if scenario.wait else None,
            wait_overhead_ms=(
                summary(producers.wait_overheads(applied_at, clock)) if scenario.wait else None
            ),
            cpu_us_per_msg=usage.cpu_us_per_msg,
            redis_calls_per_msg=usage.redis_calls_per_msg,
            redis_top_calls=usage.redis_top_calls,
            background_cores=usage.background_cores,
            redis_bytes_per_msg=usage.redis_bytes_per_msg,
            clock={
                "rtt_ms": round(clock.rtt_ms, 3),
                "drift_ms": round(clock_after.offset_ms - clock.offset_ms, 3),
            },
            checked=(
                f"{opts.memories} memories hold exactly their messages, in order, each once; "
                f"no dead letters"
            ),
        )
    finally:
        pool.stop()
        with contextlib.suppress(Exception):
            await delete_keys(client, f"{namespace}:*")
        await client.aclose()


# --- the run --------------------------------------------------------------------------


def scenarios(opts: Options) -> list[Scenario]:
    """Each memstream scenario right after the baseline with the same batch size."""
    out: list[Scenario] = []
    labels = {"all": ["batched", "single", "wait"], "batched": ["batched"]}.get(
        opts.mode, [opts.mode]
    )
    sizes = {"batched": opts.batch, "single": 1, "wait": opts.wait_batch}
    if opts.batch == 1 and "single" in labels and "batched" in labels:
        labels.remove("batched")
    if opts.wait_messages < 1 and "wait" in labels:
        labels.remove("wait")
    for label in labels:
        batch, wait = sizes[label], label == "wait"
        messages = opts.wait_messages if wait else opts.messages
        if not any(s.system == "baseline" and s.batch == batch for s in out):
            out.append(Scenario("baseline", label, batch, messages))
        out.append(Scenario("memstream", label, batch, messages, wait=wait))
    return out


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
        runs: list[list[Result]] = []
        plan_ = scenarios(opts)
        for r in range(opts.repeat):
            results: list[Result] = []
            for s in plan_:
                log(f"[{r + 1}/{opts.repeat}] {s.system} {s.label} (batch {s.batch}) ...")
                if s.system == "baseline":
                    result = await run_baseline(opts, target.url, s)
                else:
                    result = await run_memstream(opts, target.url, s, log_dir)
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
        choices=["all", "batched", "single", "wait"],
        default="all",
        help="batched: --batch messages per publish; single: one message per publish; wait: "
        "--wait-batch messages per publish(wait=True), read-your-writes; all (default): the three",
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
    if a.memories < a.producers:
        p.error("--memories must be at least --producers (each producer owns its memories)")
    return Options(
        messages=a.messages,
        memories=a.memories,
        batch=a.batch,
        producers=a.producers,
        workers=a.workers,
        partitions=a.partitions,
        mode=a.mode,
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
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    try:
        settings = Settings(partitions=opts.partitions, resources=str(opts.resources))
    except ValidationError as e:
        log(f"the appender processes would refuse these MEMSTREAM_* settings: {e}")
        return 2
    try:
        report = asyncio.run(run(opts, settings))
    except (BrokenRunError, WorkerError) as e:
        log(f"broken run, no figures: {e}")
        return 2
    emit(report, render, save=opts.save, as_json=opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
