"""Input from producers that skip the SDK can be anything: none of it may crash a
worker, block a partition or bring deleted data back."""

from __future__ import annotations

import hashlib
import json

from memory import MemoryRef, partition_for
from store import DeadLetters, Group
from tests.runtime.conftest import PARTITIONS, Rig
from tests.runtime.test_appender_worker import raw_event

REF = MemoryRef.parse("acme/customer-support/hostile")
KEY = hashlib.sha1(b"an idempotency key").hexdigest()  # what a replay writes
P = partition_for(REF.memory_id, PARTITIONS)


async def add(rig: Rig, fields: dict[str, object]) -> str:
    return str(await rig.client.xadd(rig.keys.ingest(P), fields))  # type: ignore[arg-type]


async def test_a_lone_surrogate_escape_is_dead_lettered_and_the_partition_flows(rig: Rig) -> None:
    rig.start("w1")
    text = json.dumps(raw_event(REF, "x")).replace('"x"', '"\\ud800"')
    bad = await add(rig, {"event": text})
    good = await add(rig, {"event": json.dumps(raw_event(REF, "after"))})
    outcome = await rig.reader.wait_applied(P, bad, timeout=10)
    assert (outcome.status, outcome.reason) == ("refused", "invalid")
    assert "surrogate" in str(outcome.detail)
    assert (await rig.reader.wait_applied(P, good, timeout=10)).status == "applied"


async def test_bytes_that_are_not_utf8_are_dead_lettered_readably(rig: Rig) -> None:
    worker = rig.start("w1")
    text = json.dumps(raw_event(REF, "x")).encode().replace(b'"x"', b'"\xff\xfe"')
    bad = await add(rig, {"event": text})
    good = await add(rig, {"event": json.dumps(raw_event(REF, "after"))})
    outcome = await rig.reader.wait_applied(P, bad, timeout=10)
    assert (outcome.status, outcome.reason) == ("refused", "not_utf8")
    assert (await rig.reader.wait_applied(P, good, timeout=10)).status == "applied"
    letter = (await rig.client.xrange(rig.keys.dlq(P)))[0][1]
    assert "\\xff\\xfe" in letter["event"]
    # The partition never changed hands: no crash loop bumped the fence.
    assert worker.owned[P].lease.fence == 1


async def test_a_malformed_replay_field_is_dead_lettered(rig: Rig) -> None:
    rig.start("w1")
    bad = await add(rig, {"event": json.dumps(raw_event(REF, "x")), "replay_of": "yesterday"})
    good = await add(rig, {"event": json.dumps(raw_event(REF, "after"))})
    outcome = await rig.reader.wait_applied(P, bad, timeout=10)
    assert (outcome.status, outcome.reason) == ("refused", "invalid")
    assert (await rig.reader.wait_applied(P, good, timeout=10)).status == "applied"


async def test_replaying_a_refused_replay_never_resurrects_a_deleted_memory(rig: Rig) -> None:
    rig.start("w1")
    original = await add(rig, {"event": json.dumps(raw_event(REF, "secret"))})
    await rig.reader.wait_applied(P, original, timeout=10)
    deleted = await rig.publisher.delete(REF, wait=True)
    assert deleted.outcome is not None and deleted.outcome.status == "applied"
    letters = DeadLetters(rig.client, rig.scripts, rig.keys)
    # An operator replays the original append (as if it had been dead-lettered).
    replay = await add(
        rig,
        {"event": json.dumps(raw_event(REF, "secret")), "replay_of": original, "replay_key": KEY},
    )
    for _ in range(3):
        outcome = await rig.reader.wait_applied(P, replay, timeout=10)
        assert (outcome.status, outcome.reason) == ("refused", "replay_before_reset")
        (letter,) = await letters.list(P)
        assert letter.fields["replay_of"] == original
        assert letter.fields["replay_key"] == KEY
        replay = str(await letters.replay(P, letter.id))
    await rig.reader.wait_applied(P, replay, timeout=10)
    view = await rig.reader.read(REF)
    assert not view.exists and view.messages == []


async def test_a_held_entry_is_not_charged_for_handovers(rig: Rig) -> None:
    newer = await add(rig, {"event": json.dumps(raw_event(REF, "future", schema_version=5))})
    after = await add(rig, {"event": json.dumps(raw_event(REF, "after"))})
    held_key = rig.keys.held(P, Group.APPENDER)

    async def held_by(name: str) -> bool:
        # The marker outlives its writer: wait for this worker's own hold, not the last one's.
        marker = await rig.client.get(held_key)
        return marker is not None and json.loads(str(marker)).get("worker") == name

    # More graceful handovers than max_attempts (3) while the partition waits.
    for i in range(rig.config.loop.max_attempts + 2):
        worker = rig.start(f"w{i}")
        await rig.eventually(lambda n=f"w{i}": held_by(n), what=f"held by w{i}")
        await rig.eventually(lambda w=worker: P in w.owned, what="owned")
        await rig.stop(f"w{i}")
    assert await rig.client.xlen(rig.keys.dlq(P)) == 0
    attempts = await rig.client.hgetall(rig.keys.attempts(P, Group.APPENDER))
    assert attempts.get(newer) is None and attempts.get(after) is None
    assert await rig.reader.outcome(P, after) is None


async def test_a_replay_that_cannot_be_decoded_keeps_its_replay_fields(rig: Rig) -> None:
    rig.start("w1")
    original = "1795000000000-7"
    bad = await add(rig, {"event": "{not json", "replay_of": original, "replay_key": KEY})
    outcome = await rig.reader.wait_applied(P, bad, timeout=10)
    assert outcome.reason == "not_json"
    letter = (await rig.client.xrange(rig.keys.dlq(P)))[0][1]
    # Replaying this letter later must still be checked against the original entry.
    assert (letter["replay_of"], letter["replay_key"]) == (original, KEY)


async def test_a_replay_key_a_replay_did_not_write_is_refused_and_never_kept(rig: Rig) -> None:
    rig.start("w1")
    secret = "k-jane.doe@example.com"
    fields = {"event": json.dumps(raw_event(REF, "x")), "replay_of": "1-0", "replay_key": secret}
    bad = await add(rig, fields)
    garbled = await add(rig, {"event": "{not json", "replay_of": "1-0", "replay_key": secret})
    outcome = await rig.reader.wait_applied(P, bad, timeout=10)
    assert (outcome.status, outcome.reason) == ("refused", "invalid")
    assert "replay_key" in str(outcome.detail)
    assert (await rig.reader.wait_applied(P, garbled, timeout=10)).reason == "not_json"
    for _, letter in await rig.client.xrange(rig.keys.dlq(P)):
        assert "replay_key" not in letter and letter["replay_of"] == "1-0"
