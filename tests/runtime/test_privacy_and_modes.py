"""Privacy and read-only references, enforced at both ends: the SDK (before anything is
written) and the appender (for producers that skip the SDK)."""

from __future__ import annotations

import json

import pytest

from events import MessageAppended, Publisher, ReadOnlyError
from events.envelope import AppendPayload, MemoryName
from memory import (
    MemoryRef,
    Message,
    Role,
    parse_agent_memory,
    partition_for,
    resolve_memories,
    template_context,
)
from memory.privacy import pseudonym
from store import Group, OutcomeStatus
from tests.runtime.conftest import PARTITIONS, Rig, user

SUPPORT = MemoryRef.parse("acme/customer-support/privacy-1")
INTAKE = MemoryRef.parse("acme/patient-intake/visit-7")
CARD = "4111 1111 1111 1111"
SSN = "123-45-6789"


def sdk(rig: Rig) -> Publisher:
    """A publisher that knows the resources and agents, as agents use it."""
    return Publisher(
        rig.client,
        keys=rig.keys,
        scripts=rig.scripts,
        default_partitions=PARTITIONS,
        registry=rig.registry,
    )


def appended(ref: MemoryRef, message: Message, agent: str | None = None) -> MessageAppended:
    name = MemoryName(resource=ref.resource, key=ref.key)
    return MessageAppended(
        tenant=ref.tenant, payload=AppendPayload(memory=name, message=message, agent_id=agent)
    )


async def namespace_dump(rig: Rig) -> str:
    """Every key name and value of the namespace, streams included, as one text."""
    parts = []
    async for key in rig.client.scan_iter(match=f"{rig.keys.namespace}:*", count=1000):
        parts.append(key)
        kind = await rig.client.type(key)
        if kind == "string":
            parts.append(str(await rig.client.get(key)))
        elif kind == "hash":
            parts.append(json.dumps(await rig.client.hgetall(key)))
        elif kind == "zset":
            parts.extend(await rig.client.zrange(key, 0, -1))
        elif kind == "stream":
            parts.extend(json.dumps(f) for _, f in await rig.client.xrange(key))
        elif kind == "list":
            parts.extend(await rig.client.lrange(key, 0, -1))
        elif kind == "set":
            parts.extend(await rig.client.smembers(key))
    return "\n".join(parts)


async def test_the_sdk_redacts_before_anything_is_written(rig: Rig) -> None:
    rig.start("w1")
    text = f"my card is {CARD}, mail me at jane@example.com"
    published = await sdk(rig).append(SUPPORT, user(text), wait=True)
    assert published.outcome is not None and published.outcome.status == "applied"
    assert await rig.contents(SUPPORT) == ["my card is [REDACTED], mail me at [REDACTED]"]
    dump = await namespace_dump(rig)
    assert CARD not in dump and "jane@example.com" not in dump


async def test_the_appender_redacts_for_producers_that_skip_the_sdk(rig: Rig) -> None:
    rig.start("w1")
    text = f"ssn {SSN}, call +1 (555) 010-9999"
    published = await rig.publisher.publish(appended(INTAKE, user(text)), wait=True)
    assert published.outcome is not None and published.outcome.status == "applied"
    assert await rig.contents(INTAKE) == ["ssn [REMOVED], call [REMOVED]"]
    # The raw entry stays in ingest:{p} until retention trims it (documented); once the
    # entry is acknowledged and trimmed, the pattern is nowhere on the server.
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    await rig.eventually(
        lambda: _ingest_empty(rig, p), timeout=10, what="the acknowledged entry trimmed"
    )
    assert SSN not in await namespace_dump(rig)


