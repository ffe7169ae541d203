"""Every rule of a memory resource file: strict fields with "did you mean" (near misses
and the origin system's drifted names), budgets, fractions, allocations, secrets,
persistence, durations, locking warnings, cleanup, RE2 patterns, key templates, origin
files that load unchanged, and the registry (duplicates, separate agent table, reload).
Each error is asserted as ``<file>: <field path>: <fix>``."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from memory import (
    AgentResource,
    CleanupPolicy,
    FlushStrategy,
    MemoryResource,
    MemoryType,
    ResourceError,
    ResourceRegistry,
    load_resource_file,
    template_context,
)
from memory.models import CONTEXT_SIZES, context_size

BASE = "resource: memory\nid: rules\nmax_tokens: 1000\n"
BARE = "resource: memory\nid: rules\n"
RE2_HINT = "RE2 has no backreferences or lookarounds, which is what keeps matching linear-time"
NO_EFFECT = "has no effect: appends and clears are ordered by partition and take no lock; remove it"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, name: str = "rules.yaml") -> MemoryResource:
    item = load_resource_file(write(tmp_path, name, text))
    assert isinstance(item, MemoryResource)
    return item


def refusal(tmp_path: Path, text: str, name: str = "rules.yaml") -> tuple[Path, ResourceError]:
    path = write(tmp_path, name, text)
    with pytest.raises(ResourceError) as info:
        load_resource_file(path)
    assert info.value.path == str(path)
    return path, info.value


# --- unknown fields: near misses and the origin system's drifted names ---------------


@pytest.mark.parametrize(
    ("extra", "field", "suggestion"),
    [
        ("max_token: 5\n", "max_token", "max_tokens"),
        ("max_mesages: 5\n", "max_mesages", "max_messages"),
        ("flushing:\n  sumarize_threshold: 0.9\n", "flushing.sumarize_threshold",
         "summarize_threshold"),
        ("flushing:\n  summary_token: 100\n", "flushing.summary_token", "summary_tokens"),
        ("privacy_policy:\n  redact_pattern: []\n", "privacy_policy.redact_pattern",
         "redact_patterns"),
        ("token_provider:\n  api_key_environment: X\n", "token_provider.api_key_environment",
         "api_key_env"),
        ("priority:\n  keywords:\n    - patern: a\n      pattern: a\n      priority: 1\n",
         "priority.keywords.0.patern", "pattern"),
        ("cleanup:\n  on_workflow_ends: keep\n", "cleanup.on_workflow_ends", "on_workflow_end"),
    ],
)  # fmt: skip
def test_a_misspelt_field_gets_did_you_mean_with_its_full_path(
    tmp_path: Path, extra: str, field: str, suggestion: str
) -> None:
    path, error = refusal(tmp_path, BASE + extra)
    assert error.field == field
    assert str(error) == f"{path}: {field}: unknown field: did you mean {suggestion}?"


def test_an_unknown_field_with_no_near_miss_lists_the_fields_of_its_section(
    tmp_path: Path,
) -> None:
    path, error = refusal(tmp_path, BASE + "persistence:\n  colour: red\n")
    assert str(error) == (
        f"{path}: persistence.colour: unknown field: remove it (fields here: ttl, type)"
    )


@pytest.mark.parametrize(
    ("extra", "field", "suggestion"),
    [
        ("flushing_strategy: fifo\n", "flushing_strategy", "flushing"),
        ("key: 'support-{{ workflow.id }}'\n", "key", "default_key_template"),
        ("flushing:\n  threshold: 0.8\n", "flushing.threshold", "summarize_threshold"),
        ("message_limit: 50\n", "message_limit", "max_messages"),
        ("eviction_policy: lru\n", "eviction_policy",
         "flushing (type lru, lfu or priority) and priority"),
        ("privacy:\n  redact_patterns: []\n", "privacy", "privacy_policy"),
        ("ttl: 24h\n", "ttl", "persistence.ttl"),
        ("storage: redis\n", "storage", "persistence"),
        ("token_counter: tiktoken\n", "token_counter", "token_provider"),
        ("priority_blocks: []\n", "priority_blocks", "priority"),
        ("flush_ttl: 5m\n", "flush_ttl", "locking.flush_ttl"),
        ("append_ttl: 30s\n", "append_ttl", "locking.append_ttl"),
        ("clear_ttl: 30s\n", "clear_ttl", "locking.clear_ttl"),
        ("circuit_breaker:\n  max_failures: 3\n", "circuit_breaker",
         "nothing: Redis failures are handled by the processors; remove it"),
    ],
)  # fmt: skip
def test_a_drifted_origin_name_is_refused_with_its_name_here(
    tmp_path: Path, extra: str, field: str, suggestion: str
) -> None:
    path, error = refusal(tmp_path, BASE + extra)
    assert error.field == field
    assert str(error) == (
        f"{path}: {field}: unknown field (from the origin system?): did you mean {suggestion}?"
    )


def test_a_drifted_name_at_the_top_level_suggests_the_path_where_it_belongs(
    tmp_path: Path,
) -> None:
    """``threshold`` at the top level belongs in ``flushing``: suggesting a bare
    ``summarize_threshold`` there sends the user to another unknown field."""
    path, error = refusal(tmp_path, BASE + "threshold: 0.8\n")
    assert str(error) == (
        f"{path}: threshold: unknown field (from the origin system?): "
        f"did you mean flushing.summarize_threshold?"
    )


def test_several_errors_are_each_reported_on_their_own_line_with_file_and_field(
    tmp_path: Path,
) -> None:
    text = (
        BASE
        + "flushing_strategy: fifo\n"
        + "flushing:\n  sumarize_threshold: 0.9\n"
        + "persistence:\n  type: in_memory\n"
        + "max_context_ratio: 30\n"
    )
    path, error = refusal(tmp_path, text)
    lines = str(error).splitlines()
    assert sorted(lines) == sorted(
        [
            f"{path}: flushing_strategy: unknown field (from the origin system?): "
            f"did you mean flushing?",
            f"{path}: flushing.sumarize_threshold: unknown field: "
            f"did you mean summarize_threshold?",
            f"{path}: persistence.type: Input should be 'redis' (got 'in_memory')",
            f"{path}: max_context_ratio: write a fraction of 1: did you mean 0.3?",
        ]
    )
    assert sorted(field for field, _ in error.problems) == [
        "flushing.sumarize_threshold",
        "flushing_strategy",
        "max_context_ratio",
        "persistence.type",
    ]


# --- budgets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("type: token_based\n", "a token_based memory needs max_tokens or max_context_ratio"),
        ("type: token_based\nmax_messages: 10\n",
         "a token_based memory needs max_tokens or max_context_ratio"),
        ("type: message_count_based\nmax_tokens: 100\n",
         "a message_count_based memory needs max_messages"),
        ("type: buffer\nmax_messages: 10\n",
         "a buffer memory needs both a token limit (max_tokens or max_context_ratio) and "
         "max_messages"),
        ("type: buffer\nmax_context_ratio: 0.5\n",
         "a buffer memory needs both a token limit (max_tokens or max_context_ratio) and "
         "max_messages"),
    ],
)  # fmt: skip
def test_a_budget_missing_its_limit_is_refused_saying_what_to_add(
    tmp_path: Path, extra: str, message: str
) -> None:
    path, error = refusal(tmp_path, BARE + extra)
    assert str(error) == f"{path}: (top level): {message}"


@pytest.mark.parametrize(
    ("extra", "tokens", "messages"),
    [
        ("type: token_based\nmax_tokens: 900\n", 900, None),
        ("type: token_based\nmax_context_ratio: 0.5\nmodel: gpt-4\n", 4096, None),
        ("type: message_count_based\nmax_messages: 40\n", None, 40),
        ("type: buffer\nmax_tokens: 900\nmax_messages: 40\n", 900, 40),
        ("type: buffer\nmax_context_ratio: 0.25\nmodel: gpt-4o\nmax_messages: 40\n", 32000, 40),
    ],
)
def test_a_complete_budget_loads_with_its_limits(
    tmp_path: Path, extra: str, tokens: int | None, messages: int | None
) -> None:
    resource = load(tmp_path, BARE + extra)
    assert (resource.token_limit, resource.max_messages) == (tokens, messages)


@pytest.mark.parametrize(
    ("model", "ratio", "expected"),
    [
        ("gpt-4", 0.3, math.floor(0.3 * 8192)),  # 2457.6: floored, not rounded
        ("gpt-4o", 0.25, 32000),
        ("gpt-4-32k-0613", 0.5, 16384),  # the longest known prefix wins over gpt-4
        ("claude-3-7-sonnet", 0.333, math.floor(0.333 * 200_000)),
        ("gemini-1.5-pro-002", 1, 2_097_152),
    ],
)
def test_max_context_ratio_of_a_known_model_is_floor_of_ratio_times_context(
    tmp_path: Path, model: str, ratio: float, expected: int
) -> None:
    resource = load(tmp_path, BARE + f"model: {model}\nmax_context_ratio: {ratio}\n")
    assert resource.max_tokens is None
    assert resource.token_limit == expected
    assert resource.context_size == context_size(model)


def test_the_known_context_sizes_are_matched_by_longest_prefix() -> None:
    assert context_size("gpt-4") == CONTEXT_SIZES["gpt-4"] == 8192
    assert context_size("gpt-4-32k") == 32_768
    assert context_size("gpt-4o-mini-2024-07-18") == 128_000
    assert context_size("llama-3-70b") is None
    assert context_size("") is None


def test_max_context_ratio_of_an_unknown_model_says_to_set_model_context_size(
    tmp_path: Path,
) -> None:
    path, error = refusal(tmp_path, BARE + "model: llama-3-70b\nmax_context_ratio: 0.5\n")
    assert str(error) == (
        f"{path}: (top level): max_context_ratio needs the model's context size, and "
        f"'llama-3-70b' is not a model memstream knows: set model_context_size"
    )


def test_model_context_size_makes_an_unknown_model_usable_and_overrides_a_known_one(
    tmp_path: Path,
) -> None:
    unknown = load(
        tmp_path, BARE + "model: llama-3\nmodel_context_size: 10001\nmax_context_ratio: 0.5\n"
    )
    assert unknown.token_limit == 5000
    known = load(
        tmp_path, BARE + "model: gpt-4o\nmodel_context_size: 1000\nmax_context_ratio: 0.5\n"
    )
    assert known.token_limit == 500


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("max_context_ratio: {value}\nmodel: gpt-4o\n", "max_context_ratio"),
        ("flushing:\n  summarize_threshold: {value}\n  target: 0.1\n",
         "flushing.summarize_threshold"),
        ("flushing:\n  target: {value}\n", "flushing.target"),
        ("flushing:\n  summarize_oldest_percent: {value}\n", "flushing.summarize_oldest_percent"),
    ],
)  # fmt: skip
def test_a_whole_percentage_in_a_fraction_gets_did_you_mean_the_fraction(
    tmp_path: Path, extra: str, field: str
) -> None:
    path, error = refusal(tmp_path, BASE.replace("max_tokens: 1000\n", "") + extra.format(value=30))
    assert str(error) == f"{path}: {field}: write a fraction of 1: did you mean 0.3?"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "Input should be greater than 0"),
        ("-0.5", "Input should be greater than 0"),
        ("1.5", "Input should be less than or equal to 1"),
        ("100", "write a fraction of 1: did you mean 1?"),
        ("45", "write a fraction of 1: did you mean 0.45?"),
    ],
)
def test_a_fraction_must_be_in_zero_excluded_to_one(
    tmp_path: Path, value: str, message: str
) -> None:
    path, error = refusal(tmp_path, BARE + f"model: gpt-4o\nmax_context_ratio: {value}\n")
    assert str(error) == f"{path}: max_context_ratio: {message}"


def test_a_fraction_of_exactly_one_is_allowed(tmp_path: Path) -> None:
    resource = load(tmp_path, BARE + "model: gpt-4o\nmax_context_ratio: 1\n")
    assert resource.max_context_ratio == 1.0
    assert resource.token_limit == 128_000


@pytest.mark.parametrize(("target", "threshold"), [("0.9", "0.8"), ("0.8", "0.8")])
def test_the_flush_target_must_be_below_the_threshold(
    tmp_path: Path, target: str, threshold: str
) -> None:
    path, error = refusal(
        tmp_path, BASE + f"flushing:\n  summarize_threshold: {threshold}\n  target: {target}\n"
    )
    assert str(error) == (
        f"{path}: flushing: target ({target}) must be below summarize_threshold "
        f"({threshold}), or a flush would trip again at once"
    )


def test_flushing_defaults_and_every_strategy_load(tmp_path: Path) -> None:
    resource = load(tmp_path, BASE)
    assert resource.flushing.type is FlushStrategy.FIFO
    assert (resource.flushing.summarize_threshold, resource.flushing.target) == (0.8, 0.6)
    for strategy in FlushStrategy:
        loaded = load(tmp_path, BASE + f"flushing:\n  type: {strategy.value}\n")
        assert loaded.flushing.type is strategy


def test_an_unknown_flush_strategy_lists_the_known_ones(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, BASE + "flushing:\n  type: random\n")
    assert str(error) == (
        f"{path}: flushing.type: Input should be 'hybrid_summary', 'fifo', 'simple_fifo', "
        f"'lru', 'lfu', 'token_aware_lru' or 'priority' (got 'random')"
    )


# --- token allocation and the token provider ---------------------------------------


@pytest.mark.parametrize(
    ("allocation", "total"),
    [
        ("system: 0.2\n  short_term: 0.5\n  long_term: 0.2\n  user_defined:\n    tools: 0.2\n",
         "1.1"),
        ("system: 0.1\n  short_term: 0.5\n  long_term: 0.3\n", "0.9"),
        ("system: 0.5\n  short_term: 0.5\n  long_term: 0.5\n", "1.5"),
    ],
)  # fmt: skip
def test_token_allocation_that_does_not_add_up_to_one_gives_the_actual_sum(
    tmp_path: Path, allocation: str, total: str
) -> None:
    path, error = refusal(tmp_path, BASE + "token_allocation:\n  " + allocation)
    assert str(error) == (
        f"{path}: token_allocation: the shares add up to {total}; make them add up to 1.0"
    )


def test_token_allocation_with_user_defined_shares_adding_up_to_one_loads(
    tmp_path: Path,
) -> None:
    resource = load(
        tmp_path,
        BASE + "token_allocation:\n  system: 0.1\n  short_term: 0.4\n  long_term: 0.2\n"
        "  user_defined:\n    tools: 0.2\n    scratch: 0.1\n",
    )
    assert resource.token_allocation is not None
    assert resource.token_allocation.user_defined == {"tools": 0.2, "scratch": 0.1}


def test_token_allocation_within_a_thousandth_of_one_loads(tmp_path: Path) -> None:
    resource = load(
        tmp_path,
        BASE + "token_allocation:\n  system: 0.3333\n  short_term: 0.3333\n  long_term: 0.3333\n",
    )
    assert resource.token_allocation is not None


def test_an_inline_api_key_is_refused_pointing_to_api_key_env(tmp_path: Path) -> None:
    path, error = refusal(
        tmp_path, BASE + "token_provider:\n  provider: openai\n  api_key: sk-live-123\n"
    )
    assert str(error) == (
        f"{path}: token_provider: api_key: never write a secret in a resource file; set "
        f"api_key_env to the name of the environment variable that holds it"
    )
    assert "sk-live-123" not in str(error)


def test_a_token_provider_naming_its_key_variable_loads(tmp_path: Path) -> None:
    resource = load(
        tmp_path,
        BASE + "token_provider:\n  provider: anthropic\n  model: claude-3-5-sonnet\n"
        "  api_key_env: ANTHROPIC_API_KEY\n",
    )
    assert resource.token_provider is not None
    assert resource.token_provider.api_key_env == "ANTHROPIC_API_KEY"


def test_an_unknown_token_provider_lists_the_known_ones(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, BASE + "token_provider:\n  provider: llama\n")
    assert str(error) == (
        f"{path}: token_provider.provider: Input should be 'openai', 'anthropic', 'google', "
        f"'cohere', 'deepseek' or 'mistral' (got 'llama')"
    )


# --- persistence and durations -----------------------------------------------------


@pytest.mark.parametrize("kind", ["in_memory", "postgres"])
def test_persistence_other_than_redis_is_refused(tmp_path: Path, kind: str) -> None:
    path, error = refusal(tmp_path, BASE + f"persistence:\n  type: {kind}\n")
    assert str(error) == f"{path}: persistence.type: Input should be 'redis' (got '{kind}')"


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("24h", 86_400), ("7d", 604_800), ("1h30m", 5_400), ("90", 90), ('"3600"', 3_600)],
)
def test_ttl_durations_are_read_as_seconds(tmp_path: Path, ttl: str, seconds: int) -> None:
    resource = load(tmp_path, BASE + f"persistence:\n  ttl: {ttl}\n")
    assert resource.persistence.ttl == seconds
    assert resource.ttl_ms == seconds * 1000


def test_the_default_ttl_is_seven_days(tmp_path: Path) -> None:
    assert load(tmp_path, BASE).persistence.ttl == 7 * 86_400


@pytest.mark.parametrize(
    ("section", "field"),
    [("locking", "flush_ttl"), ("cleanup", "grace"), ("persistence", "ttl")],
)
@pytest.mark.parametrize("value", ["soon", "1h30", "2 days"])
def test_an_invalid_duration_anywhere_names_its_field_and_shows_examples(
    tmp_path: Path, section: str, field: str, value: str
) -> None:
    path, error = refusal(tmp_path, BASE + f"{section}:\n  {field}: {value}\n")
    assert str(error) == (
        f"{path}: {section}.{field}: invalid duration {value!r}; write e.g. 30s, 15m, 24h, "
        f"7d or 1h30m"
    )


def test_a_duration_of_the_wrong_type_shows_examples(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, BASE + "locking:\n  flush_ttl: [5]\n")
    assert str(error) == (
        f"{path}: locking.flush_ttl: write a duration such as 30s, 15m, 24h or 7d"
    )


# --- locking ----------------------------------------------------------------------


def test_append_and_clear_ttl_load_and_are_listed_as_warnings(tmp_path: Path) -> None:
    resource = load(tmp_path, BASE + "locking:\n  append_ttl: 30s\n  clear_ttl: 10s\n")
    assert (resource.locking.append_ttl, resource.locking.clear_ttl) == (30.0, 10.0)
    assert resource.warnings == [
        f"locking.append_ttl {NO_EFFECT}",
        f"locking.clear_ttl {NO_EFFECT}",
    ]


def test_flush_ttl_alone_gives_no_warning(tmp_path: Path) -> None:
    resource = load(tmp_path, BASE + "locking:\n  flush_ttl: 2m\n")
    assert resource.locking.flush_ttl == 120
    assert resource.warnings == []


def test_the_registry_logs_the_warning_with_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "locks.yaml", BASE + "locking:\n  append_ttl: 30s\n")
    caplog.set_level(logging.WARNING, logger="memory.registry")
    registry = ResourceRegistry.load([tmp_path])
    assert "rules" in registry
    warnings = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "memory.registry"]
    assert warnings == [(logging.WARNING, f"{path}: locking.append_ttl {NO_EFFECT}")]


# --- cleanup ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "policy", "grace"),
    [
        ("", CleanupPolicy.KEEP, 3600),
        ("cleanup:\n  on_workflow_end: keep\n", CleanupPolicy.KEEP, 3600),
        ("cleanup:\n  on_workflow_end: delete\n", CleanupPolicy.DELETE, 3600),
        ("cleanup:\n  on_workflow_end: expire\n  grace: 2h\n", CleanupPolicy.EXPIRE, 7200),
        ("cleanup:\n  on_workflow_end: expire\n  grace: 45\n", CleanupPolicy.EXPIRE, 45),
    ],
)
def test_cleanup_policies_load_with_their_grace(
    tmp_path: Path, extra: str, policy: CleanupPolicy, grace: int
) -> None:
    resource = load(tmp_path, BASE + extra)
    assert resource.cleanup.on_workflow_end is policy
    assert resource.cleanup.grace == grace


def test_an_unknown_cleanup_policy_lists_the_known_ones(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, BASE + "cleanup:\n  on_workflow_end: purge\n")
    assert str(error) == (
        f"{path}: cleanup.on_workflow_end: Input should be 'keep', 'delete' or 'expire' "
        f"(got 'purge')"
    )


# --- RE2 patterns -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "detail"),
    [
        (r"(a)\1", r"invalid escape sequence: \1"),
        ("secret(?=:)", "invalid perl operator: (?="),
        ("(?<!x)key", "invalid perl operator: (?<!"),
    ],
)
def test_a_redact_pattern_re2_refuses_names_the_field_the_index_and_re2(
    tmp_path: Path, pattern: str, detail: str
) -> None:
    text = BASE + f"privacy_policy:\n  redact_patterns:\n    - 'ok'\n    - '{pattern}'\n"
    path, error = refusal(tmp_path, text)
    assert error.field == "privacy_policy.redact_patterns"
    assert str(error) == (
        f"{path}: privacy_policy.redact_patterns: redact_patterns[1]: pattern {pattern!r} "
        f"is not valid RE2 ({detail}); {RE2_HINT}"
    )


def test_an_empty_redact_pattern_is_refused(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, BASE + "privacy_policy:\n  redact_patterns: ['']\n")
    assert str(error) == (
        f"{path}: privacy_policy.redact_patterns: redact_patterns[0]: an empty pattern would "
        f"match everywhere; remove it"
    )


def test_an_invalid_priority_keyword_pattern_names_the_keyword(tmp_path: Path) -> None:
    text = (
        BASE
        + "priority:\n  keywords:\n    - pattern: 'refund'\n      priority: 80\n"
        + ("    - pattern: '(?<=a)b'\n      priority: 90\n")
    )
    path, error = refusal(tmp_path, text)
    assert str(error) == (
        f"{path}: priority.keywords.1.pattern: pattern '(?<=a)b' is not valid RE2 "
        f"(invalid perl operator: (?<=); {RE2_HINT}"
    )


def test_an_unknown_role_in_priority_is_refused_with_the_roles(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, BASE + "priority:\n  roles:\n    admin: 5\n")
    assert str(error).startswith(f"{path}: priority.roles.admin")
    assert str(error).endswith(
        "Input should be 'system', 'developer', 'user', 'assistant' or 'tool' (got 'admin')"
    )


# --- key templates ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "detail"),
    [
        ("support-{{ workflow.input.id", "unexpected end of template"),
        ("{{ a b }}", "expected token 'end of print statement', got 'b'"),
        ("{% if %}x", "Expected an expression"),
    ],
)
def test_an_invalid_default_key_template_is_refused_at_load(
    tmp_path: Path, template: str, detail: str
) -> None:
    path, error = refusal(tmp_path, BASE + f"default_key_template: '{template}'\n")
    message = str(error)
    assert message.startswith(f"{path}: default_key_template: invalid key template {template!r}: ")
    assert detail in message
    assert message.endswith("write e.g. 'support-{{ workflow.input.conversationId }}'")


def test_an_empty_default_key_template_is_refused(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, BASE + "default_key_template: '  '\n")
    assert str(error) == f"{path}: default_key_template: a key template cannot be empty"


# --- origin files -----------------------------------------------------------------

ORIGIN = """\
resource: memory
id: user-memory
description: Per-user conversation memory
version: 0.1.0
type: token_based
max_tokens: 2000
persistence:
  type: redis
  ttl: 168h
