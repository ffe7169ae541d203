"""The partition count, stored in Redis so every producer and worker uses the same N."""

from __future__ import annotations

from store.connection import RedisClient
from store.errors import NotConfiguredError
from store.keys import Keys

#: The config field a change of the partition count sets while it runs.
REPARTITION_TO = "repartition_to"
#: How long producers and readers trust the count they read (a change of the count is
#: noticed within this).
PARTITIONS_TTL = 5.0


async def ensure_partitions(client: RedisClient, keys: Keys, default: int) -> int:
    """The stored partition count, storing ``default`` first if none is set yet."""
    if default < 1:
        raise ValueError(f"partition count must be at least 1, got {default}")
    value = await client.hget(keys.config, "partitions")
    if value is not None:  # read first: a producer's ACL user may only read it
        return int(value)
    await client.hsetnx(keys.config, "partitions", str(default))
    return await get_partitions(client, keys)


async def get_partitions(client: RedisClient, keys: Keys) -> int:
    value = await client.hget(keys.config, "partitions")
    if value is None:
        raise NotConfiguredError(
            f"no partition count in {keys.config}: start the processors once "
            f"(memstream run all) or publish with the SDK, which stores the default"
        )
    return int(value)


async def read_partitions(client: RedisClient, keys: Keys) -> tuple[int | None, int | None]:
    """The stored count (None: none yet) and the count a change in progress moves to
    (None: no change runs), in one round trip of plain HGETs (a producer's ACL user may
    run only those)."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.config, "partitions")
    pipe.hget(keys.config, REPARTITION_TO)
    stored, target = await pipe.execute()
    return (
        None if stored is None else int(stored),
        None if target is None else int(target),
    )