async def test_the_ids_stored_with_a_message_are_redacted_too(rig: Rig) -> None:
    rig.start("w1")
    name = MemoryName(resource=SUPPORT.resource, key="privacy-ids")
    event = MessageAppended(
        tenant=SUPPORT.tenant,
        payload=AppendPayload(
            memory=name,
            message=user("hello"),
            workflow_id="wf for jane@example.com",
            agent_id="agent of joe@example.com",
        ),
    )
    published = await rig.publisher.publish(event, wait=True)
    assert published.outcome is not None and published.outcome.ok
    view = await rig.reader.read(MemoryRef(SUPPORT.tenant, SUPPORT.resource, "privacy-ids"))
    (stored,) = view.messages
    # A workflow is named by its pseudonym wherever it is kept, messages included.
    assert stored.workflow == pseudonym("wf for jane@example.com")
    assert stored.agent == "agent of [REDACTED]"
    assert "example.com" not in await namespace_dump(rig)


async def _ingest_empty(rig: Rig, p: int) -> bool:
    return int(await rig.client.xlen(rig.keys.ingest(p))) == 0


async def test_non_persistable_messages_are_never_written_by_the_sdk(rig: Rig) -> None:
    rig.start("w1")
    tool = Message(role=Role.TOOL, content=f"lookup {SSN}", tool_call_id="call-1")
    published = await sdk(rig).append(INTAKE, tool, wait=True)
    assert published.receipt is None
    assert published.outcome is not None
    assert (published.outcome.status, published.outcome.reason) == (
        OutcomeStatus.REFUSED,
        "non_persistable",
    )
    diagnostic = Message(role=Role.USER, content="vitals", metadata={"type": "diagnostic"})
    assert (await sdk(rig).append(INTAKE, diagnostic)).receipt is None
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    assert await rig.client.xlen(rig.keys.ingest(p)) == 0


async def test_non_persistable_messages_from_other_producers_are_dropped(rig: Rig) -> None:
    rig.start("w1")
    system = Message(role=Role.SYSTEM, content="you are a triage bot")
    published = await rig.publisher.publish(appended(INTAKE, system), wait=True)
    assert published.outcome is not None
    assert (published.outcome.status, published.outcome.reason) == ("refused", "non_persistable")
    assert published.outcome.dead_letter is None
    kept = await rig.publisher.publish(appended(INTAKE, user("headache")), wait=True)
    assert kept.outcome is not None and kept.outcome.status == "applied"
    assert await rig.contents(INTAKE) == ["headache"]
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    assert await rig.client.xlen(rig.keys.dlq(p)) == 0


async def test_a_read_only_agent_is_refused_by_the_sdk(rig: Rig) -> None:
    with pytest.raises(ReadOnlyError, match=r"quality-reviewer.*may only read customer-support"):
        await sdk(rig).append(SUPPORT, user("score: 3/5"), agent_id="quality-reviewer")
    p = partition_for(SUPPORT.memory_id, PARTITIONS)
    assert await rig.client.xlen(rig.keys.ingest(p)) == 0
    # The same agent may write where its reference is read-write.
    refs = rig.registry.agent("support-agent")
    assert refs is not None
    context = template_context(input={"conversationId": "c1", "userId": "u1"})
    resolved = resolve_memories(
        parse_agent_memory(refs.model_dump()), rig.registry, tenant="acme", context=context
    )
    writable, read_only = resolved
    assert writable.writable and not read_only.writable
    with pytest.raises(ReadOnlyError, match="read-only"):
        await sdk(rig).append_to(read_only, user("prefers email"))


async def test_a_read_only_agent_is_refused_by_the_appender(rig: Rig) -> None:
    rig.start("w1")
    event = appended(SUPPORT, user("score: 3/5"), agent="quality-reviewer")
    published = await rig.publisher.publish(event, wait=True)
    assert published.outcome is not None
    assert (published.outcome.status, published.outcome.reason) == ("refused", "read_only")
    assert published.outcome.dead_letter
    assert await rig.contents(SUPPORT) == []
    ok = await rig.publisher.publish(
        appended(SUPPORT, user("hi"), agent="support-agent"), wait=True
    )
    assert ok.outcome is not None and ok.outcome.status == "applied"


