"""Reads of memories too large for one Lua unpack() (a few thousand values)."""

from __future__ import annotations

import json

from memory import MemoryRef, partition_for
from store import Keys, MemoryReader, RedisClient, Scripts, ensure_partitions

N = 9000
PARTITIONS = 4


async def test_reading_and_touching_thousands_of_messages(
    client: RedisClient, scripts: Scripts, keys: Keys
) -> None:
    await ensure_partitions(client, keys, PARTITIONS)
    ref = MemoryRef.parse("acme/customer-support/large-1")
    k = keys.memory(partition_for(ref.memory_id, PARTITIONS), ref.memory_id)
    pipe = client.pipeline(transaction=False)
    for seq in range(1, N + 1):
        member = json.dumps(
            {"seq": seq, "gen": 1, "at": 1, "entry": f"{seq}-0", "role": "user", "content": "x"},
            separators=(",", ":"),
        )
        pipe.zadd(k.log, {member: seq})
        pipe.hset(k.tok, str(seq), 7)
    pipe.hset(k.meta, mapping={"gen": 1, "count": N, "tokens": 7 * N, "counted": N})
    pipe.hset(k.tok, "gen", 1)
    await pipe.execute()
    reader = MemoryReader(client, scripts, keys)
    view = await reader.read(ref, touch=True)
    assert len(view.messages) == N and view.token_counts == [7] * N
    assert await client.hget(k.tok, f"f:{N}") == "1"
    assert await client.hget(k.tok, "f:1") == "1"
