"""Read benchmark: ``MemoryReader.read_context`` (the newest window of a memory within a
token budget) against a bare ``LRANGE`` of the same messages stored as a plain Redis
list, on the same server and the same client, in one run. See benchmarks/README.md for
the method and the figures.

    .venv/bin/python benchmarks/read.py --repeat 3
    .venv/bin/python benchmarks/read.py --calls 200 --large 2000     # a quick check

Once per invocation (not timed): publish two memories of ``customer-support``, one of
--messages (500) and one of --large (10,000) messages, each opening with a system
message (protected, so always older than the window), apply them with an appender
worker and count them with an accountant worker (both in this process, run until
idle), and copy each memory's stored messages, as stored, into a plain list. Then, per
repeat and per memory, time --calls reads of each system one after the other (the order
alternates between repeats): ``LRANGE list 0 -1`` and ``read_context(budget=--budget)``.
Every window is checked against what the budget rules give over the whole memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import (
    Meter,
    RedisTarget,
    delete_keys,
    fresh_namespace,
    load_average,
    machine_info,
    percentile,
    redis_info,
    source_version,
)
from report import BrokenRunError, add_report_arguments, finish, log, spread
from workload import Item, message_for

from events import AppendPayload, MemoryName, MessageAppended, Publisher
from memory import MemoryRef, MemoryResource, Message, ResourceRegistry, Role
from memory.flush import Counted, Priorities, fit_budget
from memory.tokens import TokenCounter
from processors import Appender, Processor, Settings, Worker
from processors.accountant import Accountant
from processors.tokenizers import Tokenizers
from store import (
    Accounts,
    Keys,
    MemoryReader,
    MemoryStore,
    RedisClient,
    Scripts,
    connect,
    describe,
    ensure_partitions,
)

ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench"
RESOURCE = "customer-support"
PUBLISH_CHUNK = 500  # events per publish_many while building (not timed)
SYSTEM = "You are the support agent of Acme. Be brief, be kind, never promise refunds."


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    large: int
    budget: int
    calls: int
    warmup: int
    content_bytes: int
    partitions: int
    touch: bool
    repeat: int
    redis_url: str | None
    aof: bool
    timeout: float
    resources: Path
    json: bool
    save: Path | None = None


# --- the data: what the processors store -----------------------------------------------


def messages_of(n: int, content_bytes: int) -> list[Message]:
    """A system message, then n - 1 user and assistant messages in turn."""
    return [
        Message(role=Role.SYSTEM, content=SYSTEM),
        *(message_for(Item(0, i), content_bytes) for i in range(1, n)),
    ]


async def run_until_idle(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    processor: Processor,
    settings: Settings,
    name: str,
    timeout: float,
) -> None:
    worker = Worker(
        client, scripts, keys, processor, settings.partitions, settings.worker_config(), name
    )
    async with asyncio.timeout(timeout):
        await worker.run(asyncio.Event(), until_idle=True)


async def build(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    opts: Options,
    settings: Settings,
    registry: ResourceRegistry,
    tokenizers: Tokenizers,
    sizes: dict[str, int],
) -> dict[str, str]:
    """Publish, apply and count every memory; copy each one's stored messages into a
    plain list. The list key of each memory."""
    if await ensure_partitions(client, keys, opts.partitions) != opts.partitions:
        raise BrokenRunError("the namespace holds another partition count")
    publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=opts.partitions)
    for label, n in sizes.items():
        events = [
            MessageAppended(
                tenant=TENANT,
                idempotency_key=f"{label}-{i}",
                payload=AppendPayload(memory=MemoryName(resource=RESOURCE, key=label), message=m),
            )
            for i, m in enumerate(messages_of(n, opts.content_bytes))
        ]
        for i in range(0, len(events), PUBLISH_CHUNK):
            await publisher.publish_many(events[i : i + PUBLISH_CHUNK])
    store = MemoryStore(scripts, keys, settings.retention())
    appender = Appender(
        store, keys, registry, opts.partitions, max_event_bytes=settings.max_event_bytes
    )
    accountant = Accountant(Accounts(client, scripts, keys), registry, tokenizers)
    for name, processor in (("bench-appender", appender), ("bench-accountant", accountant)):
        await run_until_idle(client, scripts, keys, processor, settings, name, opts.timeout)
    reader = MemoryReader(client, scripts, keys)
    lists: dict[str, str] = {}
    for label, n in sizes.items():
        view = await reader.read(ref_of(label))
        if view.count != n or len(view.messages) != n or view.counted != n:
            raise BrokenRunError(
                f"{label}: {view.count} messages, {view.counted} counted, expected {n}"
            )
        k = keys.memory(view.partition, ref_of(label).memory_id)
        texts = await client.zrange(k.log, 0, -1)
        lists[label] = f"{keys.namespace}:baseline:{{{view.partition}}}:{label}"
        for i in range(0, len(texts), 1000):
            await client.rpush(lists[label], *texts[i : i + 1000])
    return lists


def ref_of(label: str) -> MemoryRef:
    return MemoryRef(TENANT, RESOURCE, label)


async def expected_window(
    reader: MemoryReader,
    ref: MemoryRef,
    resource: MemoryResource,
    counter: TokenCounter,
    budget: int,
) -> tuple[list[int], int, bool]:
    """The window the budget rules give over the whole memory: sequences, tokens, over."""
    view = await reader.read(ref)
    entries = [
        Counted(m, c if c is not None else counter.message(m))
        for m, c in zip(view.messages, view.token_counts, strict=True)
    ]
    chosen, over = fit_budget(entries, budget, Priorities(resource.priority))
    return [e.seq for e in chosen], sum(e.tokens for e in chosen), over


# --- timing ---------------------------------------------------------------------------------


@dataclass
class Block:
    """``calls`` timed calls of one system on one memory."""

    system: str  # memstream | baseline
    memory: str
    stored: int  # messages in the memory
    calls: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_us: float | None  # per call, this process (touches included)
    redis_cpu_us: float | None  # per call
    commands: float  # per call, as Redis counts them (inside scripts too)
    top_commands: dict[str, int]
    background_cores: float | None
    returned: int  # messages a call returns
    read: int  # messages a call reads from the memory (read_context: ContextWindow.read)


async def timed_block(
    meter: Meter,
    system: str,
    memory: str,
    stored: int,
    opts: Options,
    call: Callable[[], Awaitable[tuple[int, int]]],
    settle: Callable[[], Awaitable[None]],
) -> Block:
    for _ in range(opts.warmup):
        await call()
    await settle()
    gc.collect()
    before = await meter.snapshot()
    latencies: list[float] = []
    returned = read = 0
    for _ in range(opts.calls):
        started = time.perf_counter()
        returned, read = await call()
        latencies.append((time.perf_counter() - started) * 1000)
    await settle()  # the use records of read_context: part of what its reads cost
    usage = Meter.usage(before, await meter.snapshot(), opts.calls)
    latencies.sort()
    cpu = usage.cpu_us_per_msg
    return Block(
        system=system,
        memory=memory,
        stored=stored,
        calls=opts.calls,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        mean_ms=sum(latencies) / len(latencies),
        client_cpu_us=cpu["producer"],
        redis_cpu_us=cpu["redis"],
        commands=usage.redis_calls_per_msg,
        top_commands=usage.redis_top_calls,
        background_cores=usage.background_cores,
        returned=returned,
        read=read,
    )


@dataclass
class Run:
    order: str
    blocks: list[Block]
    ratios: dict[str, float]  # p50 ratios of this run


async def one_run(
    opts: Options,
    client: RedisClient,
    reader: MemoryReader,
    resource: MemoryResource,
    counter: TokenCounter,
    sizes: dict[str, int],
    lists: dict[str, str],
    expected: dict[str, tuple[list[int], int, bool]],
    baseline_first: bool,
) -> Run:
    meter = Meter(client)
    blocks: dict[tuple[str, str], Block] = {}
    for label, n in sizes.items():
        ref = ref_of(label)

        async def lrange(key: str = lists[label]) -> tuple[int, int]:
            found = await client.lrange(key, 0, -1)
            return len(found), len(found)

        async def context(ref: MemoryRef = ref) -> tuple[int, int]:
            window = await reader.read_context(
                ref, resource, counter, budget=opts.budget, touch=opts.touch
            )
            # What the read took from the memory's log (a source from before
            # ContextWindow.read had it read the whole memory: its view).
            return len(window.messages), getattr(window, "read", len(window.view.messages))

        async def nothing() -> None:
            return None

        window = await reader.read_context(ref, resource, counter, budget=opts.budget, touch=False)
        seqs, tokens, over = expected[label]
        if (
            [m.seq for m in window.messages] != seqs
            or window.tokens != tokens
            or window.over_budget != over
        ):
            raise BrokenRunError(
                f"{label}: read_context returned {[m.seq for m in window.messages]} "
                f"({window.tokens} tokens), the budget rules give {seqs} ({tokens} tokens)"
            )
        systems: list[
            tuple[str, Callable[[], Awaitable[tuple[int, int]]], Callable[[], Awaitable[None]]]
        ] = [
            ("baseline", lrange, nothing),
            ("memstream", context, reader.touches_done),
        ]
        if not baseline_first:
            systems.reverse()
        for system, call, settle in systems:
            blocks[(system, label)] = await timed_block(meter, system, label, n, opts, call, settle)
    small, large = list(sizes)
    rc = {label: blocks[("memstream", label)].p50_ms for label in sizes}
    lr = {label: blocks[("baseline", label)].p50_ms for label in sizes}
    return Run(
        order="baseline first" if baseline_first else "memstream first",
        blocks=list(blocks.values()),
        ratios={
            "small": rc[small] / lr[small],
            "large": rc[large] / lr[large],
            "large_vs_small_baseline": rc[large] / lr[small],
            "growth": rc[large] / rc[small],
        },
    )


# --- the run, the report --------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Median and range over the repeats; ratios are taken per run, then summarized."""
    out: dict[str, Any] = {"blocks": {}, "ratios": {}}
    for b in runs[0].blocks:
        found = [
            next(x for x in r.blocks if (x.system, x.memory) == (b.system, b.memory)) for r in runs
        ]
        out["blocks"][f"{b.system}:{b.memory}"] = {
            "system": b.system,
            "memory": b.memory,
            "stored": b.stored,
            "returned": b.returned,
            "read": b.read,
            **{
                key: spread([float(getattr(x, key)) for x in found if getattr(x, key) is not None])
                for key in (
                    "p50_ms",
                    "p99_ms",
                    "mean_ms",
                    "client_cpu_us",
                    "redis_cpu_us",
                    "commands",
                )
            },
        }
    for key in runs[0].ratios:
        out["ratios"][key] = spread([r.ratios[key] for r in runs])
    out["background_cores"] = [[b.background_cores for b in r.blocks] for r in runs]
    return out


