"""Producer benchmark: CPU time of the producer's process per message for
``Publisher.publish_many`` (no wait), against a redis-py pipeline of ``XADD ingest:{p}
event <JSON>`` of the same JSON texts, on one Redis server, in one run. See
benchmarks/README.md for the method.

    .venv/bin/python benchmarks/producer.py --repeat 3
    .venv/bin/python benchmarks/producer.py --messages 2000 --json      # a quick check

Per repeat, on fresh namespaces: build the events and the JSON text the publisher
writes for each (not timed), warm both paths up, then time one producer sending every
message in calls of --batch, one call after the other, for each system (the order
alternates between repeats). Then check that each system's ingest streams hold exactly
those texts, in order.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from harness import (
    Meter,
    RedisTarget,
    delete_keys,
    fresh_namespace,
    load_average,
    machine_info,
    redis_info,
    source_version,
)
from report import BrokenRunError, finish, log, spread
from scenario import ROOT, TENANT, WARMUP_TENANT
from sdk import event_for
from workload import Item, message_for

from events import MessageAppended, Publisher, event_json
from memory import partition_for
from store import Keys, RedisClient, Scripts, connect, describe, ensure_partitions


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    memories: int
    batch: int
    partitions: int
    content_bytes: int
    repeat: int
    redis_url: str | None
    json: bool
    save: Path | None = None


@dataclass
class Pass:
    """One system sending every message: CPU of this process and wall, per message."""

    system: str
    cpu_us_per_msg: float
    wall_us_per_msg: float
    redis_cpu_us_per_msg: float | None
    redis_calls_per_msg: float
    background_cores: float | None


@dataclass
class Run:
    order: str
    passes: list[Pass]
    ratio: float  # memstream CPU per message / baseline CPU per message
    checked: str


def build(opts: Options, tenant: str, count: int, now_ms: int) -> list[MessageAppended]:
    """Message g goes to memory g % M (as in the append benchmark), stamped with a
    publish time so that its JSON is known before it is published."""
    out: list[MessageAppended] = []
    for g in range(count):
        item = Item(g % opts.memories, g // opts.memories)
        event = event_for(tenant, item, message_for(item, opts.content_bytes))
        out.append(event.model_copy(update={"published_at_ms": now_ms}))
    return out


def texts_of(events: Sequence[MessageAppended], partitions: int) -> list[tuple[int, str]]:
    """The partition and the JSON text the publisher writes for each event (its
    idempotency key and the partition count stamped, as ``Publisher.publish_many`` does)."""
    out: list[tuple[int, str]] = []
    for event in events:
        stamped = event.model_copy(
            update={
                "idempotency_key": event.idempotency_key or event.event_id,
                "partitions": partitions,
            }
        )
        memory = stamped.payload.memory
        memory_id = f"{stamped.tenant}/{memory.resource}/{memory.key}"
        out.append((partition_for(memory_id, partitions), event_json(stamped)))
    return out


async def xadd_all(client: RedisClient, keys: Keys, texts: Sequence[tuple[int, str]]) -> None:
    pipe = client.pipeline(transaction=False)
    for p, text in texts:
        pipe.xadd(keys.ingest(p), {"event": text})
    await pipe.execute()


async def timed_pass(
    client: RedisClient, system: str, calls: Sequence[Callable[[], Awaitable[Any]]], n: int
) -> Pass:
    meter = Meter(client)
    gc.collect()
    before = await meter.snapshot()
    t0 = time.perf_counter()
    for call in calls:
        await call()
    wall = time.perf_counter() - t0
    usage = meter.usage(before, await meter.snapshot(), n)
    return Pass(
        system=system,
        cpu_us_per_msg=usage.cpu_us_per_msg["producer"] or 0.0,
        wall_us_per_msg=round(wall * 1e6 / n, 1),
        redis_cpu_us_per_msg=usage.cpu_us_per_msg["redis"],
        redis_calls_per_msg=usage.redis_calls_per_msg,
        background_cores=usage.background_cores,
    )


async def last_ids(client: RedisClient, keys: Keys, partitions: int) -> list[str]:
    """The newest entry id of every partition's ingest stream ("0-0": none)."""
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xrevrange(keys.ingest(p), count=1)
    return [str(e[0][0]) if e else "0-0" for e in await pipe.execute()]


