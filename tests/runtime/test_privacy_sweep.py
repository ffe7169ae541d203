"""A secret never reaches Redis or a log, whatever path an event takes.

With resources that redact (patient-intake: SSNs, phone numbers, e-mail addresses;
customer-support: e-mail addresses), every path that can refuse or record an event is
driven by producers that skip the SDK, with a secret in the message text, in keys and
in workflow ids: a write of an ended workflow, a read-only agent, a misrouted event, a
message too large, an invalid one, an unknown resource, a memory event on the lifecycle
stream, an invalid lifecycle event, a personal key, a failing entry, a replayed letter, a
backup and its restore. Then every key name and value and every stream entry in Redis
(once the ingest and lifecycle streams are trimmed: their raw entries are the one
documented exception, until acknowledged and trimmed), every metric label and every log
line at INFO and above are searched: the secret appears nowhere.
"""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import generate_latest

from events import Publisher
from events.envelope import SCHEMA_VERSION
from memory import MemoryRef, partition_for
from processors import Batch, Handled
from store import DeadLetters, Group
from tests.runtime.conftest import PARTITIONS, Rig, user
from tests.runtime.test_appender_worker import raw_event
from tests.runtime.test_privacy_and_modes import namespace_dump

EMAIL = "jane.doe@example.com"
SSN = "123-45-6789"
SECRETS = (EMAIL, SSN, "jane.doe", "45-6789")
INTAKE = MemoryRef.parse("acme/patient-intake/visit-9")
PREFS = MemoryRef.parse("acme/user-preferences/u-9")  # a resource that redacts nothing
SUPPORT = MemoryRef.parse("acme/customer-support/case-9")
WORKFLOW = f"intake-{EMAIL}"
TEXT = f"my SSN is {SSN}, write to {EMAIL}"


class FailsOnSecret:
    """The appender, failing (with the event's text in its error) on an entry that
    holds the word 'explode'."""

    def __init__(self, rig: Rig) -> None:
        self.inner = rig.appender()
        self.group = self.inner.group

    def letter(self, entry: object, detail: str) -> tuple[str, str]:
        return self.inner.letter(entry, detail)  # type: ignore[arg-type]

    async def process(self, batch: Batch) -> Handled:
        for entry in batch.entries:
            text = (entry.fields or {}).get("event", "")
            if "explode" in text:
                raise ValueError(f"cannot apply {text}")
        return await self.inner.process(batch)


def event_of(ref: MemoryRef, text: str = TEXT, **payload: object) -> dict[str, object]:
    event = raw_event(ref, text)
    event["payload"].update(payload)  # type: ignore[attr-defined]
    return event


async def xadd(rig: Rig, stream: str, event: object) -> str:
    text = event if isinstance(event, str) else json.dumps(event)
    return str(await rig.client.xadd(stream, {"event": text}))


async def settled(rig: Rig, p: int, entry_id: str, group: Group = Group.APPENDER) -> str:
    (outcome,) = await rig.reader.wait_applied_many([(p, entry_id, None)], 20, group=group)
    return f"{outcome.status}:{outcome.reason}"


