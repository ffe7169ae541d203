"""The LangChain chat message history against real Redis and a running appender (in its
own thread and loop, so the sync methods can block the test's loop)."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core._api.deprecation import LangChainDeprecationWarning
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

import events.langchain as adapter
from events import Publisher, ReadOnlyError
from events.langchain import (
    ConversionError,
    HistoryError,
    MemstreamChatMessageHistory,
    WriteRefusedError,
    from_memstream,
    to_memstream,
)
from memory import MemoryRef, ResourceRegistry, Role, StoredMessage
from memory.agents import MemoryMode, ResolvedMemory
from processors import Appender, Worker
from processors.metrics import Metrics
from store import Keys, MemoryReader, MemoryStore, Retention, Scripts, connect, ensure_partitions
from tests.runtime.conftest import FAST, PARTITIONS, ROOT

REF = MemoryRef.parse("acme/customer-support/lc-1")
REGISTRY = ResourceRegistry.load([ROOT / "memories"])


class AppenderThread:
    """An appender worker on its own loop in a thread, with its own client."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.url, self.keys = url, keys
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="appender", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        client = connect(self.url)
        try:
            scripts = Scripts(client, strict=True)
            await scripts.load()
            await ensure_partitions(client, self.keys, PARTITIONS)
            metrics = Metrics()
            store = MemoryStore(scripts, self.keys, Retention())
            processor = Appender(store, self.keys, REGISTRY, PARTITIONS, metrics=metrics)
            worker = Worker(
                client, scripts, self.keys, processor, PARTITIONS, FAST, "lc", metrics=metrics
            )
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            self.ready.set()
            await worker.run(self.stop_event)
        finally:
            await client.aclose()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10), "the appender did not start"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(15)
        assert not self.thread.is_alive(), "the appender did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def appender(default_redis_url: str, keys: Keys) -> Iterator[AppenderThread]:
    worker = AppenderThread(default_redis_url, keys)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def url(appender: AppenderThread) -> str:
    return appender.url


def history(url: str, keys: Keys, ref: MemoryRef = REF, **kwargs: Any) -> Any:
    return MemstreamChatMessageHistory(
        ref, url=url, keys=keys, default_partitions=PARTITIONS, **kwargs
    )