async def stream_texts(client: RedisClient, keys: Keys, after: Sequence[str]) -> list[list[str]]:
    """The event texts of every partition's ingest stream after the given entry ids."""
    pipe = client.pipeline(transaction=False)
    for p, last in enumerate(after):
        pipe.xrange(keys.ingest(p), min=f"({last}")
    return [[fields["event"] for _, fields in entries] for entries in await pipe.execute()]


async def one_run(opts: Options, client: RedisClient, memstream_first: bool) -> Run:
    ns_ms, ns_base = fresh_namespace("bench-prod"), fresh_namespace("bench-prod-base")
    keys, base_keys = Keys(ns_ms), Keys(ns_base)
    try:
        scripts = Scripts(client)
        await scripts.load()
        await ensure_partitions(client, keys, opts.partitions)
        publisher = Publisher(client, keys=keys, scripts=scripts)
        now = int(time.time() * 1000)
        warm = build(opts, WARMUP_TENANT, 1000, now)
        events = build(opts, TENANT, opts.messages, now)
        texts = texts_of(events, opts.partitions)
        for i in range(0, len(warm), opts.batch):  # groups created, scripts and pool warm
            await publisher.publish_many(warm[i : i + opts.batch])
        await xadd_all(client, base_keys, texts_of(warm, opts.partitions))
        marks = {
            ns: await last_ids(client, k, opts.partitions)
            for ns, k in ((ns_ms, keys), (ns_base, base_keys))
        }

        b = opts.batch
        starts = range(0, len(events), b)
        systems: list[tuple[str, list[Callable[[], Awaitable[Any]]]]] = [
            ("memstream", [partial(publisher.publish_many, events[i : i + b]) for i in starts]),
            ("baseline", [partial(xadd_all, client, base_keys, texts[i : i + b]) for i in starts]),
        ]
        if not memstream_first:
            systems.reverse()
        passes = [await timed_pass(client, name, calls, len(events)) for name, calls in systems]

        expected: list[list[str]] = [[] for _ in range(opts.partitions)]
        for p, text in texts:
            expected[p].append(text)
        for name, ns, k in (("memstream", ns_ms, keys), ("baseline", ns_base, base_keys)):
            if await stream_texts(client, k, marks[ns]) != expected:
                raise BrokenRunError(f"{name}: the ingest streams do not hold exactly the texts")
        cpu = {p.system: p.cpu_us_per_msg for p in passes}
        return Run(
            order="memstream first" if memstream_first else "baseline first",
            passes=passes,
            ratio=cpu["memstream"] / cpu["baseline"],
            checked=f"both systems' {opts.partitions} ingest streams hold exactly the same "
            f"{len(events)} JSON texts, in order",
        )
    finally:
        for ns in (ns_ms, ns_base):
            with contextlib.suppress(Exception):
                await delete_keys(client, f"{ns}:*")


def summarize(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for system in ("memstream", "baseline"):
        passes = [next(p for p in r.passes if p.system == system) for r in runs]
        out[system] = {
            "cpu_us_per_msg": spread([p.cpu_us_per_msg for p in passes]),
            "wall_us_per_msg": spread([p.wall_us_per_msg for p in passes]),
            "redis_cpu_us_per_msg": spread([p.redis_cpu_us_per_msg or 0.0 for p in passes]),
            "redis_calls_per_msg": spread([p.redis_calls_per_msg for p in passes]),
            "background_cores": [p.background_cores for p in passes],
        }
    out["ratio"] = {"cpu_per_msg": spread([r.ratio for r in runs])}
    out["background_cores"] = [p.background_cores for r in runs for p in r.passes]
    return out


async def run(opts: Options) -> dict[str, Any]:
    target = (
        RedisTarget(opts.redis_url, "", False)
        if opts.redis_url
        else RedisTarget.start(appendonly=False)
    )
    try:
        client = connect(target.url)
        try:
            target.version = str((await redis_info(client)).get("redis_version", target.version))
            load_start = load_average()
            runs: list[Run] = []
            for r in range(opts.repeat):
                log(f"[{r + 1}/{opts.repeat}] publish_many and pipelined XADD ...")
                result = await one_run(opts, client, memstream_first=r % 2 == 0)
                log("    " + one_line(result))
                runs.append(result)
        finally:
            await client.aclose()
    finally:
        target.stop()
    return {
        "benchmark": "producer",
        "source": source_version(ROOT),
        "config": {
            "messages": opts.messages,
            "memories": opts.memories,
            "batch": opts.batch,
            "partitions": opts.partitions,
            "content_bytes": opts.content_bytes,
            "repeat": opts.repeat,
        },
        "redis": {
            "version": target.version,
            "url": describe(target.url),
            "temporary": target.started,
            "binary": target.binary,
        },
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_average()},
        "summary": summarize(runs),
        "runs": [asdict(r) for r in runs],
    }


