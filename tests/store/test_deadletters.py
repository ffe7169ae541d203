"""Dead letters (store/deadletters.py, replay_dead_letter.lua; DESIGN rule 10): listing,
reading and replaying them, against real Redis 6.2, 7.x and a Cluster."""

from __future__ import annotations

import hashlib
import json

import pytest

from store import (
    ApplyBatch,
    DeadLetters,
    Group,
    Keys,
    Lease,
    Leases,
    MemoryStore,
    RedisClient,
    Scripts,
    Target,
    ensure_groups,
    ensure_partitions,
)

PARTITIONS = 3
P = 1
MEM = "acme/customer-support/k1"
TTL = 60_000


@pytest.fixture
async def letters(client: RedisClient, scripts: Scripts, keys: Keys) -> DeadLetters:
    await ensure_partitions(client, keys, PARTITIONS)
    return DeadLetters(client, scripts, keys)


@pytest.fixture
async def lease(scripts: Scripts, keys: Keys) -> Lease:
    await ensure_groups(scripts, keys, P)
    held = await Leases(scripts, keys, Group.APPENDER.value, 10_000).acquire(P, "w1")
    assert held is not None
    return held


def event(key: str | None = "idem-1", text: str = "hello") -> str:
    data: dict[str, object] = {
        "type": "message_appended",
        "schema_version": 2,
        "event_id": "ev-1",
        "tenant": "acme",
        "payload": {"message": {"role": "user", "content": text}},
    }
    if key is not None:
        data["idempotency_key"] = key
    return json.dumps(data)


async def publish(client: RedisClient, keys: Keys, fields: dict[str, str], p: int = P) -> str:
    """Put an entry in ingest:{p} and deliver it to w1."""
    entry_id = str(await client.xadd(keys.ingest(p), fields))  # type: ignore[arg-type]
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(p): ">"})
    return entry_id


async def dead_letter(
    client: RedisClient,
    scripts: Scripts,
    keys: Keys,
    lease: Lease,
    text: str,
    reason: str = "unknown_resource",
) -> tuple[str, str]:
    """Publish an event and have the appender's script dead-letter it: (entry, letter)."""
    entry_id = await publish(client, keys, {"event": text})
    batch = ApplyBatch(keys, P)
    batch.dead_letter(
        entry_id,
        reason=reason,
        detail=f"detail of {reason}",
        event=text,
        source=keys.ingest(P),
        memory_id=MEM,
    )
    assert await MemoryStore(scripts, keys).apply(lease, batch) == ["refused"]
    letter_id = (await client.xrevrange(keys.dlq(P), count=1))[0][0]
    return entry_id, str(letter_id)


async def test_list_returns_the_oldest_letters_of_each_partition(
    letters: DeadLetters, client: RedisClient, keys: Keys
) -> None:
    written: dict[int, list[str]] = {}
    for p in range(PARTITIONS):
        written[p] = [
            str(await client.xadd(keys.dlq(p), {"reason": f"r{p}-{i}", "event": "{}"}))
            for i in range(3)
        ]
    everything = await letters.list()
    assert [(d.partition, d.id) for d in everything] == [
        (p, i) for p in range(PARTITIONS) for i in written[p]
    ]
    assert everything[0].reason == "r0-0" and everything[0].fields["event"] == "{}"
    only = await letters.list(2, count=2)
    assert [(d.partition, d.id, d.reason) for d in only] == [
        (2, written[2][0], "r2-0"),
        (2, written[2][1], "r2-1"),
    ]
    capped = await letters.list(count=1)
    assert [(d.partition, d.id) for d in capped] == [(p, written[p][0]) for p in range(3)]


async def test_list_of_no_dead_letters_is_empty(letters: DeadLetters) -> None:
    assert await letters.list() == []
    assert await letters.list(0) == []


