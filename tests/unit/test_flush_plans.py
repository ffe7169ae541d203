"""Flush plans (``memory.flush``): which messages each strategy removes or folds into a
summary, on hand-made memories with exact token counts (fifo, priority with roles,
explicit priorities and keywords, lru, lfu, token_aware_lru, hybrid_summary with its
budget, earlier summaries and fallback), message-count and buffer memories, token
allocation shares, the outcomes (at target, protected), and properties over random
memories and resources checked against an oracle written independently of the
planner."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import FlushStrategy, MemoryResource, MemoryType, Role, StoredMessage
from memory.flush import MIN_SUMMARY_TOKENS, Counted, Limits, Outcome, Plan, Priorities, plan_flush

PROPERTY = settings(max_examples=200, deadline=None, database=None, derandomize=True)
REMOVING = [s for s in FlushStrategy if s is not FlushStrategy.HYBRID_SUMMARY]


def message(
    seq: int,
    role: Role = Role.USER,
    content: str | None = None,
    *,
    priority: int | None = None,
    covers: list[int] | None = None,
    at: int | None = None,
) -> StoredMessage:
    return StoredMessage(
        seq=seq,
        gen=1,
        at=1000 * seq if at is None else at,
        entry="1-0",
        role=role,
        content=f"message {seq}" if content is None else content,
        priority=priority,
        covers=covers,
    )


def counted(
    seq: int,
    tokens: int,
    role: Role = Role.USER,
    content: str | None = None,
    *,
    priority: int | None = None,
    last_used: int = 0,
    uses: int = 0,
) -> Counted:
    return Counted(message(seq, role, content, priority=priority), tokens, last_used, uses)


def summary(seq: int, tokens: int, covers: list[int]) -> Counted:
    text = f"Summary of {len(covers)} earlier messages:\n- user: something"
    return Counted(message(seq, Role.SYSTEM, text, covers=covers), tokens)


def users(seqs: range, tokens: int) -> list[Counted]:
    return [counted(s, tokens) for s in seqs]


def make_resource(flushing: dict[str, Any] | None = None, **fields: Any) -> MemoryResource:
    data: dict[str, Any] = {"resource": "memory", "id": "plans", "max_tokens": 1000}
    data.update(fields)
    data["flushing"] = {"summarize_threshold": 0.8, "target": 0.5, **(flushing or {})}
    return MemoryResource.model_validate(data)


def kept(entries: list[Counted], plan: Plan) -> list[int]:
    gone = set(plan.seqs)
    return [e.seq for e in entries if e.seq not in gone]


# --- limits -----------------------------------------------------------------------------


def test_limits_of_a_token_based_memory_are_the_target_share_of_max_tokens() -> None:
    assert Limits.target_of(make_resource(max_messages=40)) == Limits(tokens=500)


def test_limits_of_a_message_count_based_memory_ignore_tokens() -> None:
    resource = make_resource(type="message_count_based", max_tokens=None, max_messages=7)
    assert Limits.target_of(resource) == Limits(messages=3)


def test_limits_of_a_buffer_memory_hold_both_targets() -> None:
    resource = make_resource(type="buffer", max_messages=7)
    assert Limits.target_of(resource) == Limits(tokens=500, messages=3)


def test_message_target_is_at_least_one_message() -> None:
    resource = make_resource(
        {"target": 0.3}, type="message_count_based", max_tokens=None, max_messages=3
    )
    assert Limits.target_of(resource).messages == 1


def test_limits_with_token_allocation_hold_the_shares_of_the_whole_limit() -> None:
    resource = make_resource(token_allocation={})  # 0.1 / 0.6 / 0.3
    assert Limits.target_of(resource) == Limits(tokens=500, short_term=600, long_term=300)


def test_limits_follow_max_context_ratio() -> None:
    resource = make_resource(max_tokens=None, max_context_ratio=0.5, model_context_size=8000)
    assert Limits.target_of(resource) == Limits(tokens=2000)


def test_targets_are_exact_for_decimal_shares() -> None:
    resource = make_resource({"target": 0.57}, type="buffer", max_tokens=100, max_messages=100)
    assert Limits.target_of(resource) == Limits(tokens=57, messages=57)


# --- fifo ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [FlushStrategy.FIFO, FlushStrategy.SIMPLE_FIFO])
def test_fifo_removes_the_oldest_until_the_token_target(strategy: FlushStrategy) -> None:
    entries = users(range(1, 11), 100)
    plan = plan_flush(entries, make_resource(), strategy)
    assert plan == Plan(
        strategy,
        Outcome.PLANNED,
        remove=(1, 2, 3, 4, 5),
        tokens_before=1000,
        tokens_after=500,
        messages_before=10,
        messages_after=5,
    )


def test_fifo_stops_as_soon_as_the_target_is_met() -> None:
    entries = [counted(1, 450), counted(2, 100), counted(3, 100), counted(4, 100), counted(5, 250)]
    plan = plan_flush(entries, make_resource(), FlushStrategy.FIFO)
    assert plan.remove == (1, 2)
    assert plan.tokens_after == 450


def test_the_resource_strategy_is_the_default_and_an_explicit_one_overrides_it() -> None:
    entries = [counted(1, 300, last_used=9000), *users(range(2, 4), 300)]
    resource = make_resource({"type": "lru"})
    assert plan_flush(entries, resource).strategy is FlushStrategy.LRU
    assert plan_flush(entries, resource).remove == (2, 3)
    fifo = plan_flush(entries, resource, FlushStrategy.FIFO)
    assert (fifo.strategy, fifo.remove) == (FlushStrategy.FIFO, (1, 2))


def test_fifo_never_removes_a_protected_system_message() -> None:
    entries = [counted(1, 100, Role.SYSTEM), *users(range(2, 11), 100)]
    plan = plan_flush(entries, make_resource(), FlushStrategy.FIFO)
    assert plan.remove == (2, 3, 4, 5, 6)
    assert kept(entries, plan) == [1, 7, 8, 9, 10]


# --- priority -------------------------------------------------------------------------


def test_priority_removes_the_lowest_explicit_priority_first_oldest_within_a_level() -> None:
    levels = {1: 60, 2: 10, 3: 30, 4: 10, 5: 90, 6: 30}
    entries = [counted(s, 100, priority=p) for s, p in levels.items()]
    plan = plan_flush(entries, make_resource(max_tokens=600), FlushStrategy.PRIORITY)
    assert plan.remove == (2, 3, 4)
    assert kept(entries, plan) == [1, 5, 6]


def test_priority_by_role_removes_tool_messages_before_user_and_assistant() -> None:
    roles = [Role.SYSTEM, Role.USER, Role.TOOL, Role.ASSISTANT, Role.TOOL, Role.USER]
    entries = [counted(s, 100, role) for s, role in enumerate(roles, start=1)]
    plan = plan_flush(entries, make_resource(max_tokens=600), FlushStrategy.PRIORITY)
    assert plan.remove == (2, 3, 5)
    assert kept(entries, plan) == [1, 4, 6]


def test_an_explicit_priority_overrides_the_role_in_both_directions() -> None:
    entries = [
        counted(1, 100, priority=100),  # a user message raised to the protected level
        counted(2, 100, Role.SYSTEM, priority=10),  # a system message made evictable
        counted(3, 100),
        counted(4, 100),
    ]
    plan = plan_flush(entries, make_resource(max_tokens=400), FlushStrategy.FIFO)
    assert plan.remove == (2, 3)


def test_priority_keyword_raises_a_matching_message_and_keeps_it_longer() -> None:
    texts = ["hello", "I am allergic to peanuts", "nice weather", "ok", "fine", "bye"]
    entries = [counted(s, 100, content=t) for s, t in enumerate(texts, start=1)]
    resource = make_resource(
        max_tokens=600, priority={"keywords": [{"pattern": r"(?i)\ballerg", "priority": 90}]}
    )
    assert plan_flush(entries, resource, FlushStrategy.PRIORITY).remove == (1, 3, 4)
    assert plan_flush(entries, resource, FlushStrategy.FIFO).remove == (1, 2, 3)


def test_a_keyword_at_the_protected_level_protects_the_message_from_every_strategy() -> None:
    texts = ["order #123 placed", "hi", "how are you", "fine"]
    entries = [counted(s, 100, content=t) for s, t in enumerate(texts, start=1)]
    resource = make_resource(
        max_tokens=400, priority={"keywords": [{"pattern": r"order #\d+", "priority": 100}]}
    )
    for strategy in FlushStrategy:
        plan = plan_flush(entries, resource, strategy)
        assert 1 not in plan.seqs, strategy
        assert plan.tokens_after <= 200, strategy


def test_priority_levels_of_roles_keywords_explicit_values_and_summaries() -> None:
    resource = make_resource(
        priority={
            "keywords": [
                {"pattern": "lol", "priority": 5},
                {"pattern": "urgent", "priority": 70},
            ]
        }
    )
    p = Priorities(resource.priority)
    assert p.of(message(1, Role.USER, "lol")) == 50  # a lower keyword never lowers
    assert p.of(message(2, Role.TOOL, "lol")) == 20
    assert p.of(message(3, Role.TOOL, "urgent lol")) == 70
    assert p.of(message(4, Role.USER, "urgent", priority=3)) == 3  # explicit wins
    parts = StoredMessage.model_validate(
        {
            "seq": 5,
            "gen": 1,
            "at": 5,
            "entry": "1-0",
            "role": "user",
            "content": [{"type": "image_url"}, {"type": "text", "text": "this is urgent"}],
        }
    )
    assert p.of(parts) == 70
    folded = message(6, Role.SYSTEM, "Summary of 1 earlier messages:", covers=[1])
    assert p.of(folded) == 99
    assert not p.is_protected(folded)
    assert p.is_protected(message(7, Role.SYSTEM, "be brief"))
    assert p.is_protected(message(8, Role.DEVELOPER, "be brief"))


# --- lru, lfu, token_aware_lru --------------------------------------------------------


def lru_memory() -> list[Counted]:
    return [
        counted(1, 100, last_used=9000),  # written at 1000
        counted(2, 100),  # never read: recency 2000
        counted(3, 100, last_used=4000),
        counted(4, 100, last_used=8000),
        counted(5, 100),  # never read: recency 5000
    ]


def test_lru_removes_the_least_recently_read_and_never_read_by_when_written() -> None:
    entries = lru_memory()
    resource = make_resource({"target": 0.4}, max_tokens=500)
    plan = plan_flush(entries, resource, FlushStrategy.LRU)
    assert plan.remove == (2, 3, 5)
    assert kept(entries, plan) == [1, 4]
    assert plan_flush(entries, resource, FlushStrategy.FIFO).remove == (1, 2, 3)


def test_lfu_removes_the_least_often_read_then_the_least_recently() -> None:
    entries = [
        counted(1, 100, last_used=1500, uses=6),  # least recent, but most used
        counted(2, 100, last_used=7000, uses=1),
        counted(3, 100, last_used=3500, uses=1),  # ties with 2 on uses, less recent
        counted(4, 100, uses=0),
        counted(5, 100, last_used=6000, uses=3),
    ]
    resource = make_resource({"target": 0.6, "summarize_threshold": 0.8}, max_tokens=500)
    assert plan_flush(entries, resource, FlushStrategy.LFU).remove == (3, 4)
    assert plan_flush(entries, resource, FlushStrategy.LRU).remove == (1, 3)


def buffer_memory() -> list[Counted]:
    return [counted(1, 300), counted(2, 300), *users(range(3, 11), 20)]  # 760 tokens


def test_token_aware_lru_stops_at_the_token_target_of_a_buffer_memory() -> None:
    entries = buffer_memory()
    resource = make_resource(type="buffer", max_messages=10)
    plan = plan_flush(entries, resource, FlushStrategy.TOKEN_AWARE_LRU)
    assert plan.remove == (1,)
    assert (plan.tokens_after, plan.messages_after) == (460, 9)


def test_lru_on_a_buffer_memory_removes_until_both_targets_are_met() -> None:
    entries = buffer_memory()
    resource = make_resource(type="buffer", max_messages=10)
    plan = plan_flush(entries, resource, FlushStrategy.LRU)
    assert plan.remove == (1, 2, 3, 4, 5)
    assert (plan.tokens_after, plan.messages_after) == (100, 5)


def test_token_aware_lru_is_at_target_when_only_the_message_limit_is_over() -> None:
    entries = users(range(1, 11), 20)
    resource = make_resource(type="buffer", max_messages=10)
    assert plan_flush(entries, resource, FlushStrategy.TOKEN_AWARE_LRU).outcome is (
        Outcome.AT_TARGET
    )
    assert plan_flush(entries, resource, FlushStrategy.LRU).remove == (1, 2, 3, 4, 5)


def test_token_aware_lru_without_a_token_limit_works_on_messages() -> None:
    entries = [counted(1, 10, last_used=9000), *users(range(2, 5), 10)]
    resource = make_resource(type="message_count_based", max_tokens=None, max_messages=4)
    plan = plan_flush(entries, resource, FlushStrategy.TOKEN_AWARE_LRU)
    assert plan.remove == (2, 3)
    assert plan.messages_after == 2


# --- message-count and buffer memories ------------------------------------------------


def test_message_count_based_memory_removes_by_count_whatever_the_tokens() -> None:
    entries = users(range(1, 9), 1000)
    resource = make_resource(type="message_count_based", max_tokens=None, max_messages=10)
    plan = plan_flush(entries, resource, FlushStrategy.FIFO)
    assert plan.remove == (1, 2, 3)
    assert (plan.messages_after, plan.tokens_after) == (5, 5000)


def test_message_count_based_memory_keeps_at_least_one_message() -> None:
    entries = users(range(1, 4), 10)
    resource = make_resource(
        {"target": 0.3}, type="message_count_based", max_tokens=None, max_messages=3
    )
    assert plan_flush(entries, resource, FlushStrategy.FIFO).remove == (1, 2)


@pytest.mark.parametrize(
    ("count", "tokens", "removed"),
    [
        (6, 150, (1, 2, 3)),  # the token target binds: 900 -> 450
        (9, 10, (1, 2, 3, 4)),  # the message target binds: 9 -> 5
    ],
)
def test_buffer_memory_meets_whichever_target_binds(
    count: int, tokens: int, removed: tuple[int, ...]
) -> None:
    entries = users(range(1, count + 1), tokens)
    resource = make_resource(type="buffer", max_messages=10)
    plan = plan_flush(entries, resource, FlushStrategy.FIFO)
    assert plan.remove == removed
    assert plan.tokens_after <= 500
    assert plan.messages_after <= 5


# --- outcomes ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(FlushStrategy))
def test_a_memory_at_its_target_gets_an_empty_plan(strategy: FlushStrategy) -> None:
    entries = [counted(1, 100, Role.SYSTEM), *users(range(2, 6), 100)]  # exactly 500
    plan = plan_flush(entries, make_resource(), strategy)
    assert plan == Plan(
        strategy,
        Outcome.AT_TARGET,
        tokens_before=500,
        tokens_after=500,
        messages_before=5,
        messages_after=5,
    )
    assert plan.empty


def test_one_token_over_the_target_is_a_plan() -> None:
    entries = [counted(1, 101), *users(range(2, 6), 100)]
    plan = plan_flush(entries, make_resource(), FlushStrategy.FIFO)
    assert (plan.outcome, plan.remove, plan.tokens_after) == (Outcome.PLANNED, (1,), 400)


@pytest.mark.parametrize("strategy", list(FlushStrategy))
def test_only_protected_messages_over_the_target_is_reported_not_removed(
    strategy: FlushStrategy,
) -> None:
    entries = [counted(1, 300, Role.SYSTEM), counted(2, 300, Role.DEVELOPER), counted(3, 300)]
    resource = make_resource(priority={"protected": 50})
    plan = plan_flush(entries, resource, strategy)
    assert plan.outcome is Outcome.PROTECTED
    assert plan.empty
    assert (plan.tokens_before, plan.tokens_after) == (900, 900)


def test_removing_all_it_may_is_a_plan_even_when_the_memory_stays_over() -> None:
    entries = [counted(1, 600, Role.SYSTEM), counted(2, 100)]
    plan = plan_flush(entries, make_resource(), FlushStrategy.FIFO)
    assert (plan.outcome, plan.remove, plan.tokens_after) == (Outcome.PLANNED, (2,), 600)


def test_describe_and_seqs() -> None:
    entries = [counted(1, 480, Role.SYSTEM), *users(range(2, 8), 5)]
    plan = plan_flush(entries, make_resource({"type": "fifo"}))
    assert plan.seqs == (2, 3)
    assert plan.describe() == {
        "strategy": "fifo",
        "outcome": "planned",
        "remove": [2, 3],
        "summarize": [],
        "summary_budget": 0,
        "tokens": [510, 500],
        "messages": [7, 5],
    }


# --- token allocation -------------------------------------------------------------------


ALLOCATION = {"system": 0.2, "short_term": 0.5, "long_term": 0.3}


@pytest.mark.parametrize("strategy", REMOVING)
def test_the_short_term_share_is_enforced_under_the_token_target(
    strategy: FlushStrategy,
) -> None:
    entries = [counted(1, 100, Role.SYSTEM), *users(range(2, 9), 100)]  # 800 of 900
    resource = make_resource(
        {"target": 0.9, "summarize_threshold": 0.95}, token_allocation=ALLOCATION
    )
    plan = plan_flush(entries, resource, strategy)
    if strategy is FlushStrategy.TOKEN_AWARE_LRU:  # tokens alone: at target
        assert plan.outcome is Outcome.AT_TARGET
        return
    assert plan.remove == (2, 3)
    assert plan.tokens_after == 600  # 500 short-term + the system message


def test_the_long_term_share_removes_summaries_and_only_them() -> None:
    entries = [
        counted(1, 50),
        summary(2, 80, [100]),
        summary(3, 80, [101]),
        *users(range(4, 7), 50),
    ]
    allocation = {"system": 0.2, "short_term": 0.7, "long_term": 0.1}
    resource = make_resource(
        {"target": 0.9, "summarize_threshold": 0.95}, token_allocation=allocation
    )
    plan = plan_flush(entries, resource, FlushStrategy.FIFO)
    assert plan.remove == (2,)  # message 1 is older, but removing it would not help
    assert plan.tokens_after == 280


# --- hybrid_summary -----------------------------------------------------------------------


def hybrid(**flushing: Any) -> dict[str, Any]:
    return {"type": "hybrid_summary", **flushing}


def test_hybrid_folds_the_oldest_share_when_that_reaches_the_target() -> None:
    entries = users(range(1, 11), 90)
    resource = make_resource(hybrid(target=0.7, summary_tokens=50))
    plan = plan_flush(entries, resource)
    assert plan == Plan(
        FlushStrategy.HYBRID_SUMMARY,
        Outcome.PLANNED,
        summarize=(1, 2, 3),
        summary_budget=50,
        tokens_before=900,
        tokens_after=680,
        messages_before=10,
        messages_after=8,
        covers=(1, 2, 3),
    )


def test_hybrid_folds_more_than_the_share_when_needed_to_reach_the_target() -> None:
    entries = users(range(1, 11), 90)
    plan = plan_flush(entries, make_resource(hybrid(target=0.7, summary_tokens=150)))
    assert plan.summarize == (1, 2, 3, 4)
    assert (plan.summary_budget, plan.tokens_after, plan.messages_after) == (150, 690, 7)


@pytest.mark.parametrize(
    ("share", "folded"), [(0.01, 1), (0.1, 1), (0.11, 2), (0.25, 3), (0.5, 5), (1.0, 10)]
)
def test_hybrid_share_is_rounded_up_to_whole_messages(share: float, folded: int) -> None:
    entries = users(range(1, 11), 90)
    resource = make_resource(
        hybrid(
            target=0.85, summarize_threshold=0.9, summary_tokens=20, summarize_oldest_percent=share
        )
    )
    plan = plan_flush(entries, resource)
    assert plan.summarize == tuple(range(1, folded + 1))
    assert plan.tokens_after == 900 - 90 * folded + 20


def test_hybrid_share_is_exact_for_decimal_shares() -> None:
    entries = users(range(1, 101), 10)
    resource = make_resource(
        hybrid(
            target=0.95, summarize_threshold=0.99, summary_tokens=20, summarize_oldest_percent=0.07
        )
    )
    assert plan_flush(entries, resource).summarize == tuple(range(1, 8))


def test_hybrid_folds_protected_messages_never_and_earlier_summaries_always() -> None:
    entries = [counted(1, 50, Role.SYSTEM), summary(4, 80, [2, 3]), *users(range(5, 13), 100)]
    resource = make_resource(hybrid(target=0.6, summary_tokens=100, summarize_oldest_percent=0.25))
    plan = plan_flush(entries, resource)
    assert plan.summarize == (4, 5, 6, 7, 8)
    assert plan.covers == (2, 3, 5, 6, 7, 8)
    assert (plan.summary_budget, plan.tokens_after, plan.messages_after) == (100, 550, 6)
    assert kept(entries, plan) == [1, 9, 10, 11, 12]


def test_hybrid_merges_the_covers_of_every_earlier_summary() -> None:
    entries = [summary(3, 40, [1, 2]), summary(6, 40, [4, 5]), *users(range(7, 13), 100)]
    resource = make_resource(hybrid(summary_tokens=60, summarize_oldest_percent=0.2))
    plan = plan_flush(entries, resource)
    assert plan.summarize == (3, 6, 7, 8)
    assert plan.covers == (1, 2, 4, 5, 7, 8)
    assert (plan.tokens_after, plan.messages_after) == (460, 5)


def test_hybrid_summary_budget_is_capped_by_the_long_term_share() -> None:
    entries = users(range(1, 11), 100)
    allocation = {"system": 0.1, "short_term": 0.8, "long_term": 0.1}
    capped = plan_flush(entries, make_resource(hybrid(), token_allocation=allocation))
    assert capped.summary_budget == 100
    assert capped.summarize == (1, 2, 3, 4, 5, 6)
    assert capped.tokens_after == 500
    uncapped = plan_flush(entries, make_resource(hybrid()))  # summary_tokens: 500
    assert uncapped.summary_budget == 500
    assert uncapped.summarize == tuple(range(1, 11))


def test_hybrid_shrinks_the_summary_to_the_room_the_target_leaves() -> None:
    entries = [counted(1, 400, Role.SYSTEM), *users(range(2, 8), 100)]
    plan = plan_flush(entries, make_resource(hybrid(summary_tokens=300)))
    assert plan.summarize == (2, 3, 4, 5, 6, 7)
    assert (plan.summary_budget, plan.tokens_after, plan.messages_after) == (100, 500, 2)


def test_hybrid_writes_a_summary_of_exactly_the_smallest_useful_size() -> None:
    protected = 500 - MIN_SUMMARY_TOKENS
    entries = [counted(1, protected, Role.SYSTEM), *users(range(2, 8), 5)]
    plan = plan_flush(entries, make_resource(hybrid(summary_tokens=300)))
    assert plan.summarize == (2, 3, 4, 5, 6, 7)
    assert plan.summary_budget == MIN_SUMMARY_TOKENS
    assert plan.tokens_after == 500


def test_hybrid_falls_back_to_removing_the_oldest_when_no_useful_summary_fits() -> None:
    protected = 500 - MIN_SUMMARY_TOKENS + 1
    recent = [counted(2, 5, last_used=99_000, uses=9)]  # oldest, though read the most
    entries = [counted(1, protected, Role.SYSTEM), *recent, *users(range(3, 8), 5)]  # 515
    plan = plan_flush(entries, make_resource(hybrid(summary_tokens=300)))
    assert plan == Plan(
        FlushStrategy.HYBRID_SUMMARY,
        Outcome.PLANNED,
        remove=(2, 3, 4),
        tokens_before=515,
        tokens_after=500,
        messages_before=7,
        messages_after=4,
    )


def test_hybrid_with_only_summaries_to_fold_removes_them() -> None:
    entries = [counted(1, 300, Role.SYSTEM), summary(2, 300, [0])]
    plan = plan_flush(entries, make_resource(hybrid()))
    assert (plan.outcome, plan.remove, plan.summarize) == (Outcome.PLANNED, (2,), ())


def test_hybrid_on_a_message_count_based_memory_folds_to_the_message_target() -> None:
    entries = users(range(1, 11), 100)
    resource = make_resource(
        hybrid(summary_tokens=200), type="message_count_based", max_tokens=None, max_messages=10
    )
    plan = plan_flush(entries, resource)
    assert plan.summarize == (1, 2, 3, 4, 5, 6)
    assert (plan.summary_budget, plan.messages_after, plan.tokens_after) == (200, 5, 600)


@pytest.mark.parametrize(
    ("flushing", "allocation"),
    [
        (hybrid(), {"system": 0.1, "short_term": 0.9, "long_term": 0.0}),
        (hybrid(), {"system": 0.1, "short_term": 0.89, "long_term": 0.01}),
        (hybrid(summary_tokens=5), None),
    ],
)
def test_hybrid_never_plans_a_summary_below_the_smallest_useful_size(
    flushing: dict[str, Any], allocation: dict[str, float] | None
) -> None:
    entries = users(range(1, 10), 100)
    plan = plan_flush(entries, make_resource(flushing, token_allocation=allocation))
    assert plan.summarize == () or plan.summary_budget >= MIN_SUMMARY_TOKENS


# --- properties over random memories and resources ----------------------------------------

ROLES = [Role.SYSTEM, Role.DEVELOPER, Role.USER, Role.ASSISTANT, Role.TOOL]
WORDS = ["hello", "urgent", "refund", "weather", "ok", "thanks"]
KEYWORDS: list[list[dict[str, Any]]] = [
    [],
    [{"pattern": "urgent", "priority": 100}],
    [{"pattern": "(?i)refund", "priority": 70}],
]


def decode(seq: int, code: int) -> Counted:
    """One message from one drawn integer (one draw per message keeps generation fast;
    shrinking the integer toward 0 shrinks the message toward a plain one)."""
    code, tokens = divmod(code, 400)
    code, kind = divmod(code, 10)
    if kind == 9:  # an earlier summary
        bits = code % 2**9 or 1
        covers = [seq - 1 - b for b in range(9) if bits >> b & 1]
        return summary(seq, tokens + 1, sorted(covers))
    code, role = divmod(code, len(ROLES))
    code, priority = divmod(code, 160)  # 121..159: no explicit priority
    code, words = divmod(code, len(WORDS) ** 2)
    code, uses = divmod(code, 11)
    code, used = divmod(code, 1000)  # 0..299: never read
    at = code % 1000 + 1
    text = f"{WORDS[words % len(WORDS)]} {WORDS[words // len(WORDS)]}"
    return Counted(
        message(seq, ROLES[role], text, priority=priority if priority <= 120 else None, at=at),
        tokens + 1,
        last_used=used if used >= 300 else 0,
        uses=uses,
    )


memories = st.lists(st.integers(0, 2**62), max_size=25).map(
    lambda codes: [decode(10 * (i + 1), c) for i, c in enumerate(codes)]
)


@st.composite
def resources(draw: st.DrawFn, *, allocation: bool = True) -> MemoryResource:
    kind = draw(st.sampled_from(list(MemoryType)))
    target = draw(st.integers(5, 90))
    data: dict[str, Any] = {
        "resource": "memory",
        "id": "prop",
        "type": kind.value,
        "flushing": {
            "summarize_threshold": draw(st.integers(target + 1, 100)) / 100,
            "target": target / 100,
            "summary_tokens": draw(st.integers(1, 600)),
            "summarize_oldest_percent": draw(st.integers(1, 100)) / 100,
        },
        "priority": {
            "protected": draw(st.sampled_from([0, 50, 100, 101])),
            "keywords": draw(st.sampled_from(KEYWORDS)),
        },
    }
    if kind is not MemoryType.MESSAGE_COUNT_BASED:
        data["max_tokens"] = draw(st.integers(50, 6000))
        if allocation and draw(st.booleans()):
            short = draw(st.integers(0, 100))
            long = draw(st.integers(0, 100 - short))
            data["token_allocation"] = {
                "system": (100 - short - long) / 100,
                "short_term": short / 100,
                "long_term": long / 100,
            }
    if kind is not MemoryType.TOKEN_BASED:
        data["max_messages"] = draw(st.integers(1, 30))
    return MemoryResource.model_validate(data)


def level(m: StoredMessage, resource: MemoryResource) -> int:
    """The oracle: explicit priority, else the highest of role and matching keywords;
    summaries just below the protected level."""
    if m.covers is not None:
        return resource.priority.protected - 1
    if m.priority is not None:
        return m.priority
    found = resource.priority.roles.get(m.role, 0)
    for k in resource.priority.keywords:
        if re.search(k.pattern, str(m.content)):
            found = max(found, k.priority)
    return found


def is_protected(m: StoredMessage, resource: MemoryResource) -> bool:
    return m.covers is None and level(m, resource) >= resource.priority.protected


class Oracle:
    """Targets and totals computed from the resource's fields, not by the planner."""

    def __init__(self, entries: list[Counted], resource: MemoryResource) -> None:
        self.entries = entries
        self.resource = resource
        share = resource.flushing.target
        token_limit = resource.max_tokens  # the generated resources set no context ratio
        message_limit = resource.max_messages
        if resource.type is MemoryType.TOKEN_BASED:
            message_limit = None
        allocation = resource.token_allocation
        self.tokens = self.short = self.long = self.messages = None
        if token_limit is not None:
            self.tokens = math.floor(share * token_limit)
            if allocation is not None:
                self.short = math.floor(allocation.short_term * token_limit)
                self.long = math.floor(allocation.long_term * token_limit)
        if message_limit is not None:
            self.messages = max(1, math.floor(share * message_limit))
        self.protected = {e.seq for e in entries if is_protected(e.message, resource)}
        self.protected_tokens = sum(e.tokens for e in entries if e.seq in self.protected)

    def totals(self, kept: list[Counted], summary_tokens: int | None) -> dict[str, int]:
        extra = summary_tokens or 0
        return {
            "tokens": sum(e.tokens for e in kept) + extra,
            "messages": len(kept) + (summary_tokens is not None),
            "short": sum(
                e.tokens for e in kept if e.seq not in self.protected and e.message.covers is None
            ),
            "long": sum(e.tokens for e in kept if e.message.covers is not None) + extra,
        }

    def over(self, totals: dict[str, int], strategy: FlushStrategy) -> set[str]:
        limits = {
            "tokens": self.tokens,
            "messages": self.messages,
            "short": self.short,
            "long": self.long,
        }
        if strategy is FlushStrategy.TOKEN_AWARE_LRU and self.tokens is not None:
            limits = {"tokens": self.tokens}
        return {k for k, v in limits.items() if v is not None and totals[k] > v}

    def protected_alone_over(self) -> set[str]:
        out = set()
        if self.tokens is not None and self.protected_tokens > self.tokens:
            out.add("tokens")
        if self.messages is not None and len(self.protected) > self.messages:
            out.add("messages")
        return out

    def after(self, plan: Plan) -> tuple[list[Counted], int | None]:
        gone = set(plan.seqs)
        kept = [e for e in self.entries if e.seq not in gone]
        return kept, (plan.summary_budget if plan.summarize else None)


