"""Summary writers (processors/summaries.py) against a local OpenAI-compatible server:
ChatCompletionsWriter's request, retries, give-ups and timeouts, and, end to end with the
summarizer on real Redis, the LLM's summary of a manual hybrid flush and the extractive
fallback when the LLM fails, hangs past ``summary_timeout`` or overshoots the budget."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import pytest

from memory import (
    FlushStrategy,
    MemoryRef,
    Message,
    ResourceRegistry,
    Role,
    StoredMessage,
    partition_for,
)
from memory.flush import Limits
from memory.tokens import TokenCounter
from processors.summaries import PROMPT, ChatCompletionsWriter, ExtractiveWriter, SummaryError
from tests.runtime.conftest import PARTITIONS, ROOT, TOKENIZERS, Rig, user

WORDS = " ".join(f"word{i}" for i in range(300))  # about 600 tokens a message
LLM_TEXT = "Alice ordered 1000 and 1001; both shipped Monday. She asked about a refund."
MODEL = "gpt-4o-mini"


@dataclass
class Reply:
    """What the server answers to one request."""

    status: int = 200
    content: Any = LLM_TEXT  # the completion's message content (any JSON value)
    delay: float = 0.0  # seconds before answering: longer than a timeout is a hang
    raw: bytes | None = None  # a body of its own instead of a chat completion


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeLLM:
    """A tiny HTTP/1.1 server (keep-alive) with POST /v1/chat/completions: it answers
    the scripted replies in order, then ``default``, and records every request."""

    default: Reply = field(default_factory=Reply)
    script: list[Reply] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = field(default_factory=dict)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fail(self, times: int, status: int = 500) -> None:
        error = json.dumps({"error": {"message": "try again", "code": status}}).encode()
        self.script.extend(Reply(status=status, raw=error) for _ in range(times))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the connections and let every handler end (a hanging one at once)."""
        assert self._server is not None
        self._closing.set()
        self._server.close()
        for writer in self._handlers.values():
            writer.close()
        if self._handlers:
            _, stuck = await asyncio.wait(list(self._handlers), timeout=10)
            assert not stuck, "a handler of the test server did not end"
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            while (request := await _read_request(reader)) is not None:
                self.requests.append(request)
                reply = self.script.pop(0) if self.script else self.default
                if reply.delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), reply.delay)
                if self._closing.is_set():
                    return
                if (request.method, request.path) != ("POST", "/v1/chat/completions"):
                    status, body = 404, b'{"error": "not found"}'
                elif reply.raw is not None:
                    status, body = reply.status, reply.raw
                else:
                    status, body = reply.status, _completion(reply.content)
                head = (
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.pop(task, None)


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body)


def _completion(content: Any) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx honours proxy variables: the local server is reached directly."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    await server.start()
    yield server
    await server.stop()


@functools.cache
def counter() -> TokenCounter:
    """The token counter of customer-support."""
    registry = ResourceRegistry.load([ROOT / "memories"])
    return TOKENIZERS.for_resource(registry["customer-support"])


def stored(
    seq: int, text: str, role: Role = Role.USER, covers: list[int] | None = None
) -> StoredMessage:
    return StoredMessage(
        seq=seq, gen=1, at=0, entry=f"{seq}-0", role=role, content=text, covers=covers
    )


MESSAGES = [
    stored(4, "Summary of 3 earlier messages:\n- user: I am Alice.", Role.SYSTEM, [1, 2, 3]),
    stored(5, "Order 1000 was shipped on Monday."),
    stored(6, "I will refund order 1001 today.", Role.ASSISTANT),
]


def writer(llm: FakeLLM, **kwargs: Any) -> ChatCompletionsWriter:
    options: dict[str, Any] = {"timeout": 10.0, "retries": 2, "backoff": 0.01} | kwargs
    return ChatCompletionsWriter(llm.base_url, MODEL, **options)