def one_line(r: Run) -> str:
    parts = [f"{p.system} {p.cpu_us_per_msg:.1f} us CPU/msg" for p in r.passes]
    return f"{', '.join(parts)}; ratio {r.ratio:.2f} ({r.order}); background " + str(
        [p.background_cores for p in r.passes]
    )


def fmt(s: dict[str, float], digits: int, repeat: int) -> str:
    if repeat == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def render(report: dict[str, Any]) -> str:
    c, rd, mc, s = report["config"], report["redis"], report["machine"], report["summary"]
    k = c["repeat"]
    names = {
        "memstream": "Publisher.publish_many (no wait)",
        "baseline": "pipelined XADD of the same JSON",
    }
    lines = [
        f"memstream producer benchmark (source {report['source']})",
        f"  Redis {rd['version']} at {rd['url']}; machine: {mc['cpus']} CPUs ({mc['cpu_model']}), "
        f"Python {mc['python']}; load average {mc['loadavg_start']} -> {mc['loadavg_end']}",
        f"  N={c['messages']:,} messages over M={c['memories']} memories, {c['batch']} per call, "
        f"one producer, {c['partitions']} partitions, {c['content_bytes']} B content",
        f"  figures: median of {k} run(s)" + (" (min-max)" if k > 1 else ""),
        "",
        f"{'':<36}{'CPU us/msg (this process)':>28}{'wall us/msg':>24}{'Redis CPU us/msg':>24}",
    ]
    for system, label in names.items():
        e = s[system]
        lines.append(
            f"{label:<36}{fmt(e['cpu_us_per_msg'], 1, k):>28}{fmt(e['wall_us_per_msg'], 1, k):>24}"
            f"{fmt(e['redis_cpu_us_per_msg'], 1, k):>24}"
        )
    lines += [
        "",
        f"ratio, CPU per message, publish_many / XADD: {fmt(s['ratio']['cpu_per_msg'], 2, k)}",
        f"other work on the machine, CPUs busy (each pass): {s['background_cores']}",
    ]
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="CPU of the producer per message: publish_many against pipelined XADD"
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--messages", type=int, default=20_000, help="N messages (default 20000)")
    p.add_argument("--memories", type=int, default=200, help="M memories (default 200)")
    p.add_argument("--batch", type=int, default=100, help="messages per call (default 100)")
    p.add_argument("--partitions", type=int, default=16, help="partition count (default 16)")
    p.add_argument("--content-bytes", type=int, default=200, help="message size (default 200)")
    p.add_argument("--repeat", type=int, default=1, help="runs, figures are medians (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--save", type=Path, help="also write the JSON report to this file")
    a = p.parse_args(argv)
    for name in ("messages", "memories", "batch", "partitions", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    return Options(
        messages=a.messages,
        memories=a.memories,
        batch=a.batch,
        partitions=a.partitions,
        content_bytes=a.content_bytes,
        repeat=a.repeat,
        redis_url=a.redis_url,
        json=a.json,
        save=a.save,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    return finish(lambda: run(opts), render, save=opts.save, as_json=opts.json)


if __name__ == "__main__":
    sys.exit(main())