async def test_get_reads_one_letter_with_its_fields(
    letters: DeadLetters, client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    text = event()
    entry_id, letter_id = await dead_letter(client, scripts, keys, lease, text)
    letter = await letters.get(P, letter_id)
    assert letter is not None
    assert letter.partition == P and letter.id == letter_id
    assert letter.reason == "unknown_resource"
    assert letter.fields["event"] == text
    assert letter.fields["entry"] == entry_id
    assert letter.fields["source"] == keys.ingest(P)
    assert letter.fields["memory"] == MEM
    assert letter.fields["detail"] == "detail of unknown_resource"
    assert int(letter.fields["at"]) > 0
    assert await letters.get(P, "1-1") is None
    assert await letters.get(P + 1, letter_id) is None


async def test_replay_republishes_the_event_with_its_key_and_removes_the_letter(
    letters: DeadLetters, client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    text = event(key="idem-42")
    entry_id, letter_id = await dead_letter(client, scripts, keys, lease, text)
    new_id = await letters.replay(P, letter_id)
    assert new_id is not None
    replayed = await client.xrange(keys.ingest(P), new_id, new_id)
    # Memories remember keys as SHA-1 digests: the replay carries the digest.
    digest = hashlib.sha1(b"idem-42").hexdigest()
    assert replayed[0][1] == {"event": text, "replay_of": entry_id, "replay_key": digest}
    assert (await client.xrevrange(keys.ingest(P), count=1))[0][0] == new_id
    assert await letters.get(P, letter_id) is None
    assert await client.xlen(keys.dlq(P)) == 0


async def test_replay_of_an_event_without_a_key_uses_the_dead_letter_fallback(
    letters: DeadLetters, client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    for text in (event(key=None), "{not json", json.dumps({"idempotency_key": 7}), "[1]"):
        entry_id, letter_id = await dead_letter(client, scripts, keys, lease, text)
        new_id = await letters.replay(P, letter_id)
        assert new_id is not None
        fields = (await client.xrange(keys.ingest(P), new_id, new_id))[0][1]
        assert fields == {
            "event": text,
            "replay_of": entry_id,
            "replay_key": f"dlq:{P}:{letter_id}",
        }, text


async def test_replay_keeps_the_key_and_original_of_an_earlier_replay(
    letters: DeadLetters, client: RedisClient, keys: Keys
) -> None:
    letter_id = str(
        await client.xadd(
            keys.dlq(P),
            {
                "event": event(key="own-key"),
                "entry": "2000-0",
                "replay_of": "1000-0",
                "replay_key": "dlq:1:900-0",
            },
        )
    )
    new_id = await letters.replay(P, letter_id)
    assert new_id is not None
    fields = (await client.xrange(keys.ingest(P), new_id, new_id))[0][1]
    assert (fields["replay_of"], fields["replay_key"]) == ("1000-0", "dlq:1:900-0")


async def test_a_refused_replays_dead_letter_keeps_what_it_replays(
    letters: DeadLetters, client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    entry_id = await publish(
        client, keys, {"event": event(key=None), "replay_of": "1000-0", "replay_key": "k0"}
    )
    batch = ApplyBatch(keys, P)
    batch.dead_letter(
        entry_id,
        reason="unknown_resource",
        detail="no such resource",
        event=event(key=None),
        source=keys.ingest(P),
        replay_of="1000-0",
        replay_key="k0",
    )
    assert await MemoryStore(scripts, keys).apply(lease, batch) == ["refused"]
    letter = (await letters.list(P))[0]
    assert letter.fields["replay_of"] == "1000-0" and letter.fields["replay_key"] == "k0"
    new_id = await letters.replay(P, letter.id)
    assert new_id is not None
    fields = (await client.xrange(keys.ingest(P), new_id, new_id))[0][1]
    assert (fields["replay_of"], fields["replay_key"]) == ("1000-0", "k0")


async def test_replaying_a_missing_letter_returns_none_and_publishes_nothing(
    letters: DeadLetters, client: RedisClient, keys: Keys
) -> None:
    await client.xadd(keys.dlq(P), {"event": "{}", "entry": "5-0"}, id="100-0")
    before = await client.xlen(keys.ingest(P))
    assert await letters.replay(P, "99-0") is None
    assert await letters.replay(P + 1, "100-0") is None
    assert await client.xlen(keys.ingest(P)) == before
    assert await client.xlen(keys.dlq(P)) == 1


async def test_replaying_twice_publishes_once(
    letters: DeadLetters, client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    _, letter_id = await dead_letter(client, scripts, keys, lease, event())
    length = await client.xlen(keys.ingest(P))
    first = await letters.replay(P, letter_id)
    second = await letters.replay(P, letter_id)
    assert first is not None and second is None
    assert await client.xlen(keys.ingest(P)) == length + 1


async def test_replay_removes_exactly_the_letter_it_replays(
    letters: DeadLetters, client: RedisClient, keys: Keys
) -> None:
    # Letter ids are stream ids; an id given without its sequence part still names a
    # range in XRANGE, so the script must delete the entry it found, not its argument.
    kept = str(await client.xadd(keys.dlq(P), {"event": "a", "entry": "1-1"}, id="500-0"))
    target = str(await client.xadd(keys.dlq(P), {"event": "b", "entry": "1-2"}, id="600-7"))
    new_id = await letters.replay(P, "600")
    assert new_id is not None
    assert (await client.xrange(keys.ingest(P), new_id, new_id))[0][1]["event"] == "b"
    assert [i for i, _ in await client.xrange(keys.dlq(P))] == [kept]
    assert await letters.replay(P, "600") is None
    assert await letters.get(P, target) is None


async def test_a_replayed_replay_keeps_the_original_entry_id(
    letters: DeadLetters, client: RedisClient, keys: Keys
) -> None:
    original = "1000-0"
    await client.xadd(
        keys.dlq(P),
        {"event": event(), "entry": "2000-0", "replay_of": original},
        id="3000-0",
    )
    new_id = await letters.replay(P, "3000-0")
    assert new_id is not None
    fields = (await client.xrange(keys.ingest(P), new_id, new_id))[0][1]
    assert fields["replay_of"] == original


async def test_a_replay_refused_after_a_clear_stays_refused_when_replayed_again(
    letters: DeadLetters, client: RedisClient, scripts: Scripts, keys: Keys, lease: Lease
) -> None:
    """Rule 10: the appender refuses a replay whose original entry precedes the last
    clear. Replaying that refusal's dead letter must not turn it into a fresh event."""
    store = MemoryStore(scripts, keys)

    async def apply_as_appender(entry_id: str) -> str:
        fields = (await client.xrange(keys.ingest(P), entry_id, entry_id))[0][1]
        data = json.loads(fields["event"])
        batch = ApplyBatch(keys, P)
        batch.append(
            Target(
                entry_id,
                MEM,
                TTL,
                data["event_id"],
                idempotency_key=fields.get("replay_key") or data.get("idempotency_key"),
                replay_of=fields.get("replay_of"),
            ),
            json.dumps(data["payload"]["message"]),
        )
        statuses = await store.apply(lease, batch)
        return statuses[0]

    # An append that failed, then a clear of its memory.
    original, letter = await dead_letter(
        client, scripts, keys, lease, event(key=None, text="old"), reason="failed"
    )
    clear_id = await publish(client, keys, {"event": "{}"})
    clear = ApplyBatch(keys, P)
    clear.command("clear", Target(clear_id, MEM, TTL, "ev-clear"))
    assert await store.apply(lease, clear) == ["applied"]

    replay_1 = await letters.replay(P, letter)
    assert replay_1 is not None
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(P): ">"})
    assert await apply_as_appender(replay_1) == "refused"
    second_letter = (await client.xrevrange(keys.dlq(P), count=1))[0]
    assert second_letter[1]["reason"] == "replay_before_reset"

    replay_2 = await letters.replay(P, str(second_letter[0]))
    assert replay_2 is not None
    await client.xreadgroup(Group.APPENDER.value, "w1", {keys.ingest(P): ">"})
    fields = (await client.xrange(keys.ingest(P), replay_2, replay_2))[0][1]
    status = await apply_as_appender(replay_2)
    resurrected = await client.zcard(keys.memory(P, MEM).log)
    assert (status, resurrected, fields["replay_of"]) == ("refused", 0, original)
