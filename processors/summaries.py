"""Summary writers, pluggable: the extractive one (the default, deterministic, no
network) and one over an OpenAI-compatible chat completions API.

A writer returns a summary message within a token budget counted with the memory's
counter. The summarizer checks the budget itself and falls back to the extractive
writer when another writer fails, times out or overshoots.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from memory import Message, Role, StoredMessage
from memory.flush import text_of
from memory.summary import HEADER, extractive_summary
from memory.tokens import TokenCounter

log = logging.getLogger(__name__)


class SummaryError(Exception):
    """A writer could not write a summary (the summarizer falls back)."""


class SummaryWriter(Protocol):
    name: str

    async def write(
        self, messages: Sequence[StoredMessage], budget: int, counter: TokenCounter
    ) -> Message: ...


class ExtractiveWriter:
    """The most informative sentences, in order (``memory.summary``)."""

    name = "extractive"

    async def write(
        self, messages: Sequence[StoredMessage], budget: int, counter: TokenCounter
    ) -> Message:
        return extractive_summary(messages, budget, counter)


PROMPT = (
    "Summarize the conversation below for an assistant that will continue it. Keep "
    "names, numbers, dates, identifiers, decisions, preferences and open questions; "
    "drop greetings and small talk. Write plain sentences, at most {words} words."
)


class ChatCompletionsWriter:
    """A summary by an LLM behind an OpenAI-compatible ``/chat/completions`` endpoint,
    with a timeout per call and retries with backoff on errors worth retrying (network
    errors, 429 and 5xx)."""

    name = "llm"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._transport = transport

    @classmethod
    def from_env(cls, base_url: str, model: str, api_key_env: str | None) -> ChatCompletionsWriter:
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            raise SummaryError(f"the environment variable {api_key_env} is not set")
        return cls(base_url, model, api_key=key)

    async def write(
        self, messages: Sequence[StoredMessage], budget: int, counter: TokenCounter
    ) -> Message:
        header = HEADER.format(n=sum(len(m.covers or [m.seq]) for m in messages))
        room = budget - counter.message(Message(role=Role.SYSTEM, content=header + "\n"))
        if room <= 0:
            raise SummaryError("the budget leaves no room for a summary")
        transcript = "\n".join(
            f"{'earlier summary' if m.is_summary else m.role.value}: {text_of(m)}" for m in messages
        )
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [
                {"role": "system", "content": PROMPT.format(words=max(1, room * 3 // 4))},
                {"role": "user", "content": transcript},
            ],
            "max_tokens": room,
            "temperature": 0,
        }
        text = (await self._complete(body)).strip()
        if not text:
            raise SummaryError("the model returned an empty summary")
        return Message(role=Role.SYSTEM, content=f"{header}\n{text}")

    async def _complete(self, body: dict[str, Any]) -> str:
        last: Exception | None = None
        async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport) as http:
            for attempt in range(self._retries + 1):
                if attempt:
                    await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
                try:
                    response = await http.post(self._url, json=body, headers=self._headers)
                except httpx.HTTPError as e:
                    last = e
                    continue
                if response.status_code == 429 or response.status_code >= 500:
                    last = SummaryError(f"{self._url} answered {response.status_code}")
                    continue
                if response.status_code != 200:
                    raise SummaryError(
                        f"{self._url} answered {response.status_code}: {response.text[:200]}"
                    )
                try:
                    content = response.json()["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    raise SummaryError(f"{self._url} answered no chat completion: {e!r}") from e
                if not isinstance(content, str):
                    raise SummaryError(f"{self._url} answered no text: content is {content!r}")
                return content
        raise SummaryError(f"no summary after {self._retries + 1} attempt(s): {last!r}")