default_key_template: '{{ .workflow.input.user_id }}'
flushing:
  type: simple_fifo
"""


def test_an_origin_style_file_loads_unchanged(tmp_path: Path) -> None:
    resource = load(tmp_path, ORIGIN)
    assert resource.version == "0.1.0"
    assert resource.persistence.type == "redis"
    assert resource.persistence.ttl == 168 * 3600
    assert resource.flushing.type is FlushStrategy.SIMPLE_FIFO
    assert resource.default_key_template == "{{ .workflow.input.user_id }}"
    assert resource.key_template is not None
    context = template_context(workflow_id="wf-1", input={"user_id": "u-7"})
    assert resource.key_template.render(context) == "u-7"
    assert resource.warnings == []


@pytest.mark.parametrize(("written", "version"), [("2", "2"), ("1.5", "1.5"), ('"v3"', "v3")])
def test_a_numeric_version_is_kept_as_text(tmp_path: Path, written: str, version: str) -> None:
    assert load(tmp_path, BASE + f"version: {written}\n").version == version


# --- the resource kind ------------------------------------------------------------


@pytest.mark.parametrize(("kind", "shown"), [("tool", "'tool'"), ("Memory", "'Memory'")])
def test_a_resource_kind_other_than_memory_or_agent_is_refused(
    tmp_path: Path, kind: str, shown: str
) -> None:
    path, error = refusal(tmp_path, f"resource: {kind}\nid: rules\nmax_tokens: 10\n")
    assert error.field == "resource"
    assert str(error) == f"{path}: resource: resource must be 'memory' or 'agent', got {shown}"


def test_a_file_without_a_resource_kind_is_refused(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "id: rules\nmax_tokens: 10\n")
    assert str(error) == f"{path}: resource: resource must be 'memory' or 'agent', got None"


def test_memory_fields_in_an_agent_file_are_unknown_there(tmp_path: Path) -> None:
    path, error = refusal(tmp_path, "resource: agent\nid: bot\nmax_tokens: 10\n")
    assert str(error) == (
        f"{path}: max_tokens: unknown field: remove it (fields here: description, id, "
        f"memories, memory, memory_key, resource)"
    )


# --- the registry -----------------------------------------------------------------

AGENT = """\
resource: agent
id: {id}
memory:
  - id: {memory}
    mode: read-only
