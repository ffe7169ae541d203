"""Repartition benchmark: `memstream repartition N` (``Repartitioner.run``, what the
command runs) against the cheapest copy of the same keys that Redis offers (pipelined
DUMP and PTTL, then RESTORE and DEL), on the same server and the same data, in one run.
See benchmarks/README.md for the method and the figures.

    .venv/bin/python benchmarks/repartition.py --repeat 3
    .venv/bin/python benchmarks/repartition.py --memories 100 --messages 5   # a quick check

Per repeat, on a fresh namespace (none of this is timed): publish K messages to each of
M memories with ``Publisher.publish_many``, apply them with an appender worker and count
them with an accountant worker (both in this process, run until idle: they then release
their leases and leave), and copy the namespace, key by key, to a second namespace.
Then, one after the other (the order alternates between repeats), time memstream
repartitioning the first namespace from P to --to partitions, and the baseline moving,
in the copy, every key of the memories whose partition changes. Both are verified on a
sample of moved memories; any difference stops the run with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from harness import (
    Meter,
    RedisTarget,
    delete_keys,
    fresh_namespace,
    load_average,
    machine_info,
    redis_info,
    run_until_idle,
    source_version,
)
from redis.asyncio import Redis
from report import BrokenRunError, add_report_arguments, finish, log, spread
from workload import Item, memory_key, message_for

from events import AppendPayload, MemoryName, MessageAppended, Publisher
from memory import MemoryRef, ResourceRegistry, partition_for
from processors import Appender, Settings
from processors.accountant import Accountant
from processors.tokenizers import Tokenizers
from store import (
    Accounts,
    Keys,
    MemoryReader,
    MemoryStore,
    MemoryView,
    RedisClient,
    Repartitioned,
    Repartitioner,
    Scripts,
    connect,
    describe,
    ensure_partitions,
)

ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench"
RESOURCE = "customer-support"
CONTENT_BYTES = 200
PUBLISH_CHUNK = 500  # events per publish_many while building (not timed)
BATCH = 100  # keys per pipeline, in the baseline and in the copy of the namespace
SAMPLE = 50  # moved memories read back after each system ran
T = TypeVar("T")

#: One key and the name it gets.
Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Options:
    memories: int
    messages: int
    partitions: int
    to: int
    workflows: int
    repeat: int
    redis_url: str | None
    aof: bool
    timeout: float
    resources: Path
    json: bool
    save: Path | None = None


# --- the data: what the processors store -----------------------------------------------


def ref_of(m: int) -> MemoryRef:
    return MemoryRef(TENANT, RESOURCE, memory_key(m))


def events_for(opts: Options) -> list[MessageAppended]:
    """Message 0 of every memory, then message 1 of every memory, and so on; each with
    an idempotency key, and with --workflows, the workflow that writes the memory."""
    return [
        MessageAppended(
            tenant=TENANT,
            idempotency_key=f"{memory_key(m)}-{i}",
            payload=AppendPayload(
                memory=MemoryName(resource=RESOURCE, key=memory_key(m)),
                message=message_for(Item(m, i), CONTENT_BYTES),
                workflow_id=f"wf-{m % opts.workflows:04d}" if opts.workflows else None,
            ),
        )
        for i in range(opts.messages)
        for m in range(opts.memories)
    ]


async def build(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    opts: Options,
    settings: Settings,
    registry: ResourceRegistry,
    tokenizers: Tokenizers,
) -> None:
    """Publish every message, apply them (appender), count them (accountant)."""
    if await ensure_partitions(client, keys, opts.partitions) != opts.partitions:
        raise BrokenRunError("the namespace holds another partition count")
    publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=opts.partitions)
    events = events_for(opts)
    for i in range(0, len(events), PUBLISH_CHUNK):
        await publisher.publish_many(events[i : i + PUBLISH_CHUNK])
    store = MemoryStore(scripts, keys, settings.retention())
    appender = Appender(
        store, keys, registry, opts.partitions, max_event_bytes=settings.max_event_bytes
    )
    accountant = Accountant(Accounts(client, scripts, keys), registry, tokenizers)
    for name, processor in (("bench-appender", appender), ("bench-accountant", accountant)):
        await run_until_idle(client, scripts, keys, processor, settings, name, opts.timeout)


def moving_refs(opts: Options) -> list[MemoryRef]:
    """The memories whose partition changes from --partitions to --to."""
    refs = [ref_of(m) for m in range(opts.memories)]
    return [
        r
        for r in refs
        if partition_for(r.memory_id, opts.partitions) != partition_for(r.memory_id, opts.to)
    ]


def sample_of(refs: Sequence[MemoryRef]) -> list[MemoryRef]:
    """Up to SAMPLE memories, spread evenly over ``refs``."""
    step = max(1, len(refs) // SAMPLE)
    return list(refs[::step][:SAMPLE])


async def read_views(
    client: RedisClient, scripts: Scripts, keys: Keys, refs: Sequence[MemoryRef]
) -> dict[str, MemoryView]:
    """Each memory as a reader sees it (a new reader: it reads the stored count now)."""
    reader = MemoryReader(client, scripts, keys)
    return {r.memory_id: await reader.read(r) for r in refs}


async def check_built(
    client: RedisClient,
    scripts: Scripts,
    tool: Repartitioner,
    keys: Keys,
    opts: Options,
    sample: Sequence[MemoryRef],
) -> dict[str, MemoryView]:
    """The sample holds all its messages, each counted; no dead letters; nothing stops
    a repartition (no live worker, no lease, every stream drained). Returns the
    sample's views."""
    views = await read_views(client, scripts, keys, sample)
    problems = [
        f"{memory_id}: {len(v.messages)} messages, {v.counted} counted, expected {opts.messages}"
        for memory_id, v in views.items()
        if len(v.messages) != opts.messages or v.counted != opts.messages
    ]
    pipe = client.pipeline(transaction=False)
    for p in range(opts.partitions):
        pipe.xlen(keys.dlq(p))
    letters = sum(int(n) for n in await pipe.execute())
    if letters:
        problems.append(f"{letters} dead letters")
    problems += await tool.problems(opts.partitions, opts.to)
    if problems:
        raise BrokenRunError("the data set before the move: " + "; ".join(problems[:5]))
    return views