# -- ChatCompletionsWriter ---------------------------------------------------------------


async def test_the_writer_returns_the_completion_under_the_summary_header(llm: FakeLLM) -> None:
    llm.default = Reply(content=f"  {LLM_TEXT}\n")
    tokens = counter()
    message = await writer(llm, api_key="sk-test").write(MESSAGES, 500, tokens)
    assert message.role is Role.SYSTEM
    # The earlier summary counts for the three messages it covers.
    assert message.content == f"Summary of 5 earlier messages:\n{LLM_TEXT}"
    assert len(llm.requests) == 1
    request = llm.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["content-type"] == "application/json"
    body = request.json()
    assert body["model"] == MODEL
    assert body["temperature"] == 0
    header = Message(role=Role.SYSTEM, content="Summary of 5 earlier messages:\n")
    room = 500 - tokens.message(header)
    assert body["max_tokens"] == room and 0 < room < 500
    prompt, transcript = body["messages"]
    assert prompt == {"role": "system", "content": PROMPT.format(words=room * 3 // 4)}
    assert transcript["role"] == "user"
    assert transcript["content"].splitlines() == [
        "earlier summary: Summary of 3 earlier messages:",
        "- user: I am Alice.",
        "user: Order 1000 was shipped on Monday.",
        "assistant: I will refund order 1001 today.",
    ]


async def test_the_writer_sends_no_authorization_without_an_api_key(llm: FakeLLM) -> None:
    message = await writer(llm).write(MESSAGES, 500, counter())
    assert str(message.content).endswith(LLM_TEXT)
    assert "authorization" not in llm.requests[0].headers


async def test_a_trailing_slash_in_the_base_url_is_ignored(llm: FakeLLM) -> None:
    w = ChatCompletionsWriter(llm.base_url + "/", MODEL, timeout=10.0)
    await w.write(MESSAGES, 500, counter())
    assert llm.requests[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_the_writer_retries_transient_errors_then_succeeds(llm: FakeLLM, status: int) -> None:
    llm.fail(2, status)
    message = await writer(llm, retries=2).write(MESSAGES, 500, counter())
    assert message.content == f"Summary of 5 earlier messages:\n{LLM_TEXT}"
    assert len(llm.requests) == 3
    # Every attempt sends the same request.
    assert len({r.body for r in llm.requests}) == 1


@pytest.mark.parametrize("status", [500, 429])
async def test_the_writer_gives_up_after_its_retries(llm: FakeLLM, status: int) -> None:
    llm.default = Reply(status=status, raw=b'{"error": "down"}')
    with pytest.raises(SummaryError, match=r"after 3 attempt\(s\)") as caught:
        await writer(llm, retries=2).write(MESSAGES, 500, counter())
    assert str(status) in str(caught.value)
    assert len(llm.requests) == 3


async def test_the_writer_does_not_retry_a_client_error(llm: FakeLLM) -> None:
    llm.default = Reply(status=400, raw=b'{"error": "bad model name"}')
    with pytest.raises(SummaryError, match="400") as caught:
        await writer(llm, retries=3).write(MESSAGES, 500, counter())
    assert "bad model name" in str(caught.value)
    assert len(llm.requests) == 1


async def test_a_hanging_server_times_out_with_a_summary_error(llm: FakeLLM) -> None:
    llm.default = Reply(delay=60)
    started = time.monotonic()
    with pytest.raises(SummaryError, match=r"after 2 attempt\(s\)"):
        await writer(llm, timeout=0.3, retries=1).write(MESSAGES, 500, counter())
    assert time.monotonic() - started < 30, "bounded by the timeouts, not by the server"
    assert len(llm.requests) == 2, "a timeout is retried like a network error"


async def test_a_timeout_then_a_success_is_a_success(llm: FakeLLM) -> None:
    llm.script.append(Reply(delay=60))
    message = await writer(llm, timeout=0.3, retries=1).write(MESSAGES, 500, counter())
    assert str(message.content).endswith(LLM_TEXT)
    assert len(llm.requests) == 2


async def test_an_unreachable_server_is_a_summary_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = ChatCompletionsWriter(
        f"http://127.0.0.1:{port}/v1", MODEL, timeout=5.0, retries=1, backoff=0.01
    )
    with pytest.raises(SummaryError, match=r"after 2 attempt\(s\)"):
        await w.write(MESSAGES, 500, counter())


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        pytest.param(Reply(raw=b"<html>not json</html>"), "no chat completion", id="not-json"),
        pytest.param(Reply(raw=b'{"choices": []}'), "no chat completion", id="no-choices"),
        pytest.param(Reply(raw=b'{"error": "?"}'), "no chat completion", id="no-choices-key"),
        pytest.param(Reply(content="  \n "), "empty", id="blank-content"),
    ],
)
async def test_an_answer_without_a_summary_is_a_summary_error(
    llm: FakeLLM, reply: Reply, match: str
) -> None:
    llm.default = reply
    with pytest.raises(SummaryError, match=match):
        await writer(llm).write(MESSAGES, 500, counter())
    assert len(llm.requests) == 1, "not retried"


async def test_a_budget_without_room_fails_before_any_request(llm: FakeLLM) -> None:
    with pytest.raises(SummaryError, match="no room"):
        await writer(llm).write(MESSAGES, 5, counter())
    assert llm.requests == []


async def test_a_null_content_is_a_summary_error(llm: FakeLLM) -> None:
    llm.default = Reply(content=None)
    with pytest.raises(SummaryError):
        message = await writer(llm).write(MESSAGES, 500, counter())
        pytest.fail(f"a summary was written: {message.content!r}")


async def test_the_extractive_writer_needs_no_server() -> None:
    message = await ExtractiveWriter().write(MESSAGES, 500, counter())
    content = str(message.content)
    assert message.role is Role.SYSTEM
    assert content.startswith("Summary of 5 earlier messages:\n")
    assert "- user: Order 1000 was shipped on Monday." in content


# -- end to end: the summarizer with an LLM writer ---------------------------------------


async def meta(rig: Rig, ref: MemoryRef) -> dict[str, str]:
    p = partition_for(ref.memory_id, PARTITIONS)
    found = await rig.client.hgetall(rig.keys.memory(p, ref.memory_id).meta)
    return {str(k): str(v) for k, v in found.items()}


async def counted(rig: Rig, ref: MemoryRef, count: int) -> bool:
    view = await rig.reader.read(ref)
    return view.count == count and view.counted == count and not view.flush_pending


async def flushed(rig: Rig, ref: MemoryRef) -> bool:
    return "flushes" in await meta(rig, ref)


async def flush_with(rig: Rig, ref: MemoryRef, llm: FakeLLM, **summarizer: float) -> StoredMessage:
    """Five ~600-token messages (3000 tokens: under the 3200 threshold of
    customer-support, over its 2400 target), then a manual hybrid flush by a summarizer
    whose writer is the local LLM; the summary it wrote."""
    rig.start("appender")
    rig.start("accountant", rig.accountant())
    for i in range(5):
        text = f"Order {1000 + i} for Alice was shipped on Monday. {WORDS}"
        await rig.publisher.append(ref, user(text), wait=True)
    await rig.eventually(lambda: counted(rig, ref, 5), timeout=30, what="the accountant")
    w = ChatCompletionsWriter(
        llm.base_url, MODEL, api_key="sk-test", timeout=30.0, retries=1, backoff=0.05
    )
    rig.start("summarizer", rig.summarizer(writer=w, **summarizer))
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.HYBRID_SUMMARY, wait=True)
    await rig.eventually(lambda: flushed(rig, ref), timeout=30, what="the flush")
    m = await meta(rig, ref)
    assert m["flushes"] == "1"
    assert m["last_flush_strategy"] == "hybrid_summary"
    view = await rig.reader.read(ref)
    summaries = [x for x in view.messages if x.is_summary]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary.role is Role.SYSTEM
    assert summary.covers, "the summary says what it stands for"
    kept = [x.seq for x in view.messages if not x.is_summary]
    assert sorted(summary.covers + kept) == [x for x in range(1, 6)]
    assert max(summary.covers) < min(kept), "the oldest are folded"
    resource = rig.registry["customer-support"]
    target = Limits.target_of(resource).tokens
    assert target is not None and view.tokens <= target
    counter = TOKENIZERS.for_resource(resource)
    assert counter.message(summary) <= resource.flushing.summary_tokens
    return summary


