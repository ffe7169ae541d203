"""What a processor is still working on of the entries an erasure removed.

XDEL removes an entry from its stream but not from its group's pending list: a worker
that read the entry before it was removed may still be acting on it (the cleanup
processor sending a workflow's end, the summarizer flushing a memory), and settles it
when it is done. Only an erasure removes a pending entry (trims stop at the oldest
pending one), so the entries pending for the leaseholder of a partition that are gone
from its stream are the ones in flight since an erasure, whatever their tenant.

Entries pending for a worker that does not hold the lease (it died, or lost the lease)
are not in flight: the next holder claims them, finds them gone and settles them as
``erased`` without processing them (DESIGN rule 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from store.connection import RedisClient
from store.keys import GROUP_TOPIC, Group, Keys
from store.lease import LeaseHolder

PAGE = 1000
#: How often a wait looks again: from the first delay, doubling up to the second.
POLL = (0.02, 0.25)


@dataclass(frozen=True, slots=True)
class InFlight:
    """Removed entries of ``stream`` that ``worker``, the leaseholder of ``group``, had
    read and has not settled yet, in id order."""

    stream: str
    group: str
    worker: str
    entries: tuple[str, ...]


async def removed_in_flight(
    client: RedisClient, keys: Keys, group: Group, partition: int
) -> InFlight | None:
    """The entries of the partition's stream pending for the group's leaseholder that
    are gone from the stream; None when there are none, or no worker holds the lease."""
    value = await client.get(keys.lease(partition, group.value))
    if value is None:
        return None
    worker = LeaseHolder(str(value), 0).worker
    stream = keys.topic(GROUP_TOPIC[group], partition)
    gone: list[str] = []
    start = "-"
    while True:
        rows = await client.xpending_range(
            stream, group.value, start, "+", PAGE, consumername=worker
        )
        ids = [str(row["message_id"]) for row in rows]
        if ids:
            pipe = client.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xrange(stream, entry_id, entry_id)
            found = await pipe.execute()
            gone += [i for i, entries in zip(ids, found, strict=True) if not entries]
        if len(ids) < PAGE:
            return InFlight(stream, group.value, worker, tuple(gone)) if gone else None
        start = f"({ids[-1]}"


async def wait_settled(
    client: RedisClient,
    keys: Keys,
    streams: Sequence[tuple[Group, int]],
    timeout: float,
    waiting: Callable[[list[InFlight]], None] | None = None,
) -> list[InFlight]:
    """Wait until no removed entry of these (group, partition) streams is in flight;
    ``waiting`` is told once, when there is something to wait for. Returns what is
    still in flight when ``timeout`` seconds have passed (nothing if all settled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, longest = POLL
    left_over = list(streams)
    told = False
    while True:
        found = [
            (group, p, in_flight)
            for group, p in left_over
            if (in_flight := await removed_in_flight(client, keys, group, p)) is not None
        ]
        if not found:
            return []
        if waiting is not None and not told:
            waiting([in_flight for _, _, in_flight in found])
            told = True
        left = deadline - loop.time()
        if left <= 0:
            return [in_flight for _, _, in_flight in found]
        left_over = [(group, p) for group, p, _ in found]
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, longest)