"""


def test_an_agent_may_share_its_id_with_a_memory(tmp_path: Path) -> None:
    write(tmp_path, "a-memory.yaml", BASE.replace("rules", "shared"))
    write(tmp_path, "b-agent.yaml", AGENT.format(id="shared", memory="shared"))
    registry = ResourceRegistry.load([tmp_path])
    assert list(registry) == ["shared"]
    agent = registry.agent("shared")
    assert isinstance(agent, AgentResource)
    assert registry.read_only("shared", "shared")


def test_duplicate_agent_ids_are_refused_naming_both_files(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", BASE)
    first = write(tmp_path, "a.yaml", AGENT.format(id="bot", memory="rules"))
    second = write(tmp_path, "b.yaml", AGENT.format(id="bot", memory="rules"))
    with pytest.raises(ResourceError) as info:
        ResourceRegistry.load([tmp_path])
    assert str(info.value) == (
        f"{second}: id: duplicate agent id 'bot', already defined in {first}; give one of "
        f"them another id"
    )


def test_reload_returns_a_new_registry_with_the_changes(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", BASE)
    old = ResourceRegistry.load([tmp_path])
    path.write_text(BASE.replace("max_tokens: 1000", "max_tokens: 2000"), encoding="utf-8")
    write(tmp_path, "s.yaml", BASE.replace("rules", "second"))
    new = old.reload()
    assert new is not old
    assert new.paths == old.paths == [tmp_path]
    assert sorted(new) == ["rules", "second"]
    assert new["rules"].max_tokens == 2000
    assert list(old) == ["rules"]
    assert old["rules"].max_tokens == 1000


def test_reload_of_a_file_that_became_invalid_fails_and_leaves_the_old_registry(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "r.yaml", BASE)
    old = ResourceRegistry.load([tmp_path])
    before = old["rules"]
    path.write_text(BASE + "flushing_strategy: fifo\n", encoding="utf-8")
    with pytest.raises(ResourceError) as info:
        old.reload()
    assert str(info.value) == (
        f"{path}: flushing_strategy: unknown field (from the origin system?): "
        f"did you mean flushing?"
    )
    assert list(old) == ["rules"]
    assert old.get_resource("rules") is before
    assert old.paths == [tmp_path]


def test_a_resource_loads_with_every_section_set(tmp_path: Path) -> None:
    text = """\
