"""One formula for a message's tokens (``memory.tokens``): the batch form that the
accountant counts with (``TokenCounter.messages``, its texts spread over threads) gives
every message the number that ``TokenCounter.message`` gives it one by one, which is
what readers and flush plans use for messages without a stored count."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import MemoryResource, Message, Role, StoredMessage, ToolCall
from memory.message import ContentPart, FunctionCall
from memory.tokens import PER_MEDIA_PART, PER_MESSAGE, TokenCounter
from processors.tokenizers import MIN_SPLIT_CHARS, Tokenizers, split

PROPERTY = settings(max_examples=60, deadline=None, database=None, derandomize=True)
# The counter's name (its encoding) for each kind of resource.
MODELS: dict[str, dict[str, object]] = {
    "o200k_base": {"model": "gpt-4o-mini"},
    "cl100k_base": {"model": "gpt-4"},
    "cl100k_base x 1.15 (anthropic estimate)": {
        "token_provider": {"provider": "anthropic", "model": "claude"}
    },
}


def resource(fields: dict[str, object]) -> MemoryResource:
    return MemoryResource.model_validate(
        {"resource": "memory", "id": "t", "max_tokens": 1000} | fields
    )


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}-threads")
def tokenizers(request: pytest.FixtureRequest) -> Iterator[Tokenizers]:
    t = Tokenizers(threads=request.param)
    yield t
    t.close()


# Texts tiktoken splits in different ways: words, numbers, whitespace runs, non-ASCII,
# emoji, JSON, and the text of special tokens (counted as ordinary text).
TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", " ", "ok", "<|endoftext|>", "a\n\n  b", "Zoë 🙂", '{"a": [1, 2]}']),
    st.lists(st.sampled_from(["order", " A-1234567", " €12.50", "  ", "\n", "日本語", "🙏"])).map(
        "".join
    ),
    # long enough that a batch of a few is spread over the threads
    st.integers(min_value=1, max_value=3).map(lambda n: "refund issued, " * (300 * n)),
)
NAME = st.none() | st.sampled_from(["bot", "agent_dana", "x" * 40])


@st.composite
def messages(draw: st.DrawFn) -> StoredMessage:
    role = draw(st.sampled_from([Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.TOOL]))
    content: str | list[ContentPart] | None = draw(
        st.one_of(
            TEXT,
            st.lists(
                st.one_of(
                    TEXT.map(lambda t: ContentPart(type="text", text=t)),
                    st.just(ContentPart(type="image_url")),
                ),
                max_size=3,
            ),
        )
    )
    calls = draw(
        st.lists(
            st.builds(
                lambda name, args: ToolCall(
                    id="call_1", function=FunctionCall(name=name, arguments=args)
                ),
                st.sampled_from(["lookup_order", "get_tracking"]),
                TEXT,
            ),
            max_size=2,
        )
    )
    message = Message(
        role=role,
        content=content if content is not None or calls else "",
        name=draw(NAME),
        tool_calls=calls or None,
        tool_call_id="call_1" if role is Role.TOOL else draw(st.none() | st.just("call_9")),
    )
    return StoredMessage.model_validate(
        {"seq": 1, "gen": 1, "at": 0, "entry": "1-0"} | message.to_json_dict()
    )


@pytest.mark.parametrize("model", MODELS)
@PROPERTY
@given(batch=st.lists(messages(), max_size=12))
def test_a_batch_counts_every_message_as_message_counts_it_alone(
    tokenizers: Tokenizers, model: str, batch: list[StoredMessage]
) -> None:
    counter = tokenizers.for_resource(resource(MODELS[model]))
    assert counter.name == model
    # One by one with a counter of its own (nothing remembered from the batch).
    alone = Tokenizers().for_resource(resource(MODELS[model]))
    assert counter.messages(batch) == [alone.message(m) for m in batch]


def test_the_batch_of_a_long_conversation_is_spread_over_the_threads_and_counts_the_same(
    tokenizers: Tokenizers,
) -> None:
    texts = [
        f"Order A-{i:07d} left Rotterdam on May {i % 28 + 1} 🙂 " * (i % 40 + 1) for i in range(300)
    ]
    batch = [Message(role=Role.USER, content=t, name="agent_dana") for t in texts]
    counter = tokenizers.for_resource(resource(MODELS["o200k_base"]))
    alone = Tokenizers().for_resource(resource(MODELS["o200k_base"]))
    assert sum(map(len, texts)) > MIN_SPLIT_CHARS * tokenizers.threads
    assert counter.messages(batch) == [alone.message(m) for m in batch]
    if tokenizers.threads > 1:
        helpers = [t for t in threading.enumerate() if t.name.startswith("memstream-count")]
        assert helpers, "the batch was not spread over the threads"


def test_a_message_costs_the_framing_plus_each_text_counted_on_its_own() -> None:
    words = {"user": 1, "hello": 1, "there": 1, "bot": 1}
    counter = TokenCounter(lambda text: sum(words[w] for w in text.split()), "words")
    message = Message(
        role=Role.USER,
        content=[ContentPart(type="text", text="hello there"), ContentPart(type="image_url")],
        name="bot",
    )
    assert counter.message(message) == PER_MESSAGE + 1 + 2 + PER_MEDIA_PART + 1 + 1
    assert counter.messages([message, message]) == [counter.message(message)] * 2


def test_a_batch_encoder_that_loses_a_text_is_an_error_not_a_wrong_count() -> None:
    def batch(texts: Sequence[str]) -> list[int]:
        return [len(t) for t in texts][:-1]

    counter = TokenCounter(len, "chars", batch=batch)
    with pytest.raises(ValueError, match="counts for"):
        counter.messages([Message(role=Role.USER, content="a text")])


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@pytest.mark.parametrize(
    "texts",
    [[], ["a"], ["a" * 100, "b"], ["x" * n for n in (5, 50, 500, 5, 50, 500, 1)], ["c"] * 9],
)
def test_split_keeps_every_text_in_order_in_at_most_the_runs_asked(
    texts: list[str], parts: int
) -> None:
    runs = split(texts, parts)
    assert [t for run in runs for t in run] == texts
    assert len(runs) <= parts and all(runs)


def test_split_makes_runs_of_about_equal_length() -> None:
    texts = ["w" * (i % 7 + 1) * 10 for i in range(1000)]
    lengths = [sum(map(len, run)) for run in split(texts, 4)]
    assert len(lengths) == 4
    assert max(lengths) - min(lengths) <= 2 * max(map(len, texts))
