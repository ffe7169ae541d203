"""Token counting: one formula for a message's tokens, used everywhere (the accountant,
readers' budgets, flush plans).

The formula follows OpenAI's accounting of chat messages: every message costs
``PER_MESSAGE`` tokens of framing, plus its role, its text, its name (and ``PER_NAME``),
its tool calls (``PER_TOOL_CALL`` each, plus their names and arguments) and the id of
the call it answers. A content part that is not text (an image, a file) counts
``PER_MEDIA_PART`` tokens: a documented estimate, since its real cost depends on its
size and detail.

Encoders are passed in (``Encoder``): the domain does no I/O. ``processors.tokenizers``
loads tiktoken's encodings from packaged data. For models tiktoken does not know
(Anthropic, Google, ...), counts are estimates: the ``cl100k_base`` count times a
per-provider factor, and ``TokenCounter.estimate`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from memory.message import Message, StoredMessage

PER_MESSAGE = 3
PER_NAME = 1
PER_TOOL_CALL = 3
PER_MEDIA_PART = 85

#: Tokens of an encoder: how many tokens a text is.
Encoder = Callable[[str], int]

#: Estimate factors against cl100k_base for providers tiktoken does not cover.
ESTIMATE_FACTORS: dict[str, float] = {
    "anthropic": 1.15,
    "google": 1.0,
    "cohere": 1.1,
    "deepseek": 1.0,
    "mistral": 1.1,
}


@dataclass(frozen=True, slots=True)
class TokenCounter:
    """Counts a message's tokens with one encoder; ``estimate`` when it is not the
    model's own tokenizer."""

    encoder: Encoder
    name: str
    estimate: bool = False
    factor: float = 1.0

    def text(self, text: str) -> int:
        tokens = self.encoder(text) if text else 0
        return math.ceil(tokens * self.factor) if self.factor != 1.0 else tokens

    def message(self, message: Message | StoredMessage) -> int:
        """The tokens of one message (see the module docstring)."""
        total = PER_MESSAGE + self.text(message.role.value)
        content = message.content
        if isinstance(content, str):
            total += self.text(content)
        elif content is not None:
            for part in content:
                total += self.text(part.text) if part.text is not None else PER_MEDIA_PART
        if message.name:
            total += PER_NAME + self.text(message.name)
        for call in message.tool_calls or ():
            total += PER_TOOL_CALL + self.text(call.function.name)
            total += self.text(call.function.arguments)
        if message.tool_call_id:
            total += self.text(message.tool_call_id)
        return total


def encoding_name(model: str) -> str:
    """The tiktoken encoding of an OpenAI model (o200k_base for the GPT-4o family and
    newer, cl100k_base for GPT-4, GPT-3.5 and embeddings)."""
    if model.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt")):
        return "o200k_base"
    return "cl100k_base"
