"""What memstream knows about LLMs: context window sizes, to turn a resource's
``max_context_ratio`` into a token limit. A model not listed here needs
``model_context_size`` in its resource file."""

from __future__ import annotations

#: Context window sizes in tokens, by model name prefix (longest prefix wins).
CONTEXT_SIZES: dict[str, int] = {
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-4-32k": 32_768,
    "gpt-3.5-turbo": 16_385,
    "gpt-5": 400_000,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude-3": 200_000,
    "claude-3-5": 200_000,
    "claude-3-7": 200_000,
    "claude-sonnet-4": 200_000,
    "claude-opus-4": 200_000,
    "gemini-1.5-pro": 2_097_152,
    "gemini-1.5-flash": 1_048_576,
    "gemini-2.0": 1_048_576,
    "gemini-2.5": 1_048_576,
    "deepseek-chat": 128_000,
    "deepseek-reasoner": 128_000,
    "command-r": 128_000,
}


def context_size(model: str) -> int | None:
    """The context window of ``model`` (longest known prefix), or None if unknown."""
    best = ""
    for prefix in CONTEXT_SIZES:
        if model.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return CONTEXT_SIZES[best] if best else None