# --- copying keys: the baseline, and the copy of the namespace --------------------------


async def scan_names(raw: Redis, pattern: str) -> list[str]:
    return [name.decode() async for name in raw.scan_iter(match=pattern, count=1000)]


async def copy_keys(raw: Redis, pairs: Sequence[Pair], *, delete: bool) -> int:
    """Give each key its new name with its remaining TTL, BATCH keys at a time: one
    pipeline of DUMP and PTTL, then one of RESTORE (and with ``delete``, DEL of the old
    name). Returns how many keys were copied."""
    copied = 0
    for i in range(0, len(pairs), BATCH):
        batch = pairs[i : i + BATCH]
        read = raw.pipeline(transaction=False)
        for old, _ in batch:
            read.dump(old)
            read.pttl(old)
        replies = await read.execute()
        write = raw.pipeline(transaction=False)
        for (old, new), payload, ttl in zip(batch, replies[0::2], replies[1::2], strict=True):
            if payload is None:
                continue  # no such key
            write.restore(new, max(0, int(ttl)), payload, replace=True)
            if delete:
                write.delete(old)
            copied += 1
        await write.execute()
    return copied


async def copy_namespace(raw: Redis, source: str, target: str) -> int:
    """Every key of ``source`` under ``target`` instead (not timed)."""
    names = await scan_names(raw, f"{source}:*")
    return await copy_keys(raw, [(n, target + n[len(source) :]) for n in names], delete=False)