async def workflow_paths(rig: Rig, seen: dict[str, str]) -> None:
    """A live workflow whose id holds the e-mail address writes (index keys, meta
    fields, the message's workflow field); a backup and its restore; the workflow ends
    and its late write, from a producer without the SDK, is refused inside the script."""
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    ingest = rig.keys.ingest(p)
    seen["append"] = await settled(
        rig, p, await xadd(rig, ingest, event_of(INTAKE, workflow_id=WORKFLOW))
    )
    cleared = await rig.publisher.clear(INTAKE, backup=True, wait=True)
    assert cleared.outcome is not None and cleared.outcome.backup
    restored = await rig.publisher.restore(INTAKE, cleared.outcome.backup, wait=True)
    assert restored.outcome is not None
    seen["restore"] = f"{restored.outcome.status}:{restored.outcome.reason}"
    # A resource without patterns, written by the same workflow: its id needs its
    # pseudonym there too (workflows span resources).
    p_prefs = partition_for(PREFS.memory_id, PARTITIONS)
    prefs = event_of(PREFS, text="likes tea", workflow_id=WORKFLOW)
    seen["prefs"] = await settled(rig, p_prefs, await xadd(rig, rig.keys.ingest(p_prefs), prefs))
    ended = await rig.publisher.workflow_terminated("acme", WORKFLOW, wait=True)
    assert ended.outcome is not None and ended.outcome.ok
    late = event_of(INTAKE, text=f"late {TEXT}", workflow_id=WORKFLOW)
    seen["late"] = await settled(rig, p, await xadd(rig, ingest, late))
    late_prefs = event_of(PREFS, text="late tea", workflow_id=WORKFLOW)
    seen["late_prefs"] = await settled(
        rig, p_prefs, await xadd(rig, rig.keys.ingest(p_prefs), late_prefs)
    )
    # A restore refused inside the script (not the latest backup), with secrets in ids.
    gone = {
        **event_of(INTAKE, agent_id=f"agent-{EMAIL}"),
        "type": "memory.restored",
        "idempotency_key": f"restore-for-{EMAIL}",
        "event_id": f"evt-{EMAIL}",
    }
    gone["payload"] = {
        "memory": {"resource": INTAKE.resource, "key": INTAKE.key},
        "backup_id": "1-0",
        "agent_id": f"agent-{EMAIL}",
    }
    seen["restore_gone"] = await settled(rig, p, await xadd(rig, ingest, gone))
    # An applied event whose own ids hold the secret (outcome, idempotency set).
    ids = {**event_of(INTAKE, text="hello", agent_id=f"agent-{EMAIL}")}
    ids["event_id"], ids["idempotency_key"] = f"evt2-{EMAIL}", f"k-{EMAIL}"
    seen["ids"] = await settled(rig, p, await xadd(rig, ingest, ids))


async def refusal_paths(rig: Rig, seen: dict[str, str]) -> None:
    """A read-only agent, a misrouted event (its text holds the secret), a message too
    large, an invalid one, an unknown resource, a personal key, text that is not JSON,
    an unknown type, and a failing entry whose error quotes the event."""
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    ingest = rig.keys.ingest

    async def refused(name: str, ref: MemoryRef, event: object, at: int | None = None) -> None:
        where = partition_for(ref.memory_id, PARTITIONS) if at is None else at
        seen[name] = await settled(rig, where, await xadd(rig, ingest(where), event))

    # customer-support redacts e-mail addresses (an SSN is no secret of its).
    reviewer = event_of(SUPPORT, text=f"write to {EMAIL}", agent_id="quality-reviewer")
    await refused("read_only", SUPPORT, reviewer)
    await refused("misrouted", INTAKE, event_of(INTAKE), at=(p + 1) % PARTITIONS)
    await refused("too_large", INTAKE, event_of(INTAKE, text=f"{TEXT} " + "x" * 300_000))
    invalid = event_of(INTAKE)
    invalid["payload"]["message"]["role"] = f"wizard {EMAIL}"  # type: ignore[index]
    await refused("invalid", INTAKE, invalid)
    unknown = MemoryRef.parse("acme/no-such-resource/x")
    await refused("unknown", unknown, event_of(unknown))
    personal = MemoryRef("acme", "patient-intake", "patient-123-45-6789")
    await refused("personal_key", personal, event_of(personal))
    await refused("not_json", INTAKE, f'{{"type": "message.appended", "text": "{TEXT}", ')
    newer_type = event_of(INTAKE)
    newer_type["type"] = f"message.{EMAIL}"
    await refused("unknown_type", INTAKE, newer_type)
    await refused("failing", INTAKE, event_of(INTAKE, text=f"explode {TEXT}"))
    # A failing entry read in a batch with others: the batch's failure is logged first.
    batch = [event_of(INTAKE, text=f"explode again {TEXT}"), event_of(INTAKE, text="fine")]
    written = [await xadd(rig, ingest(p), e) for e in batch]
    seen["failing_batch"] = await settled(rig, p, written[0])


