"""The partition count, stored in Redis so every producer and worker uses the same N."""

from __future__ import annotations

from store.connection import RedisClient
from store.errors import NotConfiguredError
from store.keys import Keys


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