@PROPERTY
@given(memories, resources())
def test_plans_take_only_present_evictable_messages(
    entries: list[Counted], resource: MemoryResource
) -> None:
    oracle = Oracle(entries, resource)
    seqs = {e.seq for e in entries}
    for strategy in FlushStrategy:
        plan = plan_flush(entries, resource, strategy)
        assert plan.strategy is strategy
        assert set(plan.remove) <= seqs
        assert set(plan.summarize) <= seqs
        assert not set(plan.seqs) & oracle.protected, strategy
        assert list(plan.remove) == sorted(plan.remove)
        assert list(plan.summarize) == sorted(plan.summarize)
        assert not (plan.remove and plan.summarize)
        if strategy is not FlushStrategy.HYBRID_SUMMARY:
            assert (plan.summarize, plan.summary_budget, plan.covers) == ((), 0, ())


@PROPERTY
@given(memories, resources())
def test_plans_reach_the_target_unless_protected_messages_alone_exceed_it(
    entries: list[Counted], resource: MemoryResource
) -> None:
    oracle = Oracle(entries, resource)
    before = oracle.totals(entries, None)
    for strategy in FlushStrategy:
        plan = plan_flush(entries, resource, strategy)
        assert (plan.outcome is Outcome.AT_TARGET) == (not oracle.over(before, strategy))
        kept, summary_tokens = oracle.after(plan)
        after = oracle.totals(kept, summary_tokens)
        assert oracle.over(after, strategy) <= oracle.protected_alone_over(), strategy
        if plan.outcome is Outcome.PROTECTED:
            assert plan.empty
            assert {e.seq for e in entries} == oracle.protected
        if plan.outcome is Outcome.PLANNED:
            assert not plan.empty


