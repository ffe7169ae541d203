"""A LangChain chat message history backed by one memory (``pip install
'memstream[langchain]'``).

``MemstreamChatMessageHistory`` implements langchain-core's ``BaseChatMessageHistory``:
``add_messages`` publishes the whole batch in one round trip and returns once every
message is applied (a following read sees them), ``messages`` reads the whole memory
page by page within one generation, ``clear`` clears it through its partition. A
refused write raises ``WriteRefusedError``; nothing is dropped silently.

Messages map both ways (``to_memstream`` / ``from_memstream``):

- ``HumanMessage`` <-> user, ``AIMessage`` <-> assistant (tool calls with their ids,
  arguments as JSON text), ``SystemMessage`` <-> system (developer with
  ``additional_kwargs["__openai_role__"] == "developer"``), ``ToolMessage`` <-> tool
  (``tool_call_id``, ``status``), ``ChatMessage`` <-> its role; a role memstream has no
  name for is stored as a user message that remembers its role. ``name`` is kept.
- Content is text or a list of parts: a part is kept as it is (it needs a ``type``), a
  plain string part becomes ``{"type": "text", "text": ...}``.
- A message's memstream ``metadata`` and ``priority`` travel in
  ``response_metadata["memstream"]``; read messages also carry ``seq``, ``gen``, ``at``,
  ``agent``, ``workflow`` there, and ``summary`` (True for a summary memstream wrote,
  which comes back as a ``SystemMessage``, with the ``covers`` it stands for).
- The LangChain message ``id`` is kept, under the metadata key ``langchain`` (reserved).
  Other ``additional_kwargs``, ``response_metadata``, ``usage_metadata`` and tool
  ``artifact`` are not stored.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call
from pydantic import ValidationError
from redis.asyncio import Redis

from events.envelope import AppendPayload, MemoryName, MessageAppended
from events.errors import EventError, ReadOnlyError
from events.limits import RequestLimits
from events.publisher import Publisher
from memory import MemoryRef, Message, ResolvedMemory, ResourceRegistry, StoredMessage
from memory.message import ContentPart, FunctionCall, Role, ToolCall
from store import GenerationChangedError, Keys, Outcome, RedisClient, connect
from store.reader import MAX_PAGE

T = TypeVar("T")
KEY = "memstream"  # the response_metadata entry
LC = "langchain"  # the reserved metadata key
DEVELOPER = {"__openai_role__": "developer"}
READ_RETRIES = 5
_ROLES = {r.value for r in Role}


class HistoryError(EventError):
    """Root of the chat message history's errors."""


class ConversionError(HistoryError, ValueError):
    """A message memstream cannot store (or a stored one LangChain cannot hold)."""


class WriteRefusedError(HistoryError):
    """Events of a write were refused (their outcome is not ok); the others applied."""

    def __init__(self, message: str, *, outcomes: list[Outcome | None], refused: list[int]):
        super().__init__(message)
        self.outcomes = outcomes
        self.refused = refused


# LangChain -> memstream


def to_memstream(message: BaseMessage) -> Message:
    """The memstream message for a LangChain message (ConversionError if it cannot be
    stored)."""
    extra: dict[str, Any] = {}
    fields: dict[str, Any] = {"content": _parts_in(message.content), "name": message.name}
    if isinstance(message, HumanMessage):
        role = Role.USER
    elif isinstance(message, AIMessage):
        role = Role.ASSISTANT
        fields["tool_calls"] = _calls_in(message) or None
    elif isinstance(message, SystemMessage):
        developer = message.additional_kwargs.get("__openai_role__") == "developer"
        role = Role.DEVELOPER if developer else Role.SYSTEM
    elif isinstance(message, ToolMessage):
        role = Role.TOOL
        fields["tool_call_id"] = message.tool_call_id
        if message.status != "success":
            extra["status"] = message.status
    elif isinstance(message, ChatMessage):
        role = Role(message.role) if message.role in _ROLES else Role.USER
        extra.update({"type": "chat"} if message.role in _ROLES else {"role": message.role})
    else:
        raise ConversionError(
            f"a {type(message).__name__} cannot be stored in a memory: use HumanMessage, "
            f"AIMessage, SystemMessage, ToolMessage or ChatMessage"
        )
    if message.id:
        extra["id"] = message.id
    own = message.response_metadata.get(KEY) or {}
    metadata = (own.get("metadata") or {}) if isinstance(own, dict) else None
    if not isinstance(metadata, dict) or not isinstance(own.get("priority"), int | None):
        raise ConversionError(
            f'response_metadata["{KEY}"] needs "metadata" as an object and "priority" as '
            f"an integer, got {own!r}"
        )
    metadata = {k: v for k, v in metadata.items() if k != LC} | ({LC: extra} if extra else {})
    try:
        return Message(role=role, metadata=metadata, priority=own.get("priority"), **fields)
    except ValidationError as e:
        raise ConversionError(f"a {type(message).__name__} memstream cannot store: {e}") from e