async def run(opts: Options) -> dict[str, Any]:
    settings = Settings(partitions=opts.partitions, resources=str(opts.resources))
    registry = ResourceRegistry.load(settings.resource_paths())
    resource = registry.find(RESOURCE)
    if resource is None:
        raise BrokenRunError(f"no {RESOURCE} resource in {opts.resources}")
    tokenizers = Tokenizers()
    counter = tokenizers.for_resource(resource)
    sizes = {f"read-{opts.messages}": opts.messages, f"read-{opts.large}": opts.large}
    target = (
        RedisTarget(opts.redis_url, "", False)
        if opts.redis_url
        else RedisTarget.start(appendonly=opts.aof)
    )
    keys = Keys(fresh_namespace("bench-rd"))
    runs: list[Run] = []
    try:
        client = connect(target.url)
        try:
            info = await redis_info(client)
            target.version = str(info.get("redis_version", target.version))
            scripts = Scripts(client)
            await scripts.load()
            counts = ", ".join(f"{n:,}" for n in sizes.values())
            log(f"building memories of {counts} messages (not timed) ...")
            lists = await build(client, scripts, keys, opts, settings, registry, tokenizers, sizes)
            reader = MemoryReader(client, scripts, keys)
            expected = {
                label: await expected_window(reader, ref_of(label), resource, counter, opts.budget)
                for label in sizes
            }
            load_start = load_average()
            for r in range(opts.repeat):
                log(f"[{r + 1}/{opts.repeat}] {opts.calls:,} calls per system and memory ...")
                result = await one_run(
                    opts, client, reader, resource, counter, sizes, lists, expected, r % 2 == 0
                )
                log(f"    {one_line(result)}")
                runs.append(result)
        finally:
            with contextlib.suppress(Exception):
                await delete_keys(client, f"{keys.namespace}:*")
            await client.aclose()
    finally:
        target.stop()
    return {
        "benchmark": "read",
        "source": source_version(ROOT),
        "config": {
            "messages": opts.messages,
            "large": opts.large,
            "budget": opts.budget,
            "calls": opts.calls,
            "warmup": opts.warmup,
            "content_bytes": opts.content_bytes,
            "partitions": opts.partitions,
            "touch": opts.touch,
            "repeat": opts.repeat,
            "tenant": TENANT,
            "resource": RESOURCE,
            "window": {label: len(expected[label][0]) for label in sizes},
        },
        "redis": {
            "version": target.version,
            "url": describe(target.url),
            "temporary": target.started,
            "binary": target.binary,
            "aof": opts.aof if target.started else None,
        },
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_average()},
        "summary": summarize(runs),
        "runs": [asdict(r) for r in runs],
    }