resource: memory
id: full
description: everything
version: "3"
type: buffer
model: gpt-4o
max_messages: 100
max_context_ratio: 0.5
token_provider: {provider: openai, model: gpt-4o, api_key_env: OPENAI_API_KEY}
token_allocation: {system: 0.2, short_term: 0.5, long_term: 0.3}
flushing: {type: hybrid_summary, summarize_threshold: 0.9, target: 0.5, summary_tokens: 300,
           summarize_oldest_percent: 0.4}
priority: {roles: {user: 70}, keywords: [{pattern: '(?i)urgent', priority: 99}], protected: 99}
persistence: {type: redis, ttl: 2d}
privacy_policy: {redact_patterns: ['\\d{4}'], non_persistable_message_types: [tool],
                 default_redaction_string: '#'}
locking: {flush_ttl: 1m}
default_key_template: 'full-{{ workflow.id }}'
cleanup: {on_workflow_end: delete}
"""
    resource = load(tmp_path, text)
    assert resource.type is MemoryType.BUFFER
    assert (resource.token_limit, resource.max_messages) == (64_000, 100)
    assert resource.flushing.summary_tokens == 300
    assert resource.priority.protected == 99
    assert resource.persistence.ttl == 2 * 86_400
    assert resource.privacy_policy.redact_text("pin 1234") == "pin #"
    assert resource.locking.flush_ttl == 60
    assert resource.cleanup.on_workflow_end is CleanupPolicy.DELETE
    assert resource.key_template is not None
    assert resource.key_template.render({"workflow": {"id": "w"}}) == "full-w"


def test_a_non_persistable_type_in_the_wrong_case_is_warned_about() -> None:
    resource = MemoryResource(
        id="cased",
        max_tokens=10,
        privacy_policy={"non_persistable_message_types": ["Tool"]},  # type: ignore[arg-type]
    )
    assert any("'Tool' matches no role" in w for w in resource.warnings)