def _parts_in(content: str | list[str | dict[Any, Any]]) -> str | list[ContentPart]:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(ContentPart(type="text", text=part))
        elif isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"]:
            try:
                parts.append(ContentPart.model_validate(part))
            except ValidationError as e:
                raise ConversionError(f"content part {part!r} cannot be stored: {e}") from e
        else:
            raise ConversionError(
                f"content part {part!r} cannot be stored: a part is a string or an object "
                f'with a "type"'
            )
    return parts


def _calls_in(message: AIMessage) -> list[ToolCall]:
    calls = []
    for call in message.tool_calls:
        if not call.get("id"):
            raise ConversionError(
                f"tool call {call['name']!r} has no id: memstream stores tool calls with "
                f"the id their ToolMessage answers"
            )
        arguments = json.dumps(call["args"], ensure_ascii=False)
        calls.append(_call(str(call["id"]), call["name"], arguments))
    for bad in message.invalid_tool_calls:  # kept with their raw arguments
        if not bad.get("id") or not bad.get("name"):
            raise ConversionError(f"invalid tool call {bad!r} needs an id and a name to be stored")
        calls.append(_call(str(bad["id"]), str(bad["name"]), bad.get("args") or ""))
    return calls


def _call(call_id: str, name: str, arguments: str) -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))


# memstream -> LangChain


def from_memstream(stored: StoredMessage | Message) -> BaseMessage:
    """The LangChain message for a stored (or not yet stored) memstream message."""
    metadata = dict(stored.metadata)
    extra = metadata.pop(LC, None)
    extra = extra if isinstance(extra, dict) else {}
    own: dict[str, Any] = {"metadata": metadata}
    if stored.priority is not None:
        own["priority"] = stored.priority
    summary = isinstance(stored, StoredMessage) and stored.is_summary
    if isinstance(stored, StoredMessage):
        own |= {"seq": stored.seq, "gen": stored.gen, "at": stored.at, "summary": summary}
        own |= {k: v for k in ("agent", "workflow", "covers") if (v := getattr(stored, k))}
    common: dict[str, Any] = {
        "content": _parts_out(stored.content),
        "name": stored.name,
        "id": extra.get("id"),
        "response_metadata": {KEY: own},
    }
    role = stored.role
    if summary:
        return SystemMessage(**common)
    if "role" in extra or extra.get("type") == "chat":
        return ChatMessage(role=str(extra.get("role") or role.value), **common)
    if role is Role.USER:
        return HumanMessage(**common)
    if role is Role.ASSISTANT:
        calls, invalid = _calls_out(stored.tool_calls or [])
        return AIMessage(tool_calls=calls, invalid_tool_calls=invalid, **common)
    if role is Role.TOOL:
        status = "error" if extra.get("status") == "error" else "success"
        return ToolMessage(tool_call_id=str(stored.tool_call_id), status=status, **common)
    if role is Role.DEVELOPER:
        return SystemMessage(additional_kwargs=dict(DEVELOPER), **common)
    return SystemMessage(**common)