def memory_moves(names: Iterable[str], keys: Keys, to: int) -> list[Pair]:
    """The memory keys among ``names`` whose memory's partition changes under ``to``
    partitions, each with its name in the memory's new partition."""
    prefix = f"{keys.namespace}:m:{{"
    pairs: list[Pair] = []
    for name in names:
        p, _, rest = name.removeprefix(prefix).partition("}:")
        memory_id, _, kind = rest.rpartition(":")
        q = partition_for(memory_id, to)
        if q != int(p):
            pairs.append((name, getattr(keys.memory(q, memory_id), kind)))
    return pairs


async def move_baseline(raw: Redis, keys: Keys, to: int) -> list[Pair]:
    """The baseline, timed: find the memory keys (SCAN), then move those of the memories
    whose partition changes (DUMP, PTTL, RESTORE, DEL). Returns the keys it moved."""
    pairs = memory_moves(await scan_names(raw, f"{keys.namespace}:m:*"), keys, to)
    copied = await copy_keys(raw, pairs, delete=True)
    if copied != len(pairs):
        raise BrokenRunError(f"baseline: {len(pairs) - copied} keys vanished while moved")
    return pairs


async def key_contents(raw: Redis, names: Sequence[str]) -> list[tuple[Any, Any, bool]]:
    """Type, content and whether a TTL is set, of each key (a memory's keys are hashes
    and sorted sets)."""
    out: list[tuple[Any, Any, bool]] = []
    for name in names:
        kind = await raw.type(name)
        content: Any = None
        if kind == b"zset":
            content = await raw.zrange(name, 0, -1, withscores=True)
        elif kind == b"hash":
            content = sorted((await raw.hgetall(name)).items())
        out.append((kind, content, int(await raw.pttl(name)) > 0))
    return out


def sample_names(keys: Keys, refs: Sequence[MemoryRef], partitions: int) -> list[str]:
    """The names of the sample's keys under ``partitions`` partitions."""
    return [
        name
        for r in refs
        for name in keys.memory(partition_for(r.memory_id, partitions), r.memory_id).all()
    ]


# --- verification -----------------------------------------------------------------------


async def check_memstream(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    opts: Options,
    before: dict[str, MemoryView],
    done: Repartitioned,
    moving: int,
) -> None:
    """Moved and kept memories as expected; every sampled memory reads back identically
    from its new partition (but the watermark, reset by the move); the old keys are
    gone."""
    problems: list[str] = []
    if (done.moved, done.kept) != (moving, opts.memories - moving):
        problems.append(
            f"moved {done.moved} and kept {done.kept} memories, expected {moving} and "
            f"{opts.memories - moving}"
        )
    sample = [v.ref for v in before.values()]
    after = await read_views(client, scripts, keys, sample)
    for memory_id, view in after.items():
        if view.partition != partition_for(memory_id, opts.to):
            problems.append(f"{memory_id}: read from partition {view.partition}")
        if replace(view, partition=0, watermark="") != replace(
            before[memory_id], partition=0, watermark=""
        ):
            problems.append(f"{memory_id}: reads back differently after the move")
    left = int(await client.exists(*sample_names(keys, sample, opts.partitions)))
    if left:
        problems.append(f"{left} keys of sampled memories left in their old partition")
    if problems:
        raise BrokenRunError("memstream: " + "; ".join(problems[:5]))


async def check_baseline(
    raw: Redis,
    keys: Keys,
    opts: Options,
    sample: Sequence[MemoryRef],
    before: list[tuple[Any, Any, bool]],
    pairs: Sequence[Pair],
    moving: int,
) -> None:
    """Every moving memory moved; the sampled keys hold under their new names what they
    held under the old ones (with a TTL where they had one), and the old names are
    gone."""
    problems: list[str] = []
    moved = {old.removeprefix(f"{keys.namespace}:m:").rpartition(":")[0] for old, _ in pairs}
    if len(moved) != moving:
        problems.append(f"moved the keys of {len(moved)} memories, expected {moving}")
    if await key_contents(raw, sample_names(keys, sample, opts.to)) != before:
        problems.append("sampled keys differ after the move")
    left = int(await raw.exists(*sample_names(keys, sample, opts.partitions)))
    if left:
        problems.append(f"{left} keys of sampled memories left in their old partition")
    if problems:
        raise BrokenRunError("baseline: " + "; ".join(problems[:5]))


