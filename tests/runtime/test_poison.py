"""Entries that raw producers can write and no decoder expects: each one is settled
(dead-lettered with a specific reason, or held only for a plausible newer schema), no
attempt is wasted on it, and the event after it is applied."""

from __future__ import annotations

import json

import pytest

from events.envelope import SCHEMA_VERSION
from memory import MemoryRef, partition_for
from store import Group
from tests.runtime.conftest import PARTITIONS, Rig
from tests.runtime.test_appender_worker import raw_event

REF = MemoryRef.parse("acme/customer-support/poison")
P = partition_for(REF.memory_id, PARTITIONS)


def nested(depth: int) -> str:
    """JSON text of ``depth`` arrays nested in one another."""
    return "[" * depth + '"leaf"' + "]" * depth


def replaced(event: str, depth: int) -> str:
    """``event`` with its "NESTED" string replaced by ``depth`` nested arrays."""
    return event.replace('"NESTED"', nested(depth))


def with_message(**fields: object) -> str:
    event = raw_event(REF, "x")
    message = event["payload"]["message"]  # type: ignore[index]
    message.update(fields)  # type: ignore[union-attr]
    return json.dumps(event)


POISON = {
    "role_list": with_message(role=["user"]),
    "role_object": with_message(role={"a": 1}),
    "type_list": json.dumps(raw_event(REF, "x", type=[])),
    "type_object": json.dumps(raw_event(REF, "x", type={"a": "b"})),
    "deep_array": nested(3000),
    "deep_payload": replaced(json.dumps(raw_event(REF, "x", payload="NESTED")), 3000),
    "deep_metadata": replaced(with_message(metadata={"m": "NESTED"}), 300),
    "metadata_just_over": replaced(with_message(metadata={"m": "NESTED"}), 70),
    "huge_version": json.dumps(raw_event(REF, "x", schema_version=10**30)),
    "float_version": json.dumps(raw_event(REF, "x", schema_version=3.0)),
}


@pytest.mark.parametrize("case", sorted(POISON))
async def test_a_poison_entry_is_refused_at_once_and_the_partition_flows(
    rig: Rig, case: str
) -> None:
    rig.start("w1")
    ingest = rig.keys.ingest(P)
    bad = str(await rig.client.xadd(ingest, {"event": POISON[case]}))
    good = str(await rig.client.xadd(ingest, {"event": json.dumps(raw_event(REF, "after"))}))
    outcome = await rig.reader.wait_applied(P, bad, timeout=10)
    assert outcome.status == "refused"
    assert outcome.reason == "invalid", outcome.detail
    assert (await rig.reader.wait_applied(P, good, timeout=10)).status == "applied"
    # Refused as input, not as a failure: no attempt was ever counted for it.
    assert rig.metrics.failed_attempts.labels(Group.APPENDER.value)._value.get() == 0
    (letter,) = [f for _, f in await rig.client.xrange(rig.keys.dlq(P))]
    assert letter["entry"] == bad and letter["reason"] == "invalid"


async def test_a_plausible_newer_schema_still_holds_the_partition(rig: Rig) -> None:
    rig.start("w1")
    ingest = rig.keys.ingest(P)
    newer = str(
        await rig.client.xadd(
            ingest, {"event": json.dumps(raw_event(REF, "x", schema_version=SCHEMA_VERSION + 1))}
        )
    )
    held = rig.keys.held(P, Group.APPENDER)
    await rig.eventually(lambda: rig.client.get(held), what="the partition held")
    marker = json.loads(str(await rig.client.get(held)))
    assert marker["entry"] == newer
    assert await rig.reader.outcome(P, newer) is None
