"""Budget-aware reads: a reader never gets more than the budget, protected messages
first, and its use of messages is recorded for lru / lfu."""

from __future__ import annotations

from memory import MemoryRef, Message, Role, partition_for
from store import Flushes
from tests.runtime.conftest import PARTITIONS, TOKENIZERS, Rig, user

REF = MemoryRef.parse("acme/customer-support/context-1")


async def _publish(rig: Rig) -> list[Message]:
    messages = [
        Message(role=Role.SYSTEM, content="You are the support agent of Acme."),
        *(user(f"question {i}: " + "lorem ipsum " * 20) for i in range(10)),
    ]
    for m in messages:
        await rig.publisher.append(REF, m, wait=True)
    return messages


async def test_never_more_than_the_budget_counting_what_is_not_counted_yet(rig: Rig) -> None:
    rig.start("appender")  # no accountant: nothing is counted, the reader counts
    messages = await _publish(rig)
    resource = rig.registry["customer-support"]
    counter = TOKENIZERS.for_resource(resource)
    sizes = [counter.message(m) for m in messages]
    budget = sizes[0] + sizes[-1] + sizes[-2] + sizes[-3] + 1  # system + the newest three
    window = await rig.reader.read_context(REF, resource, counter, budget=budget)
    assert window.tokens <= budget and window.budget == budget and not window.over_budget
    assert [str(m.content) for m in window.messages] == [
        str(messages[0].content),
        *(str(m.content) for m in messages[-3:]),
    ]
    assert window.tokens == sizes[0] + sum(sizes[-3:])
    # The whole budget of the resource holds everything.
    everything = await rig.reader.read_context(REF, resource, counter)
    assert len(everything.messages) == len(messages) and everything.budget == 4000


async def test_stored_counts_are_used_once_counted(rig: Rig) -> None:
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    messages = await _publish(rig)
    resource = rig.registry["customer-support"]
    counter = TOKENIZERS.for_resource(resource)

    async def counted() -> bool:
        view = await rig.reader.read(REF)
        return view.counted == len(messages)

    await rig.eventually(counted, what="the accountant")
    view = await rig.reader.read(REF)
    window = await rig.reader.read_context(REF, resource, counter, budget=view.tokens)
    assert len(window.messages) == len(messages) and window.tokens == view.tokens
    smaller = await rig.reader.read_context(REF, resource, counter, budget=view.tokens - 1)
    assert len(smaller.messages) == len(messages) - 1
    assert smaller.messages[0].role is Role.SYSTEM  # the oldest other message went


async def test_protected_messages_alone_over_the_budget_are_flagged(rig: Rig) -> None:
    rig.start("appender")
    rules = [Message(role=Role.SYSTEM, content=f"rule {i}: " + "be kind " * 30) for i in range(3)]
    for m in [*rules, user("hello")]:
        await rig.publisher.append(REF, m, wait=True)
    resource = rig.registry["customer-support"]
    counter = TOKENIZERS.for_resource(resource)
    one = counter.message(rules[0])
    window = await rig.reader.read_context(REF, resource, counter, budget=one * 2 + 1)
    assert window.over_budget
    assert [str(m.content) for m in window.messages] == [str(r.content) for r in rules[1:]]
    assert window.tokens <= one * 2 + 1


async def test_a_context_read_records_the_use_of_what_it_returned(rig: Rig) -> None:
    rig.start("appender")
    messages = await _publish(rig)
    resource = rig.registry["customer-support"]
    counter = TOKENIZERS.for_resource(resource)
    budget = counter.message(messages[0]) + counter.message(messages[-1])
    window = await rig.reader.read_context(REF, resource, counter, budget=budget)
    chosen = {m.seq for m in window.messages}
    assert len(chosen) == 2
    p = partition_for(REF.memory_id, PARTITIONS)
    flushes = Flushes(rig.scripts, rig.keys)

    async def recorded() -> bool:
        snapshot = await flushes.snapshot(p, REF.memory_id)
        return set(snapshot.uses) == chosen and all(v == 1 for v in snapshot.uses.values())

    await rig.eventually(recorded, what="the use to be recorded")
    snapshot = await flushes.snapshot(p, REF.memory_id)
    assert set(snapshot.last_used) == chosen


async def test_a_memory_whose_meta_is_gone_fills_no_context(rig: Rig) -> None:
    rig.start("appender")
    await _publish(rig)
    k = rig.keys.memory(partition_for(REF.memory_id, PARTITIONS), REF.memory_id)
    await rig.client.delete(k.meta)  # as if it had expired before the other keys
    resource = rig.registry["customer-support"]
    window = await rig.reader.read_context(REF, resource, TOKENIZERS.for_resource(resource))
    assert window.messages == [] and window.tokens == 0 and not window.over_budget
    assert not window.view.exists
