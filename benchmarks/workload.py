"""The append benchmark's workload: which message goes to which memory, in which
order, from which producer, and how producers pace their publishes."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from harness import percentile

from memory import Message, Role

FILLER = (
    "Thanks for waiting. I checked the order history and the parcel left the warehouse "
    "on Monday; the carrier shows it at the local depot. It should arrive tomorrow. "
)


@dataclass(frozen=True, slots=True)
class Item:
    """One message of the plan: memory number and position within that memory."""

    memory: int
    index: int


def plan(messages: int, memories: int, producers: int) -> list[list[Item]]:
    """Message g goes to memory g % M at position g // M. Each memory belongs to one
    producer (memory % P), which publishes its messages in order, so per-memory order
    is checkable."""
    lists: list[list[Item]] = [[] for _ in range(producers)]
    for g in range(messages):
        m = g % memories
        lists[m % producers].append(Item(m, g // memories))
    return lists


def expected_counts(messages: int, memories: int) -> list[int]:
    return [messages // memories + (1 if m < messages % memories else 0) for m in range(memories)]


def memory_key(m: int) -> str:
    return f"conv-{m:05d}"


def message_for(item: Item, content_bytes: int) -> Message:
    head = f"#{item.index} "
    body = (FILLER * (content_bytes // len(FILLER) + 1))[: max(0, content_bytes - len(head))]
    role = Role.USER if item.index % 2 == 0 else Role.ASSISTANT
    return Message(role=role, content=head + body)


def index_of(content: object) -> int:
    if not isinstance(content, str) or not content.startswith("#"):
        return -1
    return int(content.split(" ", 1)[0][1:])


def chunks(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "mean": statistics.fmean(ordered) if ordered else float("nan"),
        "max": ordered[-1] if ordered else float("nan"),
    }


async def drive(
    lists: list[list[Item]],
    batch: int,
    rate: float,
    send: Callable[[Sequence[Item]], Awaitable[None]],
) -> dict[str, float] | None:
    """Run every producer concurrently, each sending its items in batches.

    Unpaced (``rate`` 0), closed loop: a producer sends its next batch as soon as the
    previous call returned. Paced (``rate`` messages/s over all producers), open loop:
    a producer starts each send at its due time whether or not its earlier sends have
    returned, so a slow call does not slow the offered load down. The one exception is
    a memory's own order: a send waits for the earlier send of any memory it shares
    (an agent publishes a conversation's next message after the previous call
    returned). Returns, when paced, how late sends started behind schedule (ms), and
    the most sends in flight at once."""
    producers = len(lists)
    if rate <= 0:

        async def closed(items: list[Item]) -> None:
            for chunk in chunks(items, batch):
                await send(chunk)

        async with asyncio.TaskGroup() as tg:
            for items in lists:
                tg.create_task(closed(items))
        return None

    interval = batch * producers / rate
    start = time.monotonic()
    late_ms: list[float] = []
    last: dict[int, asyncio.Task[None]] = {}  # memory -> its latest send
    flight = [0, 0]  # sends in flight now, the most at once

    async with asyncio.TaskGroup() as tg:

        async def one(chunk: Sequence[Item], due: float, before: set[asyncio.Task[None]]) -> None:
            if before:
                await asyncio.wait(before)
            late_ms.append((time.monotonic() - due) * 1000)
            flight[0] += 1
            flight[1] = max(flight)
            try:
                await send(chunk)
            finally:
                flight[0] -= 1

        async def paced(k: int, items: list[Item]) -> None:
            for j, chunk in enumerate(chunks(items, batch)):
                due = start + (j + k / producers) * interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                before = {t for i in chunk if (t := last.get(i.memory)) and not t.done()}
                task = tg.create_task(one(chunk, due, before))
                for i in chunk:
                    last[i.memory] = task

        for k, items in enumerate(lists):
            tg.create_task(paced(k, items))
    return {**summary(late_ms), "most_in_flight": flight[1]}
