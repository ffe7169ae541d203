"""Space benchmark: the Redis bytes memstream keeps per message once everything settled,
against the message's own JSON, and what one more memory of one message costs. See
benchmarks/README.md for the method.

    .venv/bin/python benchmarks/space.py
    .venv/bin/python benchmarks/space.py --memories 50 --messages 5 --json    # a quick check

On a fresh namespace: publish --messages to each of --memories memories of
``customer-support`` (``Publisher.publish_many``, no idempotency key of the producer's:
the event id is one), apply them with an appender worker, count them with an
accountant worker (both in this process, until idle; they then release their leases
and leave), and trim the ingest and changes streams of every partition exactly (what
retention does once every entry is acknowledged). That is the settled state: stored
messages, meta, tombstones, token counts, idempotency digests, outcomes, indexes, the
emptied streams with their groups, and the partition-wide keys. Its size is the sum of
``MEMORY USAGE <key> SAMPLES 0`` over every key of the namespace (SCAN), by kind. Then
one memory of one message is added the same way, and measured again: the growth is
what that memory costs. The baseline is the same message JSON in one list per memory
(``RPUSH``), measured the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import (
    RedisTarget,
    delete_keys,
    fresh_namespace,
    load_average,
    machine_info,
    redis_info,
    run_until_idle,
    source_version,
)
from report import BrokenRunError, add_report_arguments, finish, log, spread
from scenario import RESOURCE, ROOT, TENANT
from sdk import event_for
from workload import Item, memory_key, message_for

from events import AppendPayload, MemoryName, MessageAppended, Publisher
from memory import MemoryRef, ResourceRegistry
from processors import Appender, Settings
from processors.accountant import Accountant
from processors.appender import message_text
from processors.tokenizers import Tokenizers
from store import (
    Accounts,
    Group,
    Keys,
    MemoryReader,
    MemoryStore,
    PartitionStreams,
    RedisClient,
    Scripts,
    connect,
    describe,
    ensure_partitions,
)

PUBLISH_CHUNK = 500
SINGLE = "single-00000"  # the one-message memory
KINDS = [  # the kind of a key, by its name after the namespace
    (r"^m:\{\d+\}:.*:(log|meta|tomb|idem|tok|backup)$", "memory {0}"),
    (r"^out:", "outcomes"),
    (r"^(tenant|resource|wf|ended):", "indexes"),
    (r"^(ingest|changes|flush|lifecycle|dlq):", "streams"),
]


@dataclass(frozen=True, slots=True)
class Options:
    memories: int
    messages: int
    partitions: int
    content_bytes: int
    repeat: int
    redis_url: str | None
    timeout: float
    resources: Path
    json: bool
    save: Path | None = None


@dataclass
class Run:
    messages: int
    json_bytes_per_msg: float  # the message's JSON, as the baseline stores it
    bytes_per_msg: float  # every key of the namespace, settled
    by_kind: dict[str, int]  # bytes, every key of the namespace
    baseline_bytes_per_msg: float
    single_growth_bytes: int  # the namespace grew by this for a memory of one message
    single_json_bytes: int
    single_by_kind: dict[str, int]
    checked: str


def kind_of(name: str, namespace: str) -> str:
    rest = name.removeprefix(f"{namespace}:")
    for pattern, label in KINDS:
        if found := re.match(pattern, rest):
            return label.format(*found.groups())
    return "partition-wide"


async def usage_by_kind(client: RedisClient, namespace: str) -> Counter[str]:
    """``MEMORY USAGE <key> SAMPLES 0`` of every key of the namespace, summed by kind."""
    names = [str(k) async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.execute_command("MEMORY", "USAGE", name, "SAMPLES", "0")
    sizes = await pipe.execute()
    out: Counter[str] = Counter()
    for name, size in zip(names, sizes, strict=True):
        out[kind_of(name, namespace)] += int(size or 0)
    return out


async def settle(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    settings: Settings,
    registry: ResourceRegistry,
    timeout: float,
) -> None:
    """Apply and count what was published, then trim ingest and changes exactly."""
    store = MemoryStore(scripts, keys, settings.retention())
    appender = Appender(
        store, keys, registry, settings.partitions, max_event_bytes=settings.max_event_bytes
    )
    accountant = Accountant(Accounts(client, scripts, keys), registry, Tokenizers())
    for name, processor in (("bench-appender", appender), ("bench-accountant", accountant)):
        await run_until_idle(client, scripts, keys, processor, settings, name, timeout)
    for group in (Group.APPENDER, Group.ACCOUNTANT):
        streams = PartitionStreams(client, scripts, keys, group)
        for p in range(settings.partitions):
            await streams.trim(p, exact=True)


async def check(
    client: RedisClient, scripts: Scripts, keys: Keys, refs: dict[MemoryRef, int], partitions: int
) -> None:
    """Every memory holds and counted its messages; no dead letters, nothing left in the
    ingest, changes or flush streams."""
    reader = MemoryReader(client, scripts, keys)
    problems: list[str] = []
    for ref, count in refs.items():
        view = await reader.read(ref)
        if len(view.messages) != count or view.counted != count:
            problems.append(
                f"{ref.memory_id}: {len(view.messages)} messages, {view.counted} counted"
            )
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        for stream in (keys.dlq(p), keys.ingest(p), keys.changes(p), keys.flush(p)):
            pipe.xlen(stream)
    left = sum(int(n) for n in await pipe.execute())
    if left:
        problems.append(f"{left} entries left in the dead letter, ingest, changes or flush streams")
    if problems:
        raise BrokenRunError("; ".join(problems[:5]))


async def one_run(opts: Options, client: RedisClient, settings: Settings) -> Run:
    namespace, base = fresh_namespace("bench-space"), fresh_namespace("bench-space-base")
    keys = Keys(namespace)
    registry = ResourceRegistry.load(settings.resource_paths())
    try:
        scripts = Scripts(client)
        await scripts.load()
        await ensure_partitions(client, keys, opts.partitions)
        publisher = Publisher(client, keys=keys, scripts=scripts)
        items = [Item(m, i) for i in range(opts.messages) for m in range(opts.memories)]
        messages = [message_for(item, opts.content_bytes) for item in items]
        events = [event_for(TENANT, item, msg) for item, msg in zip(items, messages, strict=True)]
        for i in range(0, len(events), PUBLISH_CHUNK):
            await publisher.publish_many(events[i : i + PUBLISH_CHUNK])
        await settle(client, scripts, keys, settings, registry, opts.timeout)
        refs = {
            MemoryRef(TENANT, RESOURCE, memory_key(m)): opts.messages for m in range(opts.memories)
        }
        await check(client, scripts, keys, refs, opts.partitions)
        settled = await usage_by_kind(client, namespace)

        texts = [message_text(m, workflow_id=None, agent_id=None) for m in messages]
        pipe = client.pipeline(transaction=False)
        for item, text in zip(items, texts, strict=True):
            pipe.rpush(f"{base}:{TENANT}/{RESOURCE}/{memory_key(item.memory)}", text)
        await pipe.execute()
        baseline = await usage_by_kind(client, base)

        one = message_for(Item(0, 0), opts.content_bytes)
        single = AppendPayload(memory=MemoryName(resource=RESOURCE, key=SINGLE), message=one)
        await publisher.publish(MessageAppended(tenant=TENANT, payload=single))
        await settle(client, scripts, keys, settings, registry, opts.timeout)
        await check(
            client, scripts, keys, {**refs, MemoryRef(TENANT, RESOURCE, SINGLE): 1}, opts.partitions
        )
        grown = await usage_by_kind(client, namespace)
        grown.subtract(settled)

        n = len(events)
        return Run(
            messages=n,
            json_bytes_per_msg=round(sum(len(t.encode()) for t in texts) / n, 1),
            bytes_per_msg=round(settled.total() / n, 1),
            by_kind=dict(settled.most_common()),
            baseline_bytes_per_msg=round(baseline.total() / n, 1),
            single_growth_bytes=grown.total(),
            single_json_bytes=len(message_text(one, workflow_id=None, agent_id=None).encode()),
            single_by_kind={k: v for k, v in grown.most_common() if v},
            checked=f"{opts.memories} memories hold and counted their {opts.messages} messages, "
            f"the one-message memory its message; no dead letters; ingest, changes and flush "
            f"streams empty",
        )
    finally:
        for ns in (namespace, base):
            with contextlib.suppress(Exception):
                await delete_keys(client, f"{ns}:*")


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Median and range over the repeats; the goals' ratios are taken per run."""
    return {
        "json_bytes_per_msg": spread([r.json_bytes_per_msg for r in runs]),
        "bytes_per_msg": spread([r.bytes_per_msg for r in runs]),
        "baseline_bytes_per_msg": spread([r.baseline_bytes_per_msg for r in runs]),
        # the goal: bytes per message <= 1.5 x its JSON + 100 B, that is this ratio <= 1.5
        "ratio_over_json": spread([(r.bytes_per_msg - 100) / r.json_bytes_per_msg for r in runs]),
        "ratio_to_baseline": spread([r.bytes_per_msg / r.baseline_bytes_per_msg for r in runs]),
        "single_beyond_message_bytes": spread(
            [float(r.single_growth_bytes - r.single_json_bytes) for r in runs]
        ),
        "by_kind_per_msg": {
            kind: round(bytes_ / runs[-1].messages, 1) for kind, bytes_ in runs[-1].by_kind.items()
        },
        "single_by_kind": runs[-1].single_by_kind,
        "background_cores": [],  # nothing is timed: no background to report
    }


