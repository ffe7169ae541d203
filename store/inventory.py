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
        offset = 0
        while True:
            now = int(time.time() * 1000)
            found = await client.zrangebyscore(
                index, f"({now}", "+inf", start=offset, num=page, withscores=True
            )
            for memory_id, deadline in (tuple(pair) for pair in found):
                yield Listed(str(memory_id), p, int(deadline))
            if len(found) < page:
                break
            offset += page


async def _workflow_page(
    client: RedisClient, keys: Keys, p: int, tenant: str, workflow: str, page: int
) -> AsyncIterator[Listed]:
    index = keys.workflow_index(p, tenant, workflow)
    offset = 0
    while True:
        names = [str(m) for m in await client.zrange(index, offset, offset + page - 1)]
        if not names:
            return
        pipe = client.pipeline(transaction=False)
        for memory_id in names:
            pipe.pttl(keys.memory(p, memory_id).meta)
        now = int(time.time() * 1000)
        for memory_id, left in zip(names, await pipe.execute(), strict=True):
            if int(left) >= 0:
                yield Listed(memory_id, p, now + int(left))
            elif int(left) == -1:
                yield Listed(memory_id, p, None)
        if len(names) < page:
            return
        offset += page
