"""Budget-aware reads: a reader never gets more than the budget, protected messages
first, and its use of messages is recorded for lru / lfu."""

from __future__ import annotations

from events import AppendPayload, MemoryName, MessageAppended
from memory import MemoryRef, MemoryResource, Message, ResourceRegistry, Role, partition_for
from memory.flush import Counted, Priorities, fit_budget
from memory.resource import KeywordPriority, Priority
from store import ContextWindow, Flushes
from tests.runtime.conftest import PARTITIONS, TOKENIZERS, Rig, user

REF = MemoryRef.parse("acme/customer-support/context-1")


def appended_message(ref: MemoryRef, message: Message) -> MessageAppended:
    name = MemoryName(resource=ref.resource, key=ref.key)
    return MessageAppended(tenant=ref.tenant, payload=AppendPayload(memory=name, message=message))


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


# -- reads that follow the window: the accountant's index of protected messages --------


def _resource_with(rig: Rig, priority: Priority) -> MemoryResource:
    return rig.registry["customer-support"].model_copy(update={"priority": priority})


async def _window_is_the_rules(
    rig: Rig, ref: MemoryRef, resource: MemoryResource, budget: int
) -> ContextWindow:
    """read_context, checked against the budget rules over the whole memory."""
    counter = TOKENIZERS.for_resource(resource)
    window = await rig.reader.read_context(ref, resource, counter, budget=budget, touch=False)
    view = await rig.reader.read(ref)
    entries = [
        Counted(m, c if c is not None else counter.message(m))
        for m, c in zip(view.messages, view.token_counts, strict=True)
    ]
    chosen, over = fit_budget(entries, budget, Priorities(resource.priority))
    assert [m.seq for m in window.messages] == [e.seq for e in chosen]
    assert (window.tokens, window.over_budget) == (sum(e.tokens for e in chosen), over)
    return window


async def _counted(rig: Rig, ref: MemoryRef, n: int) -> bool:
    view = await rig.reader.read(ref)
    return view.count == n and view.counted == n


async def test_protected_messages_the_accountant_counted_are_found_without_the_memory(
    rig: Rig,
) -> None:
    ref = MemoryRef.parse("acme/customer-support/indexed-1")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    system = Message(role=Role.SYSTEM, content="You are the support agent of Acme.")
    await rig.publisher.publish_many(
        [appended_message(ref, m) for m in [system, *(user(f"question {i}") for i in range(80))]]
    )
    await rig.eventually(lambda: _counted(rig, ref, 81), what="the accountant")
    resource = rig.registry["customer-support"]
    window = await _window_is_the_rules(rig, ref, resource, 100)
    assert window.messages[0].role is Role.SYSTEM and len(window.messages) > 3
    assert window.read < 30  # the window and the system message: not the 81


async def test_the_accountant_indexes_a_memory_again_under_new_priority_rules(rig: Rig) -> None:
    ref = MemoryRef.parse("acme/customer-support/indexed-2")
    accountant = rig.accountant()
    rig.start("appender")
    rig.start("accountant", accountant)
    first = [user("I want a refund"), *(user(f"question {i}") for i in range(60))]
    await rig.publisher.publish_many([appended_message(ref, m) for m in first])
    await rig.eventually(lambda: _counted(rig, ref, 61), what="the accountant")
    stricter = _resource_with(
        rig, Priority(keywords=[KeywordPriority(pattern="(?i)refund", priority=100)])
    )
    # Readers with the new rules: no index of them yet, so the whole memory is read.
    window = await _window_is_the_rules(rig, ref, stricter, 60)
    assert window.read == 61 and str(window.messages[0].content) == "I want a refund"
    # The accountant gets the new rules (a reload) and counts the next message: it
    # indexes every message again.
    accountant.registry = ResourceRegistry([stricter])
    await rig.publisher.append(ref, user("one more"))
    await rig.eventually(lambda: _counted(rig, ref, 62), what="the accountant")
    window = await _window_is_the_rules(rig, ref, stricter, 60)
    assert window.read < 20 and str(window.messages[0].content) == "I want a refund"


async def test_a_memory_counted_before_indexes_existed_is_indexed_at_its_next_count(
    rig: Rig,
) -> None:
    ref = MemoryRef.parse("acme/customer-support/indexed-3")
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    system = Message(role=Role.SYSTEM, content="You are the support agent of Acme.")
    await rig.publisher.publish_many(
        [appended_message(ref, m) for m in [system, *(user(f"question {i}") for i in range(40))]]
    )
    await rig.eventually(lambda: _counted(rig, ref, 41), what="the accountant")
    k = rig.keys.memory(partition_for(ref.memory_id, PARTITIONS), ref.memory_id)
    await rig.client.hdel(k.tok, "prot", "prot:seqs")  # as counted by an older accountant
    resource = rig.registry["customer-support"]
    assert (await _window_is_the_rules(rig, ref, resource, 60)).read == 41
    await rig.publisher.append(ref, user("one more"))
    await rig.eventually(lambda: _counted(rig, ref, 42), what="the accountant")
    window = await _window_is_the_rules(rig, ref, resource, 60)
    assert window.read < 20 and window.messages[0].role is Role.SYSTEM