def every_kind() -> list[BaseMessage]:
    return [
        SystemMessage("You help with orders."),
        SystemMessage("Be brief.", additional_kwargs={"__openai_role__": "developer"}),
        HumanMessage("Where is order 42?", name="ada", id="m-1"),
        AIMessage(
            "",
            tool_calls=[
                {"name": "track", "args": {"order": 42, "deep": {"x": [1, "ü"]}}, "id": "c1"},
                {"name": "eta", "args": {}, "id": "c2"},
            ],
        ),
        ToolMessage("in transit", tool_call_id="c1", name="track"),
        ToolMessage("unknown", tool_call_id="c2", status="error"),
        AIMessage("It is in transit.", response_metadata={"memstream": {"priority": 7}}),
        ChatMessage(role="critic", content="Could be friendlier."),
        ChatMessage(role="assistant", content="Noted."),
        HumanMessage(
            ["see", {"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
            response_metadata={"memstream": {"metadata": {"channel": "web"}}},
        ),
    ]


def same(a: BaseMessage, b: BaseMessage) -> None:
    """``b`` (read back) holds everything of ``a`` that memstream stores."""
    assert type(b) is type(a), (a, b)
    content = a.content
    if isinstance(content, list):
        content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in content]
    assert b.content == content
    assert (b.name, b.id, b.additional_kwargs) == (a.name, a.id, a.additional_kwargs)
    own = a.response_metadata.get("memstream", {})
    read = b.response_metadata["memstream"]
    assert read["metadata"] == own.get("metadata", {})
    assert read.get("priority") == own.get("priority")
    assert read["summary"] is False and read["seq"] > 0
    if isinstance(a, AIMessage):
        assert isinstance(b, AIMessage)
        assert b.tool_calls == a.tool_calls and b.invalid_tool_calls == a.invalid_tool_calls
    if isinstance(a, ToolMessage):
        assert isinstance(b, ToolMessage)
        assert (b.tool_call_id, b.status) == (a.tool_call_id, a.status)
    if isinstance(a, ChatMessage):
        assert isinstance(b, ChatMessage) and b.role == a.role


def test_it_is_a_chat_message_history_whose_conveniences_use_the_bulk_add(
    url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    publish_many = Publisher.publish_many

    async def counted(self: Publisher, events: Any, **kwargs: Any) -> Any:
        batches.append(len(events))
        return await publish_many(self, events, **kwargs)

    monkeypatch.setattr(Publisher, "publish_many", counted)
    with history(url, keys) as h:
        assert isinstance(h, BaseChatMessageHistory)
        h.add_user_message("hi")
        h.add_ai_message(AIMessage("hello"))
        h.add_message(SystemMessage("sys"))
        h.add_messages([HumanMessage("a"), AIMessage("b"), HumanMessage("c")])
        assert batches == [1, 1, 1, 3]  # one round trip per call, the bulk one too
        got = h.messages  # read right after the writes: they are applied
        assert [(type(m), m.content) for m in got] == [
            (HumanMessage, "hi"),
            (AIMessage, "hello"),
            (SystemMessage, "sys"),
            (HumanMessage, "a"),
            (AIMessage, "b"),
            (HumanMessage, "c"),
        ]
        assert str(h) == "Human: hi\nAI: hello\nSystem: sys\nHuman: a\nAI: b\nHuman: c"
        h.clear()
        assert h.messages == []
        h.add_messages([HumanMessage("after")])
        assert [m.content for m in h.messages] == ["after"]


async def test_async_methods_read_their_writes_on_the_callers_loop(url: str, keys: Keys) -> None:
    async with history(url, keys, agent_id="support-agent", workflow_id="wf-1") as h:
        assert await h.aget_messages() == []
        await h.aadd_messages([HumanMessage("one"), AIMessage("two")])
        got = await h.aget_messages()
        assert [m.content for m in got] == ["one", "two"]
        meta = got[0].response_metadata["memstream"]
        assert (meta["agent"], meta["workflow"]) == ("support-agent", "wf-1")
        await h.aclear()
        assert await h.aget_messages() == []
        await h.areplace([HumanMessage("x"), AIMessage("y")])
        assert [m.content for m in await h.aget_messages()] == ["x", "y"]


def test_every_message_kind_round_trips(url: str, keys: Keys) -> None:
    sent = every_kind()
    with history(url, keys) as h:
        h.add_messages(sent)
        got = h.messages
        assert len(got) == len(sent)
        for a, b in zip(sent, got, strict=True):
            same(a, b)
        h.add_messages(got)  # what was read can be written again, unchanged
        again = h.messages[len(sent) :]
        for a, b in zip(sent, again, strict=True):
            same(a, b)
        h.messages = sent[:2]  # the setter replaces the whole memory
        assert [m.content for m in h.messages] == [m.content for m in sent[:2]]


async def test_messages_are_stored_as_plain_memstream_messages(url: str, keys: Keys) -> None:
    async with history(url, keys) as h:
        await h.aadd_messages(every_kind())
        client = connect(url)
        try:
            view = await MemoryReader(client, Scripts(client), keys).read(REF)
        finally:
            await client.aclose()
    stored = view.messages
    assert [m.role for m in stored] == [
        Role.SYSTEM,
        Role.DEVELOPER,
        Role.USER,
        Role.ASSISTANT,
        Role.TOOL,
        Role.TOOL,
        Role.ASSISTANT,
        Role.USER,
        Role.ASSISTANT,
        Role.USER,
    ]
    calls = stored[3].tool_calls or []
    assert [(c.id, c.function.name) for c in calls] == [("c1", "track"), ("c2", "eta")]
    assert calls[0].function.arguments == '{"order": 42, "deep": {"x": [1, "ü"]}}'
    assert (stored[4].tool_call_id, stored[4].name) == ("c1", "track")
    assert stored[2].name == "ada" and stored[6].priority == 7
    assert stored[9].metadata == {"channel": "web"}
    assert stored[7].metadata == {"langchain": {"role": "critic"}}


def test_a_read_only_memory_refuses_writes_and_publishes_nothing(url: str, keys: Keys) -> None:
    resource = REGISTRY.get_resource("customer-support")
    with history(url, keys) as writer:
        writer.add_messages([HumanMessage("kept")])
    readonly = ResolvedMemory(REF, MemoryMode.READ_ONLY, resource)
    with _resolved(url, keys, readonly) as h:
        with pytest.raises(ReadOnlyError):
            h.add_messages([HumanMessage("nope")])
        with pytest.raises(ReadOnlyError):
            h.add_user_message("nope")
        with pytest.raises(ReadOnlyError):
            h.clear()
        assert [m.content for m in h.messages] == ["kept"]  # reading is allowed


def _resolved(url: str, keys: Keys, memory: ResolvedMemory) -> MemstreamChatMessageHistory:
    return MemstreamChatMessageHistory(memory, url=url, keys=keys, default_partitions=PARTITIONS)


async def test_a_read_only_agent_is_refused_by_the_registry(url: str, keys: Keys) -> None:
    async with history(url, keys, registry=REGISTRY, agent_id="quality-reviewer") as h:
        with pytest.raises(ReadOnlyError):
            await h.aadd_messages([HumanMessage("review")])
        assert await h.aget_messages() == []


async def test_a_refused_outcome_raises_a_typed_error(url: str, keys: Keys) -> None:
    unknown = MemoryRef.parse("acme/no-such-resource/x")
    async with history(url, keys, unknown) as h:
        with pytest.raises(WriteRefusedError) as caught:
            await h.aadd_messages([HumanMessage("a"), HumanMessage("b")])
        assert caught.value.refused == [0, 1]
        outcome = caught.value.outcomes[0]
        assert outcome is not None and outcome.reason == "unknown_resource"
        assert "unknown_resource" in str(caught.value)
        with pytest.raises(WriteRefusedError):
            await h.aclear()


async def test_a_message_the_privacy_policy_never_stores_raises(url: str, keys: Keys) -> None:
    intake = MemoryRef.parse("acme/patient-intake/p-1")
    async with history(url, keys, intake, registry=REGISTRY) as h:
        with pytest.raises(WriteRefusedError) as caught:
            await h.aadd_messages([HumanMessage("hello"), SystemMessage("internal")])
        assert caught.value.refused == [1]
        outcome = caught.value.outcomes[1]
        assert outcome is not None and outcome.reason == "non_persistable"
        assert [m.content for m in await h.aget_messages()] == ["hello"]


async def test_sync_methods_work_inside_a_running_loop(url: str, keys: Keys) -> None:
    asyncio.get_running_loop()  # this test runs inside the loop
    async with history(url, keys) as h:
        h.add_messages([HumanMessage("sync")])
        await h.aadd_messages([AIMessage("async")])
        assert [m.content for m in h.messages] == ["sync", "async"]
        assert [m.content for m in await h.aget_messages()] == ["sync", "async"]
        h.clear()
        assert await h.aget_messages() == []


async def test_a_history_on_a_given_client_keeps_to_one_loop(url: str, keys: Keys) -> None:
    client = connect(url)
    try:
        h = MemstreamChatMessageHistory(
            REF, client=client, keys=keys, default_partitions=PARTITIONS
        )
        await h.aadd_messages([HumanMessage("mine")])
        assert [m.content for m in await h.aget_messages()] == ["mine"]
        with pytest.raises(HistoryError, match="url="):
            h.add_messages([HumanMessage("from another loop")])
        await h.aclose()
        assert await client.ping()  # the caller's client stays open
    finally:
        await client.aclose()


def test_the_sync_methods_can_use_a_given_client(url: str, keys: Keys) -> None:
    client = connect(url)
    with MemstreamChatMessageHistory(
        REF, client=client, keys=keys, default_partitions=PARTITIONS
    ) as h:
        h.add_messages([HumanMessage("sync only")])
        assert [m.content for m in h.messages] == ["sync only"]
    assert asyncio.run(_ping_and_close(client))  # usable on another loop afterwards


async def _ping_and_close(client: Any) -> bool:
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


def test_either_url_or_client_is_required() -> None:
    with pytest.raises(HistoryError):
        MemstreamChatMessageHistory(REF)


async def test_a_large_memory_is_read_page_by_page_within_one_generation(
    url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapter, "MAX_PAGE", 2)
    read = MemoryReader.read
    pages: list[int | None] = []
    async with history(url, keys) as h, history(url, keys) as other:
        await h.aadd_messages([HumanMessage(f"old {i}") for i in range(5)])

        async def replaced_once(self: MemoryReader, ref: MemoryRef, **kwargs: Any) -> Any:
            pages.append(kwargs.get("after"))
            if pages.count(2) == 1 and kwargs.get("after") == 2:  # between two pages
                pages.append(-1)
                await other.areplace([HumanMessage(f"new {i}") for i in range(3)])
            return await read(self, ref, **kwargs)

        monkeypatch.setattr(MemoryReader, "read", replaced_once)
        got = [m.content for m in await h.aget_messages()]
    assert got == ["new 0", "new 1", "new 2"]  # never a mix of two generations
    assert pages.count(-1) == 1 and pages.count(0) >= 2  # it read again from the start


def test_a_summary_reads_as_a_system_message_that_says_so() -> None:
    stored = StoredMessage(
        seq=9, gen=1, at=1, entry="1-0", role=Role.ASSISTANT, content="Summary", covers=[1, 2]
    )
    message = from_memstream(stored)
    assert type(message) is SystemMessage and message.content == "Summary"
    meta = message.response_metadata["memstream"]
    assert (meta["summary"], meta["covers"], meta["seq"]) == (True, [1, 2], 9)
    plain = from_memstream(stored.model_copy(update={"covers": None}))
    assert type(plain) is AIMessage and plain.response_metadata["memstream"]["summary"] is False


def test_arguments_that_are_not_a_json_object_read_as_invalid_tool_calls() -> None:
    message = to_memstream(
        AIMessage(
            "",
            invalid_tool_calls=[
                {
                    "name": "f",
                    "args": "{oops",
                    "id": "c9",
                    "error": None,
                    "type": "invalid_tool_call",
                }
            ],
        )
    )
    back = from_memstream(message)
    assert isinstance(back, AIMessage) and back.tool_calls == []
    assert [(c["id"], c["name"], c["args"]) for c in back.invalid_tool_calls] == [
        ("c9", "f", "{oops")
    ]


@pytest.mark.parametrize(
    "message",
    [
        AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": None}]),
        FunctionMessage(content="x", name="f"),
        HumanMessage([{"text": "a part without a type"}]),
        ChatMessage(role="tool", content="a tool message needs tool_call_id"),
        HumanMessage("x", response_metadata={"memstream": {"priority": "high"}}),
    ],
    ids=["tool-call-without-id", "function-message", "untyped-part", "chat-tool", "priority"],
)
def test_what_memstream_cannot_store_is_a_clear_error(message: BaseMessage) -> None:
    with pytest.raises(ConversionError):
        to_memstream(message)


def test_runnable_with_message_history_keeps_the_conversation(url: str, keys: Keys) -> None:
    seen: list[list[BaseMessage]] = []
    chain, histories = _chain(url, keys, seen, ["Hello Ada!", "You are Ada."])
    config: Any = {"configurable": {"session_id": "s-1"}}
    try:
        assert chain.invoke({"question": "I am Ada."}, config=config).content == "Hello Ada!"
        assert chain.invoke({"question": "Who am I?"}, config=config).content == "You are Ada."
        stored = histories["s-1"].messages
    finally:
        for h in histories.values():
            h.close()
    assert [(type(m), m.content) for m in stored] == [
        (HumanMessage, "I am Ada."),
        (AIMessage, "Hello Ada!"),
        (HumanMessage, "Who am I?"),
        (AIMessage, "You are Ada."),
    ]
    assert [m.content for m in seen[1]] == [
        "Be brief.",
        "I am Ada.",
        "Hello Ada!",
        "Who am I?",
    ]


async def test_runnable_with_message_history_async(url: str, keys: Keys) -> None:
    seen: list[list[BaseMessage]] = []
    chain, histories = _chain(url, keys, seen, ["one", "two"])
    config: Any = {"configurable": {"session_id": "s-2"}}
    try:
        await chain.ainvoke({"question": "q1"}, config=config)
        await chain.ainvoke({"question": "q2"}, config=config)
        stored = await histories["s-2"].aget_messages()
    finally:
        for h in histories.values():
            await h.aclose()
    assert [m.content for m in stored] == ["q1", "one", "q2", "two"]
    assert [m.content for m in seen[1]][1:] == ["q1", "one", "q2"]


def _chain(
    url: str, keys: Keys, seen: list[list[BaseMessage]], responses: list[str]
) -> tuple[Any, dict[str, MemstreamChatMessageHistory]]:
    histories: dict[str, MemstreamChatMessageHistory] = {}

    def session(session_id: str) -> MemstreamChatMessageHistory:
        ref = MemoryRef.from_raw("acme", "customer-support", session_id)
        return histories.setdefault(session_id, history(url, keys, ref))

    def record(value: Any) -> Any:
        seen.append(value.to_messages())
        return value

    prompt = ChatPromptTemplate.from_messages(
        [("system", "Be brief."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    model = FakeListChatModel(responses=responses)
    with warnings.catch_warnings():
        # langchain-core 1.3.3 and later deprecate it (removal in 2.0); it is still the
        # way a chat message history is wired into a chain.
        warnings.filterwarnings(
            "ignore", "RunnableWithMessageHistory is deprecated", LangChainDeprecationWarning
        )
        chain = RunnableWithMessageHistory(
            prompt | RunnableLambda(record) | model,
            session,
            input_messages_key="question",
            history_messages_key="history",
        )
    return chain, histories
