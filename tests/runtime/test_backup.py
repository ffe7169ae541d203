"""clear with a backup: the messages are kept (with a TTL) in the same fenced step that
clears, and a restore brings them back through the partition."""

from __future__ import annotations

from memory import MemoryRef, Message, Role, StoredMessage, partition_for
from store import OutcomeStatus
from tests.runtime.conftest import PARTITIONS, Rig, user

REF = MemoryRef.parse("acme/customer-support/backup-1")


async def test_a_backup_keeps_the_messages_a_clear_removed(rig: Rig) -> None:
    rig.start("appender")
    sent = [Message(role=Role.SYSTEM, content="Be kind."), user("one"), user("two")]
    for m in sent:
        await rig.publisher.append(REF, m, wait=True)
    before = await rig.reader.read(REF)
    cleared = await rig.publisher.clear(REF, backup=True, wait=True)
    outcome = cleared.outcome
    assert outcome is not None and outcome.status is OutcomeStatus.APPLIED
    assert cleared.receipt is not None and outcome.backup == cleared.receipt.entry_id
    assert (await rig.reader.read(REF)).count == 0
    p = partition_for(REF.memory_id, PARTITIONS)
    k = rig.keys.memory(p, REF.memory_id)
    key = k.backup
    assert await rig.client.hget(k.tomb, "backup") == outcome.backup
    kept = [StoredMessage.model_validate_json(t) for t in await rig.client.zrange(key, 0, -1)]
    assert kept == before.messages
    ttl = int(await rig.client.pttl(key))
    # Never longer than the memory's own data (customer-support: 24h).
    assert 0 < ttl <= 24 * 3600 * 1000
    # Restore: a replace with the backup's messages, through the partition.
    restored = await rig.publisher.replace(REF, [m.to_message() for m in kept], wait=True)
    assert restored.outcome is not None and restored.outcome.ok
    after = await rig.reader.read(REF)
    assert [m.to_message() for m in after.messages] == sent
    assert after.generation > before.generation


async def test_a_clear_without_backup_or_of_nothing_keeps_nothing(rig: Rig) -> None:
    rig.start("appender")
    await rig.publisher.append(REF, user("one"), wait=True)
    plain = await rig.publisher.clear(REF, wait=True)
    assert plain.outcome is not None and plain.outcome.backup is None
    empty = await rig.publisher.clear(REF, backup=True, wait=True)
    assert empty.outcome is not None and empty.outcome.ok and empty.outcome.backup is None
    p = partition_for(REF.memory_id, PARTITIONS)
    assert not await rig.client.exists(rig.keys.memory(p, REF.memory_id).backup)


async def test_erase_and_delete_reach_the_backup(rig: Rig) -> None:
    rig.start("appender")
    seqs = []
    for text in ("one", "secret", "three"):
        published = await rig.publisher.append(REF, user(text), wait=True)
        assert published.outcome is not None and published.outcome.seq is not None
        seqs.append(published.outcome.seq)
    await rig.publisher.clear(REF, backup=True, wait=True)
    p = partition_for(REF.memory_id, PARTITIONS)
    k = rig.keys.memory(p, REF.memory_id)
    erased = await rig.publisher.erase(REF, seqs[1], wait=True)
    assert erased.outcome is not None and erased.outcome.ok
    kept = [StoredMessage.model_validate_json(t) for t in await rig.client.zrange(k.backup, 0, -1)]
    assert [str(m.content) for m in kept] == ["one", "three"]
    await rig.publisher.delete(REF, wait=True)
    assert not await rig.client.exists(k.backup)
    assert await rig.client.hget(k.tomb, "backup") is None
