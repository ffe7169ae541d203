"""The append benchmark's memstream side: producers publish through the SDK
(``Publisher.publish_many``) to ``ingest:{p}``, ``memstream run appender`` processes apply
the events, and every memory is read back and checked before any figure is taken."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from harness import ClockOffset, Meter, WorkerPool, calibrate, delete_keys, fresh_namespace, now_ms
from report import BrokenRunError, Result
from scenario import CONNECTIONS, RESOURCE, TENANT, WARMUP_TENANT, Options, Scenario, workflow_of
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
from store import Keys, MemoryReader, RedisClient, Scripts, connect


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
        url,
        namespace,
        opts.resources,
        opts.partitions,
        scenario.workers,
        log_dir,
        opts.worker_command,
    )
    client = connect(url, max_connections=CONNECTIONS)
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
        pacing = await drive(lists, scenario.batch, opts.rate, producers.send)
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
            workers=scenario.workers,
            pacing_ms=pacing,
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
