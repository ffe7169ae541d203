"""Whatever a raw producer writes, the processors settle it and go on (property-based).

Hypothesis writes arbitrary JSON, arbitrary bytes and mutations of valid events (every
field dropped, every value replaced by each kind of JSON value, nesting past any parser,
huge strings, bytes that are not UTF-8) straight into an ingest stream and into the
lifecycle stream, against a running appender and cleanup processor. For every entry:
it is settled (applied, or refused with a specific reason: never ``failed``, which
would mean it cost attempts), no worker dies, and a valid event written after it is
applied. An event of a plausible newer schema is held by design (tested in
test_poison.py); those are left out here.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from events import NewerSchemaError, Publisher, decode
from memory import MemoryRef, ResourceRegistry, partition_for
from store import Group, Keys, MemoryReader, Scripts, connect, ensure_partitions
from tests.runtime.conftest import PARTITIONS, ROOT, Rig
from tests.runtime.test_appender_worker import raw_event

T = TypeVar("T")
REF = MemoryRef.parse("acme/customer-support/properties")
P = partition_for(REF.memory_id, PARTITIONS)
#: What a refusal of an entry's own content may say (``failed`` and
#: ``attempts_exhausted`` mean it cost attempts: the class of bug this test closes).
SPECIFIC = {
    "invalid",
    "missing_field",
    "not_json",
    "not_utf8",
    "oversized",
    "unknown_type",
    "unsupported_version",
    "unknown_resource",
    "misrouted",
    "wrong_stream",
    "personal_key",
    "read_only",
    "too_large",
    "workflow_ended",
    "non_persistable",
    "no_such_memory",
    "already_ended",
    "idempotency_key",
    "already_applied",
    "replay_too_old",
    "replay_before_reset",
    "backup_not_latest",
    "backup_gone",
}


class Harness:
    """An event loop in a thread running an appender and a cleanup worker on one
    namespace, driven by a synchronous (hypothesis) test."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.rig: Rig = self.run(self._start(url))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, url: str) -> Rig:
        client = connect(url)
        scripts = Scripts(client, strict=True)
        await scripts.load()
        keys = Keys(f"prop{id(self):x}")
        await ensure_partitions(client, keys, PARTITIONS)
        registry = ResourceRegistry.load([ROOT / "memories"])
        publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=PARTITIONS)
        rig = Rig(client, scripts, keys, registry, publisher, MemoryReader(client, scripts, keys))
        rig.start("appender")
        rig.start_cleanup()
        await publisher.append(REF, raw_message("ready"), wait=True)  # groups in place
        return rig

    def alive(self) -> bool:
        return all(not task.done() for _, _, task in self.rig.running.values())

    def close(self) -> None:
        async def stop() -> None:
            await self.rig.stop_all()
            await self.rig.client.aclose()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def raw_message(text: str) -> Any:
    from memory import Message, Role

    return Message(role=Role.USER, content=text)


@pytest.fixture(scope="module")
def harness(redis_url: str) -> Iterator[Harness]:
    h = Harness(redis_url)
    yield h
    h.close()


# What raw producers may write.

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(exclude_categories=()), max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

VALID: list[dict[str, Any]] = [
    raw_event(REF, "hello", payload={**raw_event(REF, "x")["payload"], "workflow_id": "wf-p"}),  # type: ignore[dict-item]
    {
        **raw_event(REF, "x"),
        "type": "memory.replaced",
        "payload": {
            "memory": {"resource": REF.resource, "key": REF.key},
            "messages": [
                {"role": "system", "content": "s", "metadata": {"a": [1, {"b": "c"}]}},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
            ],
        },
    },
    {
        **raw_event(REF, "x"),
        "type": "message.erased",
        "payload": {"memory": {"resource": REF.resource, "key": REF.key}, "seq": 1},
    },
    {
        **raw_event(REF, "x"),
        "type": "flush.requested",
        "payload": {"memory": {"resource": REF.resource, "key": REF.key}, "strategy": "fifo"},
    },
    {
        "schema_version": 3,
        "type": "workflow.terminated",
        "tenant": "acme",
        "event_id": "e1",
        "payload": {"workflow_id": "wf-other", "status": "completed"},
    },
]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += paths(v, (*prefix, i))
    return found


def put(data: Any, path: tuple[Any, ...], value: Any, *, drop: bool = False) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


NESTED = '"__NESTED__"'


