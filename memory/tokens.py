"""Token counting: one formula for a message's tokens, used everywhere (the accountant,
readers' budgets, flush plans).

The formula follows OpenAI's accounting of chat messages: every message costs
``PER_MESSAGE`` tokens of framing, plus its role, its text, its name (and ``PER_NAME``),
its tool calls (``PER_TOOL_CALL`` each, plus their names and arguments) and the id of
the call it answers. A content part that is not text (an image, a file) counts
``PER_MEDIA_PART`` tokens: a documented estimate, since its real cost depends on its
size and detail.

Encoders are passed in (``Encoder``, and optionally its batch form ``BatchEncoder``): the
domain does no I/O and starts no threads. ``processors.tokenizers`` loads tiktoken's
encodings from packaged data. ``TokenCounter.messages`` counts many messages with one
batch call and gives each the number ``TokenCounter.message`` gives it: both take the
formula from one function. For models tiktoken does not know
(Anthropic, Google, ...), counts are estimates: the ``cl100k_base`` count times a
per-provider factor, and ``TokenCounter.estimate`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from memory.message import Message, StoredMessage

PER_MESSAGE = 3
PER_NAME = 1
PER_TOOL_CALL = 3
PER_MEDIA_PART = 85

#: Texts up to this many characters are remembered once counted (roles, names, tool
#: names recur in every message), up to ``KNOWN_TEXTS`` of them per counter.
SHORT_TEXT = 32
KNOWN_TEXTS = 10_000

#: Tokens of an encoder: how many tokens a text is.
Encoder = Callable[[str], int]
#: Tokens of many texts at once, in order (an encoder's batch form, which may spread the
#: texts over threads); for each text the same number as the ``Encoder``.
BatchEncoder = Callable[[Sequence[str]], list[int]]

#: Estimate factors against cl100k_base for providers tiktoken does not cover.
ESTIMATE_FACTORS: dict[str, float] = {
    "anthropic": 1.15,
    "google": 1.0,
    "cohere": 1.1,
    "deepseek": 1.0,
    "mistral": 1.1,
}


def _pieces(message: Message | StoredMessage) -> tuple[int, list[str]]:
    """The formula (see the module docstring): the tokens a message costs whatever its
    texts say, and the texts to encode (each counted on its own)."""
    fixed = PER_MESSAGE
    texts = [message.role.value]
    content = message.content
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for part in content:
            if part.text is not None:
                texts.append(part.text)
            else:
                fixed += PER_MEDIA_PART
    if message.name:
        fixed += PER_NAME
        texts.append(message.name)
    for call in message.tool_calls or ():
        fixed += PER_TOOL_CALL
        texts += (call.function.name, call.function.arguments)
    if message.tool_call_id:
        texts.append(message.tool_call_id)
    return fixed, texts


@dataclass(frozen=True, slots=True)
class TokenCounter:
    """Counts a message's tokens with one encoder; ``estimate`` when it is not the
    model's own tokenizer. ``batch``, when given, is the encoder's batch form, which
    ``messages`` uses. Short texts (roles, names, tool names) are remembered once
    counted."""

    encoder: Encoder
    name: str
    estimate: bool = False
    factor: float = 1.0
    batch: BatchEncoder | None = None
    _known: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def text(self, text: str) -> int:
        if not text:
            return 0
        known = self._known.get(text) if len(text) <= SHORT_TEXT else None
        return self._counted(text, self.encoder(text)) if known is None else known

    def _counted(self, text: str, tokens: int) -> int:
        """A text's count from its encoder's tokens (remembered if the text is short)."""
        n = math.ceil(tokens * self.factor) if self.factor != 1.0 else tokens
        if len(text) <= SHORT_TEXT and len(self._known) < KNOWN_TEXTS:
            self._known[text] = n
        return n

    def message(self, message: Message | StoredMessage) -> int:
        """The tokens of one message (see the module docstring)."""
        total, texts = _pieces(message)
        for text in texts:
            total += self.text(text)
        return total

    def messages(self, messages: Sequence[Message | StoredMessage]) -> list[int]:
        """The tokens of each message, the same numbers as ``message`` gives one by
        one, with the texts of all of them encoded in one call of ``batch``."""
        if self.batch is None:
            return [self.message(m) for m in messages]
        counts: list[int] = []
        texts: list[str] = []
        owners: list[int] = []  # the message of each text in `texts`
        for i, message in enumerate(messages):
            fixed, pieces = _pieces(message)
            for text in pieces:
                known = self._known.get(text) if len(text) <= SHORT_TEXT else None
                if known is not None:
                    fixed += known
                elif text:
                    texts.append(text)
                    owners.append(i)
            counts.append(fixed)
        tokens = self.batch(texts)
        if len(tokens) != len(texts):
            raise ValueError(f"{self.name}: {len(tokens)} counts for {len(texts)} texts")
        for i, text, n in zip(owners, texts, tokens, strict=True):
            counts[i] += self._counted(text, n)
        return counts


def encoding_name(model: str) -> str:
    """The tiktoken encoding of an OpenAI model (o200k_base for the GPT-4o family and
    newer, cl100k_base for GPT-4, GPT-3.5 and embeddings)."""
    if model.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt")):
        return "o200k_base"
    return "cl100k_base"