async def test_dead_letters_of_a_known_resource_are_redacted(rig: Rig) -> None:
    rig.start("w1")
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    event = json.loads(appended(INTAKE, user(f"ssn {SSN}")).model_dump_json(exclude_none=True))
    old = {**event, "schema_version": 0}  # undecodable, but its resource is readable
    entry = str(await rig.client.xadd(rig.keys.ingest(p), {"event": json.dumps(old)}))
    reader_outcome = await rig.reader.wait_applied(p, entry, timeout=10)
    assert reader_outcome.reason == "unsupported_version"
    readonly = appended(INTAKE, user(f"ssn {SSN}"), agent="nobody")
    misrouted = json.loads(readonly.model_dump_json(exclude_none=True))
    other = next(q for q in range(PARTITIONS) if q != p)
    await rig.client.xadd(rig.keys.ingest(other), {"event": json.dumps(misrouted)})
    await rig.eventually(lambda: _letters(rig, [p, other], 2), what="two dead letters")
    for q in (p, other):
        for _, fields in await rig.client.xrange(rig.keys.dlq(q)):
            assert SSN not in fields["event"] and "[REMOVED]" in fields["event"]
    assert await rig.client.hlen(rig.keys.attempts(p, Group.APPENDER)) == 0


async def _letters(rig: Rig, partitions: list[int], n: int) -> bool:
    total = 0
    for q in partitions:
        total += int(await rig.client.xlen(rig.keys.dlq(q)))
    return total >= n


class Failing:
    """The appender, whose preparation of an entry fails with an error quoting it."""

    def __init__(self, rig: Rig) -> None:
        self.inner = rig.appender()
        self.group = self.inner.group

    async def process(self, batch):  # type: ignore[no-untyped-def]
        original = self.inner._prepare

        def prepare(ops, entry, partition, found):  # type: ignore[no-untyped-def]
            raise ValueError(f"cannot handle {entry.fields}")

        self.inner._prepare = prepare  # type: ignore[method-assign]
        try:
            return await self.inner.process(batch)
        finally:
            self.inner._prepare = original  # type: ignore[method-assign]

    def letter(self, entry, detail):  # type: ignore[no-untyped-def]
        return self.inner.letter(entry, detail)


async def test_dead_letters_written_by_the_runtime_are_redacted(rig: Rig) -> None:
    processor = Failing(rig)
    published = await rig.publisher.publish(appended(INTAKE, user(f"ssn {SSN}")))
    assert published.receipt is not None
    rig.start("w1", processor)  # type: ignore[arg-type]
    outcome = await rig.reader.wait_applied(
        published.receipt.partition, published.receipt.entry_id, timeout=20
    )
    assert outcome.reason == "failed"
    assert SSN not in str(outcome.detail)
    p = published.receipt.partition
    await rig.eventually(lambda: _ingest_empty(rig, p), timeout=10, what="trimmed")
    assert SSN not in await namespace_dump(rig)


async def test_a_refused_replay_keeps_only_the_redacted_event(rig: Rig) -> None:
    rig.start("w1")
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    event = appended(INTAKE, user(f"ssn {SSN}")).model_dump_json(exclude_none=True)
    entry = str(
        await rig.client.xadd(
            rig.keys.ingest(p), {"event": event, "replay_of": "1-0", "replay_key": "0" * 40}
        )
    )
    outcome = await rig.reader.wait_applied(p, entry, timeout=10)
    assert outcome.reason == "replay_too_old"
    await rig.eventually(lambda: _ingest_empty(rig, p), timeout=10, what="trimmed")
    assert SSN not in await namespace_dump(rig)


