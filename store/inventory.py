"""Inventory without SCAN: the memories of a tenant, of a resource or of a workflow,
read from the indexes the apply script keeps under each partition's tag.

The tenant and resource indexes map each memory to its data deadline, so an expired
memory is never listed; a workflow's index lists what the workflow wrote while it was
live (checked against the memory's keys here, since a memory can be deleted or expire
before its workflow ends)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from store.config import get_partitions
from store.connection import RedisClient
from store.keys import Keys

PAGE = 500


@dataclass(frozen=True, slots=True)
class Listed:
    """One memory: its id, partition and when its data expires (ms since the epoch;
    None when the index does not know it)."""

    memory_id: str
    partition: int
    expires_at_ms: int | None


async def list_memories(
    client: RedisClient,
    keys: Keys,
    tenant: str,
    *,
    resource: str | None = None,
    workflow: str | None = None,
    page: int = PAGE,
) -> AsyncIterator[Listed]:
    """Every live memory of ``tenant`` (of one ``resource``, or written by one live
    ``workflow``), partition by partition, ``page`` at a time: never the whole list in
    memory, never a SCAN."""
    if resource is not None and workflow is not None:
        raise ValueError("list by resource or by workflow, not both")
    for p in range(await get_partitions(client, keys)):
        if workflow is not None:
            async for listed in _workflow_page(client, keys, p, tenant, workflow, page):
                yield listed
            continue
        index = (
            keys.resource_index(p, tenant, resource)
            if resource is not None
            else keys.tenant_index(p, tenant)
        )
        now = int(time.time() * 1000)
        async for memory_id, deadline in _by_score(client, index, f"({now}", page):
            yield Listed(memory_id, p, int(deadline))


async def _by_score(
    client: RedisClient, index: str, low: str, page: int
) -> AsyncIterator[tuple[str, float]]:
    """The members of a sorted set from score ``low`` up, a page at a time, each once:
    every page continues after the last (score, member) given (keyset paging; a sorted
    set orders ties by member), so members that expire or move meanwhile never make it
    skip others."""
    after: tuple[float, str] | None = None
    ties = 0  # members given at the last score: at most this many to pass over
    while True:
        reply = await client.zrangebyscore(
            index, low, "+inf", start=0, num=page + ties, withscores=True
        )
        found = [(float(pair[1]), str(pair[0])) for pair in reply]
        fresh = [item for item in found if after is None or item > after][:page]
        for score, member in fresh:
            yield member, score
        if len(found) < page + ties or not fresh:
            return
        last = fresh[-1]
        same = sum(1 for score, _ in fresh if score == last[0])
        ties = ties + same if after is not None and after[0] == last[0] else same
        after, low = last, repr(last[0])


async def _workflow_page(
    client: RedisClient, keys: Keys, p: int, tenant: str, workflow: str, page: int
) -> AsyncIterator[Listed]:
    index = keys.workflow_index(p, tenant, workflow)
    batch: list[str] = []
    async for memory_id, _ in _by_score(client, index, "-inf", page):
        batch.append(memory_id)
        if len(batch) == page:
            async for listed in _still_written(client, keys, p, workflow, batch):
                yield listed
            batch = []
    async for listed in _still_written(client, keys, p, workflow, batch):
        yield listed


async def _still_written(
    client: RedisClient, keys: Keys, p: int, workflow: str, names: list[str]
) -> AsyncIterator[Listed]:
    """The memories of ``names`` that the workflow still writes (a memory deleted or
    expired, then written again by others, is no longer its)."""
    if not names:
        return
    pipe = client.pipeline(transaction=False)
    for memory_id in names:
        meta = keys.memory(p, memory_id).meta
        pipe.hexists(meta, f"wf:{workflow}")
        pipe.pttl(meta)
    replies = await pipe.execute()
    now = int(time.time() * 1000)
    for i, memory_id in enumerate(names):
        writes, left = replies[2 * i], int(replies[2 * i + 1])
        if writes:
            yield Listed(memory_id, p, now + left if left >= 0 else None)