# --- timing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cost:
    """One timed move: its wall time and what it cost this process and Redis."""

    seconds: float
    client_cpu_s: float | None  # this process: the client side of the move
    redis_cpu_s: float | None
    commands: int  # as Redis counts them (INFO commandstats, inside scripts too)
    top_commands: dict[str, int]
    background_cores: float | None  # CPUs other processes kept busy meanwhile


async def timed(meter: Meter, work: Awaitable[T]) -> tuple[T, Cost]:
    gc.collect()
    before = await meter.snapshot()
    started = time.perf_counter()
    result = await work
    seconds = time.perf_counter() - started
    # With one "message", the per-message figures of the harness are the totals.
    usage = Meter.usage(before, await meter.snapshot(), 1)
    cpu = usage.cpu_us_per_msg
    return result, Cost(
        seconds=seconds,
        client_cpu_s=None if cpu["producer"] is None else cpu["producer"] / 1e6,
        redis_cpu_s=None if cpu["redis"] is None else cpu["redis"] / 1e6,
        commands=round(usage.redis_calls_per_msg),
        top_commands=usage.redis_top_calls,
        background_cores=usage.background_cores,
    )


def figures(cost: Cost, memories: int, keys: int) -> dict[str, Any]:
    return {
        **asdict(cost),
        "memories_per_s": memories / cost.seconds,
        "keys_per_s": keys / cost.seconds,
        "commands_per_key": cost.commands / keys if keys else 0.0,
    }


@dataclass
class Run:
    order: str  # which system ran first
    moved: int  # memories whose partition changed
    kept: int
    keys_moved: int
    keys_by_kind: dict[str, int]  # log, meta, tomb, idem, tok, backup
    index_entries: int  # moved by memstream along with the memories
    memstream: dict[str, Any]
    baseline: dict[str, Any]
    memstream_reported_s: float  # Repartitioned.seconds, what the command prints
    ratio: float  # memstream seconds / baseline seconds
    checked: str


async def one_run(
    opts: Options,
    url: str,
    settings: Settings,
    registry: ResourceRegistry,
    tokenizers: Tokenizers,
    baseline_first: bool,
) -> Run:
    """Build a namespace and its copy, then time memstream on the one and the baseline
    on the other, verify both, and delete both namespaces."""
    keys = Keys(fresh_namespace("bench-rp"))
    copy = Keys(fresh_namespace("bench-rp-copy"))
    client = connect(url)
    raw = Redis.from_url(url)
    try:
        scripts = Scripts(client)
        await scripts.load()
        tool = Repartitioner(client, scripts, keys, member_ttl_ms=int(settings.lease_ttl * 1000))
        await build(client, scripts, keys, opts, settings, registry, tokenizers)
        moving = moving_refs(opts)
        sample = sample_of(moving)
        views = await check_built(client, scripts, tool, keys, opts, sample)
        await copy_namespace(raw, keys.namespace, copy.namespace)
        copied = await key_contents(raw, sample_names(copy, sample, opts.partitions))

        meter = Meter(client)
        if baseline_first:
            pairs, base = await timed(meter, move_baseline(raw, copy, opts.to))
            done, ours = await timed(meter, tool.run(opts.to))
        else:
            done, ours = await timed(meter, tool.run(opts.to))
            pairs, base = await timed(meter, move_baseline(raw, copy, opts.to))

        await check_memstream(client, scripts, keys, opts, views, done, len(moving))
        await check_baseline(raw, copy, opts, sample, copied, pairs, len(moving))
        kinds = Counter(old.rpartition(":")[2] for old, _ in pairs)
        return Run(
            order="baseline first" if baseline_first else "memstream first",
            moved=done.moved,
            kept=done.kept,
            keys_moved=len(pairs),
            keys_by_kind=dict(sorted(kinds.items())),
            index_entries=done.index_entries,
            memstream=figures(ours, done.moved, len(pairs)),
            baseline=figures(base, done.moved, len(pairs)),
            memstream_reported_s=done.seconds,
            ratio=ours.seconds / base.seconds,
            checked=(
                f"memstream moved {done.moved} and kept {done.kept} memories as expected; "
                f"{len(sample)} sampled moved memories read back identically (MemoryReader, "
                f"new count) and their old keys are gone; the baseline moved the keys of the "
                f"same memories, and the sampled keys hold what they held"
            ),
        )
    finally:
        for namespace in (keys.namespace, copy.namespace):
            with contextlib.suppress(Exception):
                await delete_keys(client, f"{namespace}:*")
        await client.aclose()
        await raw.aclose()


