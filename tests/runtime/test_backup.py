"""clear with a backup: the messages are kept (with a TTL) in the same fenced step that
clears, and a restore brings them back, decided in the partition: in order with erases
and appends, summaries with what they cover, every message counted."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from events import MemoryName, MemoryRestored, RestorePayload
from memory import FlushStrategy, MemoryRef, Message, Role, StoredMessage, partition_for
from processors import opscli
from store import OutcomeStatus
from tests.runtime.conftest import PARTITIONS, ROOT, TOKENIZERS, Rig, appended, user

WORDS = " ".join(f"word{i}" for i in range(300))

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


# Restore: decided in the partition, in order with erases and appends.


def _restore_event(ref: MemoryRef, backup_id: str) -> MemoryRestored:
    name = MemoryName(resource=ref.resource, key=ref.key)
    return MemoryRestored(
        tenant=ref.tenant, payload=RestorePayload(memory=name, backup_id=backup_id)
    )


async def _backup_of(rig: Rig, ref: MemoryRef) -> str:
    cleared = await rig.publisher.clear(ref, backup=True, wait=True)
    assert cleared.outcome is not None and cleared.outcome.backup
    return cleared.outcome.backup


async def _all_counted(rig: Rig, ref: MemoryRef, count: int) -> bool:
    view = await rig.reader.read(ref)
    return view.count == view.counted == count


def _tokens(rig: Rig, ref: MemoryRef, messages: list[StoredMessage]) -> int:
    counter = TOKENIZERS.for_resource(rig.registry[ref.resource])
    return sum(counter.message(m) for m in messages)


async def test_a_restore_is_applied_in_order_with_appends_and_counted(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/restore-1")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    sent = [Message(role=Role.SYSTEM, content="Be kind."), user("one"), user("two")]
    for m in sent:
        await rig.publisher.append(ref, m, wait=True)
    await rig.eventually(lambda: _all_counted(rig, ref, 3), what="the accountant")
    before = await rig.reader.read(ref)
    backup = await _backup_of(rig, ref)
    await rig.publisher.append(ref, user("after the clear"), wait=True)
    # One call, so one batch: the restore is decided after the append before it.
    published = await rig.publisher.publish_many(
        [appended(ref, "before the restore"), _restore_event(ref, backup), appended(ref, "after")],
        wait=True,
    )
    outcomes = [p.outcome for p in published]
    assert all(o is not None and o.status is OutcomeStatus.APPLIED for o in outcomes), outcomes
    restored = outcomes[1]
    assert restored is not None and restored.detail == f"restored 3 message(s) of backup {backup}"
    view = await rig.reader.read(ref)
    assert [str(m.content) for m in view.messages] == ["Be kind.", "one", "two", "after"]
    # The same messages, under their own sequences, in the new generation.
    assert [m.seq for m in view.messages[:3]] == [m.seq for m in before.messages]
    assert [m.entry for m in view.messages[:3]] == [m.entry for m in before.messages]
    assert view.messages[3].seq > before.messages[-1].seq
    assert view.generation == restored.gen and view.generation > before.generation
    assert {m.gen for m in view.messages} == {view.generation}
    await rig.eventually(lambda: _all_counted(rig, ref, 4), what="the restored messages counted")
    view = await rig.reader.read(ref)
    assert (
        view.tokens
        == _tokens(rig, ref, view.messages)
        == before.tokens + _tokens(rig, ref, view.messages[3:])
    )


async def test_an_erase_published_before_a_restore_stays_erased(
    rig: Rig,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = MemoryRef.parse("acme/customer-support/restore-2")
    rig.start("appender")
    seqs = []
    for text in ("one", "my card is 4111", "three"):
        published = await rig.publisher.append(ref, user(text), wait=True)
        assert published.outcome is not None and published.outcome.seq is not None
        seqs.append(published.outcome.seq)
    backup = await _backup_of(rig, ref)
    await rig.stop("appender")
    p = partition_for(ref.memory_id, PARTITIONS)
    k = rig.keys.memory(p, ref.memory_id)
    # The erase is published, not applied yet: the backup still holds the message.
    await rig.publisher.erase(ref, seqs[1])
    held = [StoredMessage.model_validate_json(t) for t in await rig.client.zrange(k.backup, 0, -1)]
    assert "my card is 4111" in [str(m.content) for m in held]
    queued = await rig.client.xlen(rig.keys.ingest(p))
    # `memstream restore`, as an operator runs it.
    for name in [v for v in os.environ if v.startswith("MEMSTREAM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MEMSTREAM_NAMESPACE", namespace)
    monkeypatch.setenv("MEMSTREAM_RESOURCES", str(ROOT / "memories"))
    monkeypatch.setenv("MEMSTREAM_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MEMSTREAM_STRICT_SCRIPT_KEYS", "1")
    restore = asyncio.create_task(opscli.restore(ref, backup, 10.0, False))
    await rig.eventually(
        lambda: _longer(rig, rig.keys.ingest(p), queued), what="the restore published"
    )
    rig.start("appender")
    await restore
    assert "restore: 1 applied" in capsys.readouterr().out
    assert await rig.contents(ref) == ["one", "three"]
    assert not any("4111" in str(t) for t in await rig.client.zrange(k.backup, 0, -1))


async def _longer(rig: Rig, stream: str, than: int) -> bool:
    return int(await rig.client.xlen(stream)) > than


async def test_erasing_a_message_a_restored_summary_covers_removes_the_summary(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/restore-3")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    rig.start("summarizer", rig.summarizer())
    for i in range(5):
        await rig.publisher.append(ref, user(f"m{i}. {WORDS}"), wait=True)
    await rig.eventually(lambda: _all_counted(rig, ref, 5), what="the accountant")
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.HYBRID_SUMMARY, wait=True)

    async def summarized() -> bool:
        return any(m.is_summary for m in (await rig.reader.read(ref)).messages)

    await rig.eventually(summarized, what="a summary")
    await rig.stop("summarizer")
    before = await rig.reader.read(ref)
    summary = next(m for m in before.messages if m.is_summary)
    assert summary.covers
    backup = await _backup_of(rig, ref)
    restored = await rig.publisher.restore(ref, backup, wait=True)
    assert restored.outcome is not None and restored.outcome.status is OutcomeStatus.APPLIED
    view = await rig.reader.read(ref)
    again = next(m for m in view.messages if m.is_summary)
    assert (again.seq, again.covers, again.content) == (
        summary.seq,
        summary.covers,
        summary.content,
    )
    assert [m.seq for m in view.messages] == [m.seq for m in before.messages]
    await rig.eventually(lambda: _all_counted(rig, ref, len(before.messages)), what="counted")
    assert (await rig.reader.read(ref)).tokens == _tokens(rig, ref, view.messages)

    erased = await rig.publisher.erase(ref, summary.covers[0], wait=True)
    assert erased.outcome is not None and erased.outcome.detail == "erased 1 message(s)"
    after = await rig.reader.read(ref)
    assert not any(m.is_summary for m in after.messages)
    assert [m.seq for m in after.messages] == [m.seq for m in view.messages if not m.is_summary]
    assert after.count == after.counted == len(after.messages)
    assert after.tokens == _tokens(rig, ref, after.messages)


async def test_a_restore_of_a_backup_that_is_not_the_latest_or_gone_is_refused(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/restore-4")
    rig.start("appender")
    await rig.publisher.append(ref, user("first"), wait=True)
    older = await _backup_of(rig, ref)
    await rig.publisher.append(ref, user("second"), wait=True)
    latest = await _backup_of(rig, ref)
    p = partition_for(ref.memory_id, PARTITIONS)

    async def refused(backup_id: str, reason: str) -> str:
        published = await rig.publisher.restore(ref, backup_id, wait=True)
        outcome = published.outcome
        assert outcome is not None and outcome.status is OutcomeStatus.REFUSED, outcome
        assert outcome.reason == reason and outcome.detail and outcome.dead_letter
        letters = await rig.client.xrange(rig.keys.dlq(p), outcome.dead_letter, outcome.dead_letter)
        assert letters[0][1]["reason"] == reason
        assert letters[0][1]["memory"] == ref.memory_id
        return outcome.detail

    detail = await refused(older, "backup_not_latest")
    assert older in detail and latest in detail
    assert await rig.contents(ref) == []
    restored = await rig.publisher.restore(ref, latest, wait=True)
    assert restored.outcome is not None and restored.outcome.ok
    assert await rig.contents(ref) == ["second"]
    await rig.publisher.delete(ref, wait=True)
    assert "no backup" in await refused(latest, "backup_gone")
    assert not (await rig.reader.read(ref)).exists