async def test_a_hybrid_flush_writes_the_llm_summary(rig: Rig, llm: FakeLLM) -> None:
    ref = MemoryRef.parse("acme/customer-support/llm-1")
    summary = await flush_with(rig, ref, llm)
    assert (
        summary.content == f"Summary of {len(summary.covers or [])} earlier messages:\n{LLM_TEXT}"
    )
    assert len(llm.requests) == 1
    body = llm.requests[0].json()
    assert body["model"] == MODEL and 0 < body["max_tokens"] <= 500
    assert llm.requests[0].headers["authorization"] == "Bearer sk-test"
    transcript = body["messages"][1]["content"]
    assert "user: Order 1000 for Alice" in transcript
    assert "Order 1004" not in transcript, "only what the plan folds is sent"


async def test_a_failing_llm_falls_back_to_an_extractive_summary(
    rig: Rig, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    llm.default = Reply(status=500, raw=b'{"error": "down"}')
    ref = MemoryRef.parse("acme/customer-support/llm-500")
    with caplog.at_level(logging.WARNING, logger="processors.summarizer"):
        summary = await flush_with(rig, ref, llm, summary_timeout=30.0)
    assert_extractive(summary)
    assert len(llm.requests) == 2, "the writer tried (and retried) before the fallback"
    assert "answered 500" in fallback_reason(caplog)


async def test_a_hanging_llm_falls_back_after_the_summary_timeout(
    rig: Rig, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    llm.default = Reply(delay=120)  # far beyond the writer's own 30 s timeout
    ref = MemoryRef.parse("acme/customer-support/llm-hang")
    with caplog.at_level(logging.WARNING, logger="processors.summarizer"):
        summary = await flush_with(rig, ref, llm, summary_timeout=0.5)
    assert_extractive(summary)
    assert len(llm.requests) == 1
    assert "TimeoutError" in fallback_reason(caplog)


async def test_an_llm_summary_over_its_budget_falls_back(
    rig: Rig, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    llm.default = Reply(content=f"Alice. {WORDS}")  # ~600 tokens for a 500-token budget
    ref = MemoryRef.parse("acme/customer-support/llm-long")
    with caplog.at_level(logging.WARNING, logger="processors.summarizer"):
        summary = await flush_with(rig, ref, llm, summary_timeout=30.0)
    assert_extractive(summary)
    assert len(llm.requests) == 1
    assert "over its budget" in fallback_reason(caplog)


def fallback_reason(caplog: pytest.LogCaptureFixture) -> str:
    """What the summarizer logged when it fell back to the extractive writer."""
    messages = [r.getMessage() for r in caplog.records if r.name == "processors.summarizer"]
    reasons = [m for m in messages if "summary" in m and ("failed" in m or "budget" in m)]
    assert len(reasons) == 1, messages
    return reasons[0]


def assert_extractive(summary: StoredMessage) -> None:
    content = str(summary.content)
    assert content.startswith(f"Summary of {len(summary.covers or [])} earlier messages:\n")
    lines = content.splitlines()[1:]
    assert lines and all(line.startswith("- user: ") for line in lines), content
    assert LLM_TEXT not in content
    assert "Order 1000" in content