@PROPERTY
@given(memories, resources())
def test_plan_totals_are_the_totals_after_the_plan(
    entries: list[Counted], resource: MemoryResource
) -> None:
    oracle = Oracle(entries, resource)
    for strategy in FlushStrategy:
        plan = plan_flush(entries, resource, strategy)
        kept, summary_tokens = oracle.after(plan)
        after = oracle.totals(kept, summary_tokens)
        assert (plan.tokens_before, plan.messages_before) == (
            sum(e.tokens for e in entries),
            len(entries),
        )
        assert (plan.tokens_after, plan.messages_after) == (after["tokens"], after["messages"])


@PROPERTY
@given(memories, resources())
def test_hybrid_summaries_cover_what_they_fold_and_stay_within_budget(
    entries: list[Counted], resource: MemoryResource
) -> None:
    plan = plan_flush(entries, resource, FlushStrategy.HYBRID_SUMMARY)
    oracle = Oracle(entries, resource)
    if not plan.summarize:
        assert plan.covers == ()
        return
    by_seq = {e.seq: e for e in entries}
    folded = [by_seq[s] for s in plan.summarize]
    expected: list[int] = []
    for e in folded:
        expected.extend(e.message.covers if e.message.covers is not None else [e.seq])
    assert plan.covers == tuple(sorted(expected))
    assert list(plan.covers) == sorted(plan.covers)
    # Every earlier summary is folded; the other folded messages are the oldest ones.
    summaries = [e.seq for e in entries if e.message.covers is not None]
    assert set(summaries) <= set(plan.summarize)
    candidates = [
        e.seq for e in entries if e.seq not in oracle.protected and e.message.covers is None
    ]
    messages = [s for s in plan.summarize if s not in summaries]
    assert messages == candidates[: len(messages)]
    share = resource.flushing.summarize_oldest_percent
    assert len(messages) >= min(len(candidates), max(1, math.ceil(share * len(candidates))))
    # The budget.
    assert plan.summary_budget <= resource.flushing.summary_tokens
    if oracle.long is not None:
        assert plan.summary_budget <= oracle.long
    if resource.flushing.summary_tokens >= MIN_SUMMARY_TOKENS and (
        oracle.long is None or oracle.long >= MIN_SUMMARY_TOKENS
    ):
        assert plan.summary_budget >= MIN_SUMMARY_TOKENS