def one_line(r: Run) -> str:
    parts = [f"{b.system} {b.memory} p50 {b.p50_ms:.3f} ms" for b in r.blocks]
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in r.ratios.items())
    return f"{'; '.join(parts)}; ratios {ratios} ({r.order})"


def fmt(s: dict[str, float], digits: int, repeat: int) -> str:
    if repeat == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def render(report: dict[str, Any]) -> str:
    c, rd, mc, s = report["config"], report["redis"], report["machine"], report["summary"]
    k = c["repeat"]
    where = "temporary redis-server" if rd["temporary"] else "given server"
    aof = "" if rd["aof"] is None else (", AOF on" if rd["aof"] else ", AOF off")
    columns = [
        ("p50_ms", "p50 ms", 3),
        ("p99_ms", "p99 ms", 3),
        ("client_cpu_us", "client CPU us", 0),
        ("redis_cpu_us", "Redis CPU us", 0),
        ("commands", "commands", 1),
    ]
    lines = [
        f"memstream read benchmark (source {report['source']})",
        f"  Redis {rd['version']} ({where}{aof}) at {rd['url']}",
        f"  machine: {mc['cpus']} CPUs ({mc['cpu_model']}), {mc['platform']}, "
        f"Python {mc['python']}; load average {mc['loadavg_start']} -> {mc['loadavg_end']}",
        f"  memories of {c['messages']:,} and {c['large']:,} messages ({c['content_bytes']} B) of "
        f"{c['resource']}, a system message first; budget {c['budget']:,} tokens; "
        f"{c['calls']:,} calls per system and memory (after {c['warmup']} untimed), "
        f"touch {'on' if c['touch'] else 'off'}",
        f"  figures: median of {k} run(s)" + (" (min-max)" if k > 1 else "") + "; per call",
        "",
        f"{'':<22}{'returned':>10}{'read':>8}" + "".join(f"{t:>28}" for _, t, _ in columns),
    ]
    names = {"baseline": "LRANGE", "memstream": "read_context"}
    for b in s["blocks"].values():
        label = f"{names[b['system']]} {b['stored']:,}"
        lines.append(
            f"{label:<22}{b['returned']:>10,}{b['read']:>8,}"
            + "".join(f"{fmt(b[key], d, k):>28}" for key, _, d in columns)
        )
    r = s["ratios"]
    small, large = f"{c['messages']:,}", f"{c['large']:,}"
    lines += [
        "",
        "p50 ratios (per run, then the median):",
        f"  read_context {small} / LRANGE {small}: {fmt(r['small'], 2, k)}",
        f"  read_context {large} / LRANGE {large}: {fmt(r['large'], 3, k)}",
        f"  read_context {large} / LRANGE {small}: {fmt(r['large_vs_small_baseline'], 2, k)}",
        f"  read_context {large} / read_context {small}: {fmt(r['growth'], 2, k)}",
        "",
        "per run: order, CPUs kept busy by other processes (each block), Redis commands (top):",
    ]
    for i, run_ in enumerate(report["runs"]):
        lines.append(
            f"  run {i + 1} ({run_['order']}): background "
            f"{[b['background_cores'] for b in run_['blocks']]}"
        )
        for b in run_["blocks"]:
            lines.append(f"    {b['system']} {b['memory']}: {b['top_commands']}")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="memstream read_context against LRANGE of the same messages, on one Redis"
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--messages", type=int, default=500, help="the smaller memory (default 500)")
    p.add_argument("--large", type=int, default=10_000, help="the larger memory (default 10000)")
    p.add_argument("--budget", type=int, default=2000, help="tokens per context (default 2000)")
    p.add_argument("--calls", type=int, default=1000, help="timed calls per block (default 1000)")
    p.add_argument("--warmup", type=int, default=100, help="untimed calls first (default 100)")
    p.add_argument("--content-bytes", type=int, default=200, help="per message (default 200)")
    p.add_argument("--partitions", type=int, default=4, help="partition count (default 4)")
    p.add_argument(
        "--no-touch",
        dest="touch",
        action="store_false",
        help="read_context(touch=False): no use records for lru / lfu",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs, figures are medians (default 1)")
    p.add_argument("--aof", action="store_true", help="temporary server with appendonly yes")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for a worker")
    add_report_arguments(p, ROOT / "memories")
    a = p.parse_args(argv)
    for name in ("messages", "large", "budget", "calls", "partitions", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.large <= a.messages:
        p.error("--large must be more than --messages")
    return Options(
        messages=a.messages,
        large=a.large,
        budget=a.budget,
        calls=a.calls,
        warmup=max(0, a.warmup),
        content_bytes=a.content_bytes,
        partitions=a.partitions,
        touch=a.touch,
        repeat=a.repeat,
        redis_url=a.redis_url,
        aof=a.aof,
        timeout=a.timeout,
        resources=a.resources.resolve(),
        json=a.json,
        save=a.save,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    return finish(lambda: run(opts), render, save=opts.save, as_json=opts.json)


if __name__ == "__main__":
    sys.exit(main())