# --- the run, the report --------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Median and range over the repeats; the ratio is taken per run, then summarized."""
    out: dict[str, Any] = {}
    for system in ("memstream", "baseline"):
        values: list[dict[str, Any]] = [getattr(r, system) for r in runs]
        out[system] = {
            key: spread([float(v[key]) for v in values if v[key] is not None])
            for key in (
                "seconds",
                "memories_per_s",
                "keys_per_s",
                "client_cpu_s",
                "redis_cpu_s",
                "commands_per_key",
            )
        }
    out["ratio"] = spread([r.ratio for r in runs])
    out["background_cores"] = [
        [r.memstream["background_cores"], r.baseline["background_cores"]] for r in runs
    ]
    return out


async def run(opts: Options) -> dict[str, Any]:
    settings = Settings(partitions=opts.partitions, resources=str(opts.resources))
    registry = ResourceRegistry.load(settings.resource_paths())
    if registry.find(RESOURCE) is None:
        raise BrokenRunError(f"no {RESOURCE} resource in {opts.resources}")
    tokenizers = Tokenizers()
    target = (
        RedisTarget(opts.redis_url, "", False)
        if opts.redis_url
        else RedisTarget.start(appendonly=opts.aof)
    )
    try:
        client = connect(target.url)
        try:
            info = await redis_info(client)
        finally:
            await client.aclose()
        target.version = str(info.get("redis_version", target.version))
        load_start = load_average()
        runs: list[Run] = []
        for r in range(opts.repeat):
            log(
                f"[{r + 1}/{opts.repeat}] building {opts.memories * opts.messages:,} messages "
                f"in {opts.memories:,} memories (not timed), then the moves ..."
            )
            result = await one_run(opts, target.url, settings, registry, tokenizers, r % 2 == 0)
            log(f"    {one_line(result)}")
            runs.append(result)
    finally:
        target.stop()
    return {
        "benchmark": "repartition",
        "source": source_version(ROOT),
        "config": {
            "memories": opts.memories,
            "messages": opts.messages,
            "content_bytes": CONTENT_BYTES,
            "partitions": opts.partitions,
            "to": opts.to,
            "workflows": opts.workflows,
            "repeat": opts.repeat,
            "baseline_batch": BATCH,
            "sample": SAMPLE,
            "tenant": TENANT,
            "resource": RESOURCE,
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
    m, b = r.memstream, r.baseline
    return (
        f"{r.moved:,} memories ({r.keys_moved:,} keys) moved, {r.kept:,} kept; memstream "
        f"{m['seconds']:.3f} s, baseline {b['seconds']:.3f} s, ratio {r.ratio:.1f} ({r.order})"
    )


def fmt(s: dict[str, float], digits: int, repeat: int) -> str:
    if repeat == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def render(report: dict[str, Any]) -> str:
    c, rd, mc, s = report["config"], report["redis"], report["machine"], report["summary"]
    k = c["repeat"]
    first = report["runs"][0]
    where = "temporary redis-server" if rd["temporary"] else "given server"
    aof = "" if rd["aof"] is None else (", AOF on" if rd["aof"] else ", AOF off")
    columns = [
        ("seconds", "seconds", 3),
        ("memories_per_s", "memories/s", 0),
        ("keys_per_s", "keys/s", 0),
        ("client_cpu_s", "client CPU s", 3),
        ("redis_cpu_s", "Redis CPU s", 3),
        ("commands_per_key", "commands/key", 1),
    ]
    lines = [
        f"memstream repartition benchmark (source {report['source']})",
        f"  Redis {rd['version']} ({where}{aof}) at {rd['url']}",
        f"  machine: {mc['cpus']} CPUs ({mc['cpu_model']}), {mc['platform']}, "
        f"Python {mc['python']}; load average {mc['loadavg_start']} -> {mc['loadavg_end']}",
        f"  M={c['memories']:,} memories of K={c['messages']} messages ({c['content_bytes']} B) "
        f"of {c['resource']}, from {c['partitions']} to {c['to']} partitions"
        + (f", {c['workflows']} workflows" if c["workflows"] else ""),
        f"  moved {first['moved']:,} memories ({first['keys_moved']:,} keys: "
        f"{first['keys_by_kind']}), kept {first['kept']:,}; memstream also moved "
        f"{first['index_entries']:,} index entries",
        f"  figures: median of {k} run(s)" + (" (min-max)" if k > 1 else ""),
        "",
        f"{'':<40}" + "".join(f"{title:>24}" for _, title, _ in columns),
    ]
    names = {
        "memstream": "memstream (Repartitioner.run)",
        "baseline": "baseline (SCAN, DUMP+PTTL, RESTORE+DEL)",
    }
    for system, label in names.items():
        f = s[system]
        lines.append(f"{label:<40}" + "".join(f"{fmt(f[key], d, k):>24}" for key, _, d in columns))
    lines += [
        "",
        f"ratio memstream / baseline, seconds (per run, then the median): {fmt(s['ratio'], 1, k)}",
        "",
        "per run: order, Redis commands (top), CPUs kept busy by other processes "
        "(memstream, baseline):",
    ]
    for i, r in enumerate(report["runs"]):
        lines.append(
            f"  run {i + 1} ({r['order']}): memstream {r['memstream']['top_commands']}; "
            f"baseline {r['baseline']['top_commands']}; background "
            f"{r['memstream']['background_cores']}, {r['baseline']['background_cores']}"
        )
    lines.append(f"checked: {report['runs'][-1]['checked']}")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="memstream repartition against a pipelined DUMP/RESTORE of the same "
        "keys, on one Redis server",
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--memories", type=int, default=2000, help="M memories (default 2000)")
    p.add_argument("--messages", type=int, default=20, help="K messages per memory (default 20)")
    p.add_argument("--partitions", type=int, default=8, help="partition count before (default 8)")
    p.add_argument("--to", type=int, default=16, help="partition count after (default 16)")
    p.add_argument(
        "--workflows",
        type=int,
        default=0,
        help="K > 0: memory m is written by workflow m mod K, so workflow indexes move too "
        "(default 0: no workflow id)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs, figures are medians (default 1)")
    p.add_argument("--aof", action="store_true", help="temporary server with appendonly yes")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for a worker")
    add_report_arguments(p, ROOT / "memories")
    a = p.parse_args(argv)
    for name in ("memories", "messages", "partitions", "to", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.workflows < 0:
        p.error("--workflows must be at least 0")
    if a.to == a.partitions:
        p.error("--to must differ from --partitions")
    return Options(
        memories=a.memories,
        messages=a.messages,
        partitions=a.partitions,
        to=a.to,
        workflows=a.workflows,
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