def _parts_out(content: str | list[ContentPart] | None) -> str | list[str | dict[Any, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out: list[str | dict[Any, Any]] = []
    for part in content:
        data = part.model_dump(mode="json")
        if data.get("text") is None:
            data.pop("text", None)
        out.append(data)
    return out


def _calls_out(calls: list[ToolCall]) -> tuple[list[Any], list[Any]]:
    valid, invalid = [], []
    for call in calls:
        name, raw = call.function.name, call.function.arguments
        try:
            args = json.loads(raw)
        except ValueError:
            args = None
        if isinstance(args, dict):
            valid.append(tool_call(name=name, args=args, id=call.id))
        else:
            error = "the arguments are not a JSON object"
            invalid.append(invalid_tool_call(name=name, args=raw, id=call.id, error=error))
    return valid, invalid


# The history


@dataclass(slots=True)
class _Side:
    """A client and what is built on it, used from one event loop only."""

    loop: asyncio.AbstractEventLoop
    client: RedisClient
    publisher: Publisher
    owned: bool


class _LoopThread:
    """A private event loop in a daemon thread, for the sync methods."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.name = "memstream-langchain"
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise HistoryError("a sync method was called from the history's own loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class MemstreamChatMessageHistory(BaseChatMessageHistory):
    """The chat history of one memory. Build it from ``url=`` (it makes and closes its
    own clients: one for the event loop of the async methods, one on a private loop for
    the sync methods, which therefore also work inside a running loop) or from your
    ``client=`` (used from one event loop: yours, through the async methods, or the
    private one, through the sync methods; pass ``url=`` to use both). Close it with
    ``close()`` / ``aclose()`` or use it as a (async) context manager."""

    def __init__(
        self,
        memory: MemoryRef | ResolvedMemory,
        *,
        url: str | None = None,
        client: RedisClient | None = None,
        keys: Keys | None = None,
        registry: ResourceRegistry | None = None,
        limits: RequestLimits | None = None,
        default_partitions: int = 16,
        workflow_id: str | None = None,
        agent_id: str | None = None,
        timeout: float = 10.0,
        touch: bool = False,
    ) -> None:
        """``memory``: a reference, or a memory an agent resolved (its mode is
        respected: a read-only one raises ReadOnlyError on writes). ``workflow_id`` and
        ``agent_id`` go with every event. ``timeout``: seconds to wait for each write's
        outcome. ``touch``: record reads as uses of the messages (lru / lfu flushing)."""
        super().__init__()
        if (url is None) == (client is None):
            raise HistoryError("pass either url= or client=")
        resolved = memory if isinstance(memory, ResolvedMemory) else None
        self.ref = memory.ref if isinstance(memory, ResolvedMemory) else memory
        self.writable = resolved is None or resolved.writable
        self.workflow_id = workflow_id
        self.agent_id = agent_id
        self.timeout = timeout
        self.touch = touch
        self._url = url
        self._client = client
        self._keys = keys or Keys()
        self._registry = registry
        self._limits = limits
        self._default_partitions = default_partitions
        self._async: _Side | None = None
        self._sync: _Side | None = None
        self._runner: _LoopThread | None = None

    # BaseChatMessageHistory

    @property
    def messages(self) -> list[BaseMessage]:
        """Every message of the memory, oldest first (read by the sync side)."""
        return self._run_sync(self._read_all)

    @messages.setter
    def messages(self, messages: list[BaseMessage]) -> None:
        """Replace the whole memory with ``messages``, atomically (a new generation)."""
        self.replace(messages)

    async def aget_messages(self) -> list[BaseMessage]:
        return await self._read_all(self._side())

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append the messages in one round trip, in order; returns once all are
        applied. WriteRefusedError names the refused ones."""
        self._run_sync(lambda side: self._append(side, messages))

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        await self._append(self._side(), messages)

    def clear(self) -> None:
        """Remove every message (a new generation); returns once applied."""
        self._run_sync(self._clear)

    async def aclear(self) -> None:
        await self._clear(self._side())

    def replace(self, messages: Sequence[BaseMessage]) -> None:
        """Replace the whole memory with ``messages``, atomically; returns once applied."""
        self._run_sync(lambda side: self._replace(side, messages))

    async def areplace(self, messages: Sequence[BaseMessage]) -> None:
        await self._replace(self._side(), messages)

    # Operations, on one side

    async def _read_all(self, side: _Side) -> list[BaseMessage]:
        for _ in range(READ_RETRIES):
            try:
                return await self._read_once(side)
            except GenerationChangedError:  # cleared or replaced meanwhile: read it again
                continue
        return await self._read_once(side)

    async def _read_once(self, side: _Side) -> list[BaseMessage]:
        reader = side.publisher.reader
        first = await reader.read(self.ref, last=1)
        stored: list[StoredMessage] = []
        after = 0
        while first.exists:
            page = await reader.read(
                self.ref, after=after, limit=MAX_PAGE, touch=self.touch, generation=first.generation
            )
            stored.extend(page.messages)
            if len(page.messages) < MAX_PAGE or page.next_after is None:
                break
            after = page.next_after
        return [from_memstream(m) for m in stored]

    async def _append(self, side: _Side, messages: Sequence[BaseMessage]) -> None:
        converted = [to_memstream(m) for m in messages]
        if not converted:
            return
        self._check_writable()
        name = MemoryName(resource=self.ref.resource, key=self.ref.key)
        events = [
            MessageAppended(
                tenant=self.ref.tenant,
                payload=AppendPayload(
                    memory=name, workflow_id=self.workflow_id, agent_id=self.agent_id, message=m
                ),
            )
            for m in converted
        ]
        published = await side.publisher.publish_many(events, wait=True, timeout=self.timeout)
        _check([p.outcome for p in published], "append")

    async def _clear(self, side: _Side) -> None:
        self._check_writable()
        published = await side.publisher.clear(
            self.ref,
            agent_id=self.agent_id,
            workflow_id=self.workflow_id,
            wait=True,
            timeout=self.timeout,
        )
        _check([published.outcome], "clear")

    async def _replace(self, side: _Side, messages: Sequence[BaseMessage]) -> None:
        converted = [to_memstream(m) for m in messages]
        self._check_writable()
        published = await side.publisher.replace(
            self.ref,
            converted,
            agent_id=self.agent_id,
            workflow_id=self.workflow_id,
            wait=True,
            timeout=self.timeout,
        )
        _check([published.outcome], "replace")

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(f"{self.ref} is read-only for this agent; nothing was published")

    # Clients and loops

    def _side(self) -> _Side:
        """The async side, on the caller's loop."""
        loop = asyncio.get_running_loop()
        if self._async is None:
            self._async = self._new_side(loop)
        elif self._async.loop is not loop:
            raise HistoryError(
                "this history's async methods were used from another event loop: use one "
                "history per event loop, or aclose() it before using it from another"
            )
        return self._async

    def _new_side(self, loop: asyncio.AbstractEventLoop) -> _Side:
        if self._client is not None:
            if self._async is not None or self._sync is not None:
                raise HistoryError(
                    "a history built on client= uses it from one event loop: either the "
                    "async methods (your loop) or the sync ones (a private loop); build it "
                    "with url= to use both"
                )
            client, owned = self._client, False
        else:
            client, owned = connect(str(self._url)), True
        publisher = Publisher(
            client,
            keys=self._keys,
            default_partitions=self._default_partitions,
            registry=self._registry,
            limits=self._limits,
        )
        return _Side(loop, client, publisher, owned)

    def _run_sync(self, operation: Callable[[_Side], Coroutine[Any, Any, T]]) -> T:
        if self._runner is None:
            self._runner = _LoopThread()
        if self._sync is None:
            self._sync = self._new_side(self._runner.loop)
        return self._runner.run(operation(self._sync))

    async def aclose(self) -> None:
        """Close the clients this history made (from the caller's loop)."""
        side, self._async = self._async, None
        if side is not None and side.owned:
            await side.client.aclose()
        runner, self._runner = self._runner, None
        sync, self._sync = self._sync, None
        if runner is not None:
            if sync is not None:
                future = asyncio.run_coroutine_threadsafe(_let_go(sync), runner.loop)
                await asyncio.wrap_future(future)
            await asyncio.to_thread(runner.stop)

    def close(self) -> None:
        """Close the clients this history made. From inside an event loop the async
        side is closed by ``aclose()`` only (it belongs to that loop)."""
        side = self._async
        if side is not None and side.owned and not side.loop.is_closed():
            if side.loop.is_running():
                if _running_loop() is side.loop:
                    raise HistoryError("the async side belongs to this loop: await aclose()")
                asyncio.run_coroutine_threadsafe(side.client.aclose(), side.loop).result()
            else:
                side.loop.run_until_complete(side.client.aclose())
        self._async = None
        runner, self._runner = self._runner, None
        sync, self._sync = self._sync, None
        if runner is not None:
            if sync is not None:
                runner.run(_let_go(sync))
            runner.stop()

    def __enter__(self) -> MemstreamChatMessageHistory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> MemstreamChatMessageHistory:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _let_go(side: _Side) -> None:
    """Close the private loop's client; a client passed in only drops the connections
    it opened on that loop (it stays usable)."""
    if side.owned or not isinstance(side.client, Redis):
        await side.client.aclose()  # a cluster client reconnects on its next command
    else:
        await side.client.connection_pool.disconnect()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check(outcomes: list[Outcome | None], what: str) -> None:
    """WriteRefusedError unless every outcome is ok."""
    refused = [i for i, o in enumerate(outcomes) if o is None or not o.ok]
    if not refused:
        return
    first = outcomes[refused[0]]
    why = f"{first.reason}: {first.detail}" if first is not None else "no outcome"
    raise WriteRefusedError(
        f"{len(refused)} of {len(outcomes)} event(s) of the {what} were refused ({why}); "
        f"the others were applied",
        outcomes=outcomes,
        refused=refused,
    )