async def test_escaped_text_in_a_refused_event_is_redacted_on_its_decoded_form(rig: Rig) -> None:
    rig.start("w1")
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    other = next(q for q in range(PARTITIONS) if q != p)
    escaped = "".join(f"\\u{ord(c):04x}" for c in SSN)  # the same SSN, JSON-escaped
    event = appended(INTAKE, user("x")).model_dump_json(exclude_none=True)
    event = event.replace('"content":"x"', f'"content":"ssn {escaped}"')
    await rig.client.xadd(rig.keys.ingest(other), {"event": event})  # misrouted
    await rig.eventually(lambda: _letters(rig, [other], 1), what="the dead letter")
    [(_, letter)] = await rig.client.xrange(rig.keys.dlq(other))
    assert SSN not in json.dumps(json.loads(letter["event"]), ensure_ascii=False)
    assert escaped not in letter["event"] and "[REMOVED]" in letter["event"]


async def test_idempotency_keys_and_ids_never_keep_personal_data(rig: Rig) -> None:
    rig.start("w1")
    published = await sdk(rig).append(
        INTAKE, user("hello"), idempotency_key=f"visit {SSN}", wait=True
    )
    assert published.outcome is not None and published.outcome.status == "applied"
    again = await sdk(rig).append(INTAKE, user("hello"), idempotency_key=f"visit {SSN}", wait=True)
    assert again.outcome is not None and again.outcome.status == "duplicate"
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    await rig.eventually(lambda: _ingest_empty(rig, p), timeout=10, what="trimmed")
    assert SSN not in await namespace_dump(rig)


async def test_a_key_rendered_from_personal_data_is_refused_at_both_ends(rig: Rig) -> None:
    from events import PublishError

    rig.start("w1")
    personal = MemoryRef.from_raw("acme", "patient-intake", SSN)
    with pytest.raises(PublishError, match="matches a redaction pattern"):
        await sdk(rig).append(personal, user("hi"))
    published = await rig.publisher.publish(appended(personal, user("hi")), wait=True)
    assert published.outcome is not None
    assert (published.outcome.status, published.outcome.reason) == ("refused", "personal_key")
    assert SSN not in str(published.outcome.detail)


async def test_read_only_agents_cannot_clear_delete_or_replace_either(rig: Rig) -> None:
    rig.start("w1")
    await rig.publisher.publish(appended(SUPPORT, user("keep me")), wait=True)
    for call in (
        lambda pub: pub.clear(SUPPORT, agent_id="quality-reviewer"),
        lambda pub: pub.delete(SUPPORT, agent_id="quality-reviewer"),
        lambda pub: pub.replace(SUPPORT, [user("x")], agent_id="quality-reviewer"),
    ):
        with pytest.raises(ReadOnlyError):
            await call(sdk(rig))
        published = await call(rig.publisher)
        outcome = await rig.publisher.wait_applied(published.receipt)
        assert (outcome.status, outcome.reason) == ("refused", "read_only")
    assert await rig.contents(SUPPORT) == ["keep me"]


async def test_a_refused_event_keeps_no_non_persistable_message_in_its_letter(rig: Rig) -> None:
    rig.start("w1")
    tool = Message(role=Role.TOOL, content="TOOLSECRET output", tool_call_id="c1")
    published = await rig.publisher.publish(appended(INTAKE, tool, agent="nobody"), wait=True)
    assert published.outcome is not None
    p = partition_for(INTAKE.memory_id, PARTITIONS)
    other = next(q for q in range(PARTITIONS) if q != p)
    event = appended(INTAKE, tool).model_dump_json(exclude_none=True)
    await rig.client.xadd(rig.keys.ingest(other), {"event": event})  # misrouted
    await rig.eventually(lambda: _letters(rig, [other], 1), what="the dead letter")
    # Both raw events hold the secret until trimmed: ingest:{p} as much as ingest:{other}.
    for q in (p, other):
        await rig.eventually(lambda q=q: _ingest_empty(rig, q), timeout=10, what=f"{q} trimmed")
    assert "TOOLSECRET" not in await namespace_dump(rig)
