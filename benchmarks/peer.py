"""The append benchmark's peer: langchain-community's ``RedisChatMessageHistory``, an
optional dependency (``pip install -e '.[bench]'``). It is driven the way an agent uses
it: one history per memory, ``add_message`` per message, by the same producers (one
thread each, since the history is synchronous), on the same Redis server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

from harness import Meter, delete_keys, fresh_namespace, now_ms
from report import BrokenRunError, Result
from scenario import RESOURCE, TENANT, Options, Scenario
from workload import Item, expected_counts, index_of, memory_key, message_for, plan, summary

from memory import Message, Role
from store import connect

PEER = "langchain"
INSTALL = "pip install 'langchain-community>=0.3,<1'  (or: pip install -e '.[bench]')"


def missing() -> str | None:
    """Why the peer cannot run here, or None."""
    if importlib.util.find_spec("langchain_community") is None:
        return f"not measured: langchain-community is not installed ({INSTALL})"
    return None


def history_class() -> Callable[..., Any]:
    """``RedisChatMessageHistory`` (its import warns that the package is being sunset)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from langchain_community.chat_message_histories import RedisChatMessageHistory
    found: Callable[..., Any] = RedisChatMessageHistory
    return found


def as_langchain(message: Message) -> Any:
    from langchain_core.messages import AIMessage, HumanMessage

    kind = HumanMessage if message.role is Role.USER else AIMessage
    return kind(content=message.content if isinstance(message.content, str) else "")


async def run_peer(opts: Options, url: str, scenario: Scenario) -> Result:
    """Every message through ``add_message`` of its memory's history: each producer a
    thread that adds its messages one call after the other, in order."""
    prefix = fresh_namespace("bench-peer") + ":"
    history = history_class()
    lists = plan(scenario.messages, opts.memories, opts.producers)
    built = {
        item: as_langchain(message_for(item, opts.content_bytes))
        for items in lists
        for item in items
    }
    ttl = opts.peer_ttl or None
    histories = {
        m: history(f"{TENANT}/{RESOURCE}/{memory_key(m)}", url=url, key_prefix=prefix, ttl=ttl)
        for m in range(opts.memories)
    }
    client = connect(url)
    latencies: list[float] = []
    spans: list[tuple[float, float]] = []

    def producer(items: list[Item]) -> None:
        calls: list[float] = []
        t_start = now_ms()
        for item in items:
            t0 = now_ms()
            histories[item.memory].add_message(built[item])
            calls.append(now_ms() - t0)
        latencies.extend(calls)
        spans.append((t_start, now_ms()))

    try:
        for h in histories.values():  # each history's own client, connected before timing
            h.redis_client.ping()
        meter = Meter(client)
        before = await meter.snapshot()
        await asyncio.gather(*(asyncio.to_thread(producer, items) for items in lists))
        usage = meter.usage(before, await meter.snapshot(), scenario.messages)
        problems: list[str] = []
        for m, count in enumerate(expected_counts(scenario.messages, opts.memories)):
            got = [index_of(msg.content) for msg in histories[m].messages]
            if got != list(range(count)):
                problems.append(f"history {m}: {len(got)} messages, expected {count} in order")
        if problems:
            raise BrokenRunError(f"{PEER}: " + "; ".join(problems[:5]))
        duration_ms = max(end for _, end in spans) - min(start for start, _ in spans)
        return Result(
            system=PEER,
            label=scenario.label,
            batch=1,
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
            checked=f"{opts.memories} histories hold exactly their messages, in order",
        )
    finally:
        for h in histories.values():
            with contextlib.suppress(Exception):
                h.redis_client.close()
        with contextlib.suppress(Exception):
            await delete_keys(client, f"{prefix}*")
        await client.aclose()
