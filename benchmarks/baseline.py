"""The append benchmark's baseline: one ``RPUSH <memory> <message JSON>`` per message into
a list per memory, pipelined in the producers' batches, on the same Redis server."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence

from harness import Meter, delete_keys, fresh_namespace, now_ms
from report import BrokenRunError, Result
from scenario import CONNECTIONS, RESOURCE, TENANT, Options, Scenario, workflow_of
from workload import Item, drive, expected_counts, index_of, memory_key, message_for, plan, summary

from processors.appender import message_text
from store import connect


async def run_baseline(opts: Options, url: str, scenario: Scenario) -> Result:
    prefix = fresh_namespace("bench-base")
    client = connect(url, max_connections=CONNECTIONS)
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
        pacing = await drive(lists, scenario.batch, opts.rate, send)
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
            pacing_ms=pacing,
            checked=f"{opts.memories} lists hold exactly their messages, in order",
        )
    finally:
        with contextlib.suppress(Exception):
            await delete_keys(client, f"{prefix}:*")
        await client.aclose()