def removal_order(
    entries: list[Counted], resource: MemoryResource, strategy: FlushStrategy
) -> list[int]:
    """The oracle's order of eviction of each removing strategy."""

    def key(e: Counted) -> tuple[int, ...]:
        recency = e.last_used or e.message.at
        if strategy in (FlushStrategy.FIFO, FlushStrategy.SIMPLE_FIFO):
            return (e.seq,)
        if strategy is FlushStrategy.HYBRID_SUMMARY:  # no summary fits: oldest first
            return (e.seq,)
        if strategy is FlushStrategy.PRIORITY:
            return (level(e.message, resource), e.seq)
        if strategy is FlushStrategy.LFU:
            return (e.uses, recency, e.seq)
        return (recency, e.seq)  # lru, token_aware_lru

    return [e.seq for e in sorted(entries, key=key)]


@PROPERTY
@given(memories, resources(allocation=False))
def test_removal_takes_the_shortest_prefix_of_the_strategy_order(
    entries: list[Counted], resource: MemoryResource
) -> None:
    oracle = Oracle(entries, resource)
    evictable = [e for e in entries if e.seq not in oracle.protected]
    for strategy in FlushStrategy:
        plan = plan_flush(entries, resource, strategy)
        if plan.summarize:
            continue
        order = removal_order(evictable, resource, strategy)
        removed = order[: len(plan.remove)]
        assert tuple(sorted(removed)) == plan.remove, strategy
        if plan.remove:  # one message fewer would not have been enough
            gone = set(removed[:-1])
            almost = oracle.totals([e for e in entries if e.seq not in gone], None)
            assert oracle.over(almost, strategy), strategy