async def lifecycle_and_replay_paths(rig: Rig, seen: dict[str, str]) -> None:
    """A memory event on the lifecycle stream, an invalid lifecycle event, and a dead
    letter replayed (refused again, never less redacted)."""
    lifecycle = rig.keys.lifecycle
    seen["wrong_stream"] = await settled(
        rig, 0, await xadd(rig, lifecycle, event_of(INTAKE)), Group.CLEANUP
    )
    bad_end = {
        "schema_version": SCHEMA_VERSION,
        "type": "workflow.terminated",
        "tenant": "acme",
        "event_id": "e9",
        "payload": {"workflow_id": WORKFLOW, "status": f"gone {EMAIL}"},
    }
    seen["bad_end"] = await settled(rig, 0, await xadd(rig, lifecycle, bad_end), Group.CLEANUP)
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    letters = DeadLetters(rig.client, rig.scripts, rig.keys)
    (letter,) = [x for x in await letters.list(p) if x.reason == "too_large"]
    replayed = await letters.replay(p, letter.id)
    assert replayed is not None
    seen["replay"] = await settled(rig, p, replayed)


async def test_a_secret_reaches_no_key_no_value_no_stream_no_metric_and_no_log(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig.start("appender", FailsOnSecret(rig))  # type: ignore[arg-type]
    rig.start("accountant", rig.accountant())
    rig.start("summarizer", rig.summarizer())
    rig.start_cleanup()
    seen: dict[str, str] = {}
    await workflow_paths(rig, seen)
    await refusal_paths(rig, seen)
    await lifecycle_and_replay_paths(rig, seen)
    assert seen == {
        "append": "applied:None",
        "restore": "applied:None",
        "prefs": "applied:None",
        "late": "refused:workflow_ended",
        "late_prefs": "refused:workflow_ended",
        "restore_gone": "refused:backup_not_latest",
        "ids": "applied:None",
        "read_only": "refused:read_only",
        "misrouted": "refused:misrouted",
        "too_large": "refused:too_large",
        "invalid": "refused:invalid",
        "unknown": "refused:unknown_resource",
        "personal_key": "refused:personal_key",
        "not_json": "refused:not_json",
        "unknown_type": "refused:unknown_type",
        "failing": "refused:failed",
        "failing_batch": "refused:failed",
        "wrong_stream": "refused:wrong_stream",
        "bad_end": "refused:invalid",
        "replay": "refused:too_large",
    }

    # The raw entries go once acknowledged and trimmed (the documented exception).
    streams = [rig.keys.ingest(p) for p in range(PARTITIONS)] + [rig.keys.lifecycle]

    async def trimmed() -> bool:
        lengths = [int(await rig.client.xlen(s)) for s in streams]
        return not any(lengths)

    await rig.eventually(trimmed, timeout=20, what="the ingest and lifecycle streams trimmed")
    dump = await namespace_dump(rig)
    metrics = generate_latest(rig.metrics.registry).decode()
    logs = "\n".join(
        [caplog.text] + [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    )
    for secret in SECRETS:
        assert secret not in dump, (secret, [x for x in dump.split("\n") if secret in x])
        assert secret not in metrics, secret
        assert secret not in logs, (secret, [x for x in logs.split("\n") if secret in x])
    # It was all there to be found: the letters and the restored memory exist.
    assert "[REMOVED]" in dump
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    assert int(await rig.client.xlen(rig.keys.dlq(p))) >= 5


async def test_the_sdk_never_writes_a_workflow_id_that_a_pattern_matches(rig: Rig) -> None:
    sdk = Publisher(
        rig.client,
        keys=rig.keys,
        scripts=rig.scripts,
        default_partitions=PARTITIONS,
        registry=rig.registry,
    )
    await sdk.append(INTAKE, user("hello"), workflow_id=WORKFLOW)
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    (entry,) = await rig.client.xrange(rig.keys.ingest(p))
    assert EMAIL not in entry[1]["event"]
    assert rig.registry.workflow_name(WORKFLOW) in entry[1]["event"]
