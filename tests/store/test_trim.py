"""trim_stream.lua: retention by acknowledgement (DESIGN rule 8), against real Redis
6.2, 7.x and a Cluster. For every group the stream must have, the floor is its smallest
pending id, else its last-delivered id; the stream is trimmed to the least floor; a
missing group stops the trim; nothing unacknowledged is ever trimmed."""

from __future__ import annotations

import random

import pytest

from store import Group, Keys, PartitionStreams, RedisClient, Scripts, Topic, ensure_groups
from store.streams import trim_stream

P = 5
GROUP = Group.APPENDER.value


@pytest.fixture
def streams(client: RedisClient, scripts: Scripts, keys: Keys) -> PartitionStreams:
    return PartitionStreams(client, scripts, keys, Group.APPENDER)


async def add(client: RedisClient, stream: str, n: int) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"event": f"e{i}"})
    return [str(x) for x in await pipe.execute()]


async def deliver(client: RedisClient, stream: str, consumer: str, count: int) -> list[str]:
    if count == 0:
        return []
    reply = await client.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
    return [str(entry[0]) for entry in reply[0][1]] if reply else []


def after(entry_id: str) -> str:
    """The id right after ``entry_id``: the floor once everything up to it is acknowledged."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


async def remaining(client: RedisClient, stream: str) -> list[str]:
    return [str(entry_id) for entry_id, _ in await client.xrange(stream)]


async def trim_reply(scripts: Scripts, stream: str, exact: str = "=") -> list[object]:
    return list(await scripts("trim_stream", [stream], [exact, GROUP]))


async def test_a_missing_group_stops_the_trim(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    ids = await add(client, keys.ingest(P), 5)
    assert await streams.trim(P, exact=True) is None
    assert await remaining(client, keys.ingest(P)) == ids
    assert await trim_reply(scripts, keys.ingest(P)) == ["missing_group", GROUP]


async def test_another_group_does_not_stand_in_for_a_missing_one(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    stream = keys.ingest(P)
    ids = await add(client, stream, 5)
    await client.xgroup_create(stream, "someone-else", "$")
    assert await streams.trim(P, exact=True) is None
    assert await remaining(client, stream) == ids


async def test_a_stream_that_does_not_exist_is_not_trimmed(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    assert await streams.trim(P, exact=True) is None
    assert await trim_reply(scripts, keys.ingest(P)) == ["no_stream"]
    assert not await client.exists(keys.ingest(P))


async def test_nothing_is_trimmed_before_anything_is_delivered(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(scripts, keys, P)
    ids = await add(client, keys.ingest(P), 5)
    assert await streams.trim(P, exact=True) == 0
    assert await remaining(client, keys.ingest(P)) == ids


async def test_the_floor_is_just_past_the_last_delivered_id_when_nothing_is_pending(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(scripts, keys, P)
    stream = keys.ingest(P)
    ids = await add(client, stream, 10)
    delivered = await deliver(client, stream, "w1", 6)
    await client.xack(stream, GROUP, *delivered)
    assert await trim_reply(scripts, stream) == ["trimmed", 6, after(ids[5])]
    # Everything delivered is acknowledged and goes; what was not delivered stays.
    assert await remaining(client, stream) == ids[6:]


async def test_the_floor_is_the_smallest_pending_id(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(scripts, keys, P)
    stream = keys.ingest(P)
    ids = await add(client, stream, 10)
    await deliver(client, stream, "w1", 3)
    await deliver(client, stream, "w2", 3)
    await client.xack(stream, GROUP, ids[0], ids[1], ids[3], ids[5])
    # ids[2] (w1) and ids[4] (w2) are pending; the smallest is ids[2].
    assert await trim_reply(scripts, stream) == ["trimmed", 2, ids[2]]
    assert await remaining(client, stream) == ids[2:]


async def test_an_exact_trim_leaves_precisely_the_unacknowledged_entries(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(scripts, keys, P)
    stream = keys.ingest(P)
    ids = await add(client, stream, 10)
    await deliver(client, stream, "w1", 10)
    await client.xack(stream, GROUP, *ids[:7])
    assert await streams.trim(P, exact=True) == 7
    assert await remaining(client, stream) == ids[7:]
    await client.xack(stream, GROUP, *ids[7:])
    assert await streams.trim(P, exact=True) == 3
    # Everything is acknowledged: nothing is left (no raw event outstays its welcome).
    assert await remaining(client, stream) == []
    assert await streams.trim(P, exact=True) == 0


async def test_trimming_by_acknowledgement_never_loses_an_unacknowledged_entry(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(scripts, keys, P)
    stream = keys.ingest(P)
    rng = random.Random(8)
    unacked: set[str] = set()
    order: list[str] = []
    for _ in range(15):
        new = await add(client, stream, rng.randint(0, 20))
        order += new
        unacked |= set(new)
        for consumer in ("w1", "w2"):
            delivered = await deliver(client, stream, consumer, rng.randint(0, 10))
            done = [i for i in delivered if rng.random() < 0.7]
            if done:
                await client.xack(stream, GROUP, *done)
                unacked -= set(done)
        pending = await client.xpending_range(stream, GROUP, "-", "+", 10_000)
        for row in pending:
            if rng.random() < 0.3:
                await client.xack(stream, GROUP, row["message_id"])
                unacked.discard(str(row["message_id"]))
        await streams.trim(P, exact=rng.random() < 0.5)
        left = set(await remaining(client, stream))
        assert unacked <= left, f"trimmed unacknowledged entries: {sorted(unacked - left)}"
        # Exact bookkeeping: whatever is left is a suffix of the stream.
        assert sorted(left, key=order.index) == order[len(order) - len(left) :]
    await streams.trim(P, exact=True)
    left = await remaining(client, stream)
    first_unacked = min((order.index(i) for i in unacked), default=None)
    if first_unacked is not None:
        assert left[0] == order[first_unacked]


async def test_an_approximate_trim_only_removes_acknowledged_entries(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    await ensure_groups(scripts, keys, P)
    stream = keys.ingest(P)
    ids = await add(client, stream, 600)
    await deliver(client, stream, "w1", 600)
    await client.xack(stream, GROUP, *ids[:500])
    trimmed = await streams.trim(P)
    assert trimmed is not None and 0 < trimmed <= 500
    left = await remaining(client, stream)
    assert left == ids[trimmed:]
    assert set(ids[500:]) <= set(left)


async def test_each_topic_is_trimmed_by_its_own_group(
    client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    changes = keys.changes(P)
    ids = await add(client, changes, 4)
    # The appender's group on the changes stream does not count: the accountant's does.
    await client.xgroup_create(changes, GROUP, "$")
    assert await trim_stream(scripts, changes, Topic.CHANGES, exact=True) is None
    await client.xgroup_create(changes, Group.ACCOUNTANT.value, "0")
    reply = await client.xreadgroup(Group.ACCOUNTANT.value, "a1", {changes: ">"}, count=3)
    await client.xack(changes, Group.ACCOUNTANT.value, *[e[0] for e in reply[0][1]])
    assert await trim_stream(scripts, changes, Topic.CHANGES, exact=True) == 3
    assert await remaining(client, changes) == ids[3:]
    accountant = PartitionStreams(client, scripts, keys, Group.ACCOUNTANT)
    assert await accountant.trim(P, exact=True) == 0


async def test_a_group_the_stream_has_but_does_not_require_holds_the_floor_too(
    streams: PartitionStreams, client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    # A group added by a newer version during a rolling upgrade must not miss entries.
    await ensure_groups(scripts, keys, P)
    stream = keys.ingest(P)
    ids = await add(client, stream, 6)
    await client.xgroup_create(stream, "newer", "0")
    delivered = await deliver(client, stream, "w1", 6)
    await client.xack(stream, GROUP, *delivered)
    assert await streams.trim(P, exact=True) == 0
    reply = await client.xreadgroup("newer", "n1", {stream: ">"}, count=3)
    await client.xack(stream, "newer", *[e[0] for e in reply[0][1]])
    assert await trim_reply(scripts, stream) == ["trimmed", 3, after(ids[2])]
    assert await remaining(client, stream) == ids[3:]


async def test_the_least_floor_of_several_groups_wins(
    client: RedisClient, keys: Keys, scripts: Scripts
) -> None:
    stream = keys.ingest(P)
    ids = await add(client, stream, 8)
    for group in ("g1", "g2"):
        await client.xgroup_create(stream, group, "0")
    for group, n in (("g1", 6), ("g2", 3)):
        reply = await client.xreadgroup(group, "c", {stream: ">"}, count=n)
        await client.xack(stream, group, *[e[0] for e in reply[0][1]])
    assert await scripts("trim_stream", [stream], ["=", "g1", "g2"]) == [
        "trimmed",
        3,
        after(ids[2]),
    ]
    assert await remaining(client, stream) == ids[3:]
    assert await scripts("trim_stream", [stream], ["=", "g1", "g2", "g3"]) == [
        "missing_group",
        "g3",
    ]
    assert await remaining(client, stream) == ids[3:]