@st.composite
def mutated(draw: st.DrawFn) -> str | bytes:
    event = draw(st.sampled_from(VALID))
    path = draw(st.sampled_from(paths(event)))
    how = draw(st.sampled_from(["drop", "replace", "nest", "huge", "surrogate"]))
    if how == "drop":
        return json.dumps(put(event, path, None, drop=True))
    if how == "replace":
        return json.dumps(put(event, path, draw(json_values)))
    if how == "surrogate":  # a lone UTF-16 surrogate, as a JSON escape (valid UTF-8 text)
        lone = chr(draw(st.integers(min_value=0xD800, max_value=0xDFFF)))
        return json.dumps(put(event, path, f"text {lone}"))
    if how == "nest":
        depth = draw(st.integers(min_value=50, max_value=3000))
        text = json.dumps(put(event, path, "__NESTED__"))
        return text.replace(NESTED, "[" * depth + "1" + "]" * depth)
    size = draw(st.sampled_from([70_000, 300_000, 1_100_000]))
    return json.dumps(put(event, path, "x" * size))


@st.composite
def not_utf8(draw: st.DrawFn) -> bytes:
    data = json.dumps(draw(st.sampled_from(VALID))).encode()
    at = draw(st.integers(min_value=0, max_value=len(data)))
    junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]))
    return data[:at] + junk + data[at:]


@st.composite
def with_replay_fields(draw: st.DrawFn) -> dict[str, str | bytes]:
    """A valid event with replay fields a producer made up (only a replay writes them)."""
    fields: dict[str, str | bytes] = {"event": json.dumps(draw(st.sampled_from(VALID)))}
    stream_id = st.tuples(st.integers(0, 2**64), st.integers(0, 99)).map(lambda t: f"{t[0]}-{t[1]}")
    fields["replay_of"] = draw(stream_id | st.text(max_size=20))
    if draw(st.booleans()):
        fields["replay_key"] = draw(st.text(max_size=50) | st.just("0" * 40))
    return fields


#: Entries no strategy above is likely to hit by chance, kept as fixed examples.
UNTERMINATED = "[" * 70 + '"\\' * 24_000  # many brackets, then a string that never ends
NEWER_GARBAGE = json.dumps({"schema_version": 99, "type": [], "tenant": {}})
NEWER_BARE = json.dumps({"schema_version": 5})

raw_entries = st.one_of(
    mutated(),
    not_utf8(),
    with_replay_fields(),
    st.binary(max_size=100),
    json_values.map(json.dumps),
    st.sampled_from([UNTERMINATED, NEWER_GARBAGE, NEWER_BARE]),
)


def newer(entry: Entry) -> bool:
    """Held for a newer schema by design (left out here)."""
    if isinstance(entry, dict):
        entry = entry["event"]
    if isinstance(entry, bytes):
        try:
            entry = entry.decode("utf-8")
        except UnicodeDecodeError:
            return False
    try:
        decode({"event": entry})
    except NewerSchemaError:
        return True
    except Exception:
        return False
    return False


Entry = str | bytes | dict[str, str | bytes]


async def write_and_check(rig: Rig, entries: list[Entry], lifecycle: bool) -> None:
    stream = rig.keys.lifecycle if lifecycle else rig.keys.ingest(P)
    partition, group = (0, Group.CLEANUP) if lifecycle else (P, Group.APPENDER)
    ids = [
        str(await rig.client.xadd(stream, e if isinstance(e, dict) else {"event": e}))  # type: ignore[arg-type]
        for e in entries
    ]
    good = (
        {
            "schema_version": 3,
            "type": "workflow.started",
            "tenant": "acme",
            "event_id": "ok",
            "payload": {"workflow_id": "wf-fine"},
        }
        if lifecycle
        else raw_event(REF, "after")
    )
    after = str(await rig.client.xadd(stream, {"event": json.dumps(good)}))
    waits = [(partition, i, "") for i in [*ids, after]]
    outcomes = await rig.reader.wait_applied_many(waits, 20, group=group)
    for entry_id, outcome in zip(ids, outcomes[:-1], strict=True):
        assert outcome is not None, entry_id
        if outcome.status == "refused":
            assert outcome.reason in SPECIFIC, (outcome.reason, outcome.detail)
    last = outcomes[-1]
    assert last is not None and last.status == "applied", last


@pytest.mark.parametrize("lifecycle", [False, True], ids=["ingest", "lifecycle"])
def test_every_raw_entry_settles_and_the_stream_goes_on(harness: Harness, lifecycle: bool) -> None:
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @example([UNTERMINATED])
    @example([NEWER_GARBAGE, NEWER_BARE])
    @given(st.lists(raw_entries, min_size=1, max_size=4).filter(lambda es: not any(map(newer, es))))
    def check(entries: list[Entry]) -> None:
        harness.run(write_and_check(harness.rig, entries, lifecycle))
        assert harness.alive()
        seen.append(len(entries))

    seen: list[int] = []
    check()
    assert len(seen) >= 60  # every example ran against the workers
    failed = harness.rig.metrics.failed_attempts.labels(
        (Group.CLEANUP if lifecycle else Group.APPENDER).value
    )._value.get()
    assert failed == 0