async def run(opts: Options) -> dict[str, Any]:
    settings = Settings(partitions=opts.partitions, resources=str(opts.resources))
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
                log(f"[{r + 1}/{opts.repeat}] publish, apply, count, trim, measure ...")
                result = await one_run(opts, client, settings)
                log(
                    f"    {result.bytes_per_msg:,.0f} B per message (JSON "
                    f"{result.json_bytes_per_msg:,.0f} B, baseline "
                    f"{result.baseline_bytes_per_msg:,.0f} B); a one-message memory "
                    f"{result.single_growth_bytes:,} B"
                )
                runs.append(result)
        finally:
            await client.aclose()
    finally:
        target.stop()
    return {
        "benchmark": "space",
        "source": source_version(ROOT),
        "config": {
            "memories": opts.memories,
            "messages_per_memory": opts.messages,
            "partitions": opts.partitions,
            "content_bytes": opts.content_bytes,
            "repeat": opts.repeat,
            "tenant": TENANT,
            "resource": RESOURCE,
            "measured_by": "MEMORY USAGE <key> SAMPLES 0, summed over every key of the namespace",
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


def fmt(s: dict[str, float], digits: int, repeat: int) -> str:
    if repeat == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def render(report: dict[str, Any]) -> str:
    c, rd, s = report["config"], report["redis"], report["summary"]
    k = c["repeat"]
    lines = [
        f"memstream space benchmark (source {report['source']})",
        f"  Redis {rd['version']} at {rd['url']}; {c['memories']} memories of "
        f"{c['messages_per_memory']} messages ({c['content_bytes']} B content) of {c['resource']}, "
        f"{c['partitions']} partitions; settled: applied, counted, ingest and changes trimmed",
        f"  measured by {c['measured_by']}",
        f"  figures: median of {k} run(s)" + (" (min-max)" if k > 1 else ""),
        "",
        f"  message JSON, B per message:                  {fmt(s['json_bytes_per_msg'], 0, k)}",
        f"  memstream, settled, B per message:            {fmt(s['bytes_per_msg'], 0, k)}",
        f"  baseline (RPUSH of the JSON), B per message:  {fmt(s['baseline_bytes_per_msg'], 0, k)}",
        f"  (B per message - 100) / JSON (goal <= 1.5):   {fmt(s['ratio_over_json'], 2, k)}",
        f"  memstream / baseline:                         {fmt(s['ratio_to_baseline'], 2, k)}",
        f"  one-message memory, B beyond its message:     "
        f"{fmt(s['single_beyond_message_bytes'], 0, k)} (goal <= 1024)",
        "",
        "  where the bytes are, per message (last run):",
        *[f"    {kind:<24}{v:>10,.1f}" for kind, v in s["by_kind_per_msg"].items()],
        "  what the one-message memory added, B (last run):",
        *[f"    {kind:<24}{v:>10,}" for kind, v in s["single_by_kind"].items()],
    ]
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description="Redis bytes per settled message, and for a memory of one message"
    )
    p.add_argument("--redis-url", help="use this server (default: start a temporary one)")
    p.add_argument("--memories", type=int, default=200, help="M memories (default 200)")
    p.add_argument(
        "--messages",
        type=int,
        default=20,
        help="messages per memory (default 20: under the resource's flush threshold)",
    )
    p.add_argument("--partitions", type=int, default=16, help="partition count (default 16)")
    p.add_argument("--content-bytes", type=int, default=200, help="message size (default 200)")
    p.add_argument("--repeat", type=int, default=1, help="runs, figures are medians (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="longest wait for a worker")
    add_report_arguments(p, ROOT / "memories")
    a = p.parse_args(argv)
    for name in ("memories", "messages", "partitions", "repeat"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    return Options(
        memories=a.memories,
        messages=a.messages,
        partitions=a.partitions,
        content_bytes=a.content_bytes,
        repeat=a.repeat,
        redis_url=a.redis_url,
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
