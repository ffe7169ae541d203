"""Agent memory configuration: the three tiers and the list form, every error naming the
tier rules, agents declared in resource files (modes, read-only), and resolving an
agent's memories to tenant-namespaced references with rendered, sanitized keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from memory import (
    AgentConfigError,
    AgentMemory,
    AgentResource,
    MemoryMode,
    MemoryRef,
    ResourceError,
    ResourceRegistry,
    TemplateKeyError,
    load_resource_file,
    parse_agent_memory,
    resolve_memories,
    sanitize_key,
    template_context,
)
from memory.agents import TIER_RULES

ROOT = Path(__file__).resolve().parents[2]
MEMORIES = ROOT / "memories"
SUPPORT_KEY = "support-{{ workflow.input.conversationId }}"
RW, RO = MemoryMode.READ_WRITE, MemoryMode.READ_ONLY


@pytest.fixture(scope="module")
def registry() -> ResourceRegistry:
    return ResourceRegistry.load([MEMORIES])


def refused(config: dict[str, Any]) -> str:
    with pytest.raises(AgentConfigError) as info:
        parse_agent_memory(config)
    return str(info.value)


# --- the tiers --------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, {"memory": False}, {"memory": None}, {"other": 1}])
def test_no_memory_or_memory_false_means_no_memories(config: dict[str, Any]) -> None:
    assert parse_agent_memory(config) == []


def test_tier_1_is_one_memory_under_memory_key() -> None:
    config = {"memory": "customer-support", "memory_key": SUPPORT_KEY}
    assert parse_agent_memory(config) == [
        AgentMemory(id="customer-support", mode=RW, key=SUPPORT_KEY)
    ]


def test_tier_2_shares_memory_key_between_its_ids() -> None:
    config = {"memory": True, "memories": ["customer-support", "user-preferences"],
              "memory_key": "conv-{{ workflow.id }}"}  # fmt: skip
    assert parse_agent_memory(config) == [
        AgentMemory(id="customer-support", mode=RW, key="conv-{{ workflow.id }}"),
        AgentMemory(id="user-preferences", mode=RW, key="conv-{{ workflow.id }}"),
    ]


def test_tier_3_gives_each_memory_its_mode_and_key() -> None:
    config = {
        "memories": [
            {"id": "customer-support", "key": SUPPORT_KEY},
            {"id": "user-preferences", "mode": "read-only", "key": "prefs-{{ input.userId }}"},
        ]
    }
    assert parse_agent_memory(config) == [
        AgentMemory(id="customer-support", mode=RW, key=SUPPORT_KEY),
        AgentMemory(id="user-preferences", mode=RO, key="prefs-{{ input.userId }}"),
    ]


def test_the_list_form_takes_ids_and_items_whose_key_may_be_left_out() -> None:
    config = {
        "memory": [
            "customer-support",
            {"id": "user-preferences", "mode": "read-only"},
            {"id": "patient-intake", "key": "intake-{{ .workflow.id }}"},
        ]
    }
    assert parse_agent_memory(config) == [
        AgentMemory(id="customer-support", mode=RW, key=None),
        AgentMemory(id="user-preferences", mode=RO, key=None),
        AgentMemory(id="patient-intake", mode=RW, key="intake-{{ .workflow.id }}"),
    ]


# --- errors about the shape: each names the tier rules ----------------------------


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"memory": "customer-support"},
         "tier 1 ('memory: customer-support') needs 'memory_key'"),
        ({"memory": "customer-support", "memory_key": ""},
         "tier 1 ('memory: customer-support') needs 'memory_key'"),
        ({"memory": "customer-support", "memory_key": "k", "memories": ["user-preferences"]},
         "tier 1 ('memory: customer-support') cannot have 'memories'"),
        ({"memory": True, "memories": ["customer-support"]},
         "tier 2 ('memory: true') needs 'memory_key'"),
        ({"memory": True, "memory_key": "k"},
         "tier 2 ('memory: true') needs 'memories: [ids]'"),
        ({"memory": True, "memories": [], "memory_key": "k"},
         "tier 2 ('memory: true') needs 'memories: [ids]'"),
        ({"memory": True, "memories": [{"id": "a", "key": "k"}], "memory_key": "k"},
         "tier 2 ('memory: true') lists ids only"),
        ({"memories": ["customer-support", "user-preferences"]},
         "a list of ids in 'memories' is tier 2: add 'memory: true' and 'memory_key'"),
        ({"memories": ["customer-support"], "memory_key": "k"},
         "a list of ids in 'memories' is tier 2: add 'memory: true' and 'memory_key'"),
        ({"memory": False, "memories": ["customer-support"]},
         "'memory: false' with 'memories' is contradictory"),
        ({"memory": False, "memories": [{"id": "a", "key": "k"}]},
         "'memory: false' with 'memories' is contradictory"),
        ({"memory": 3}, "memory: 3 is not a memory configuration"),
        ({"memory": 1.5}, "memory: 1.5 is not a memory configuration"),
        ({"memory": {"id": "a"}}, "memory: {'id': 'a'} is not a memory configuration"),
        ({"memory": ["a"], "memory_key": "k"},
         "the list form 'memory: [...]' takes no 'memories' or 'memory_key'"),
        ({"memory": ["a"], "memories": ["b"]},
         "the list form 'memory: [...]' takes no 'memories' or 'memory_key'"),
        ({"memory": []}, "'memory: []' lists no memory; use 'memory: false'"),
        ({"memories": []}, "memories must be a non-empty list"),
        ({"memories": "customer-support"}, "memories must be a non-empty list"),
        ({"memory_key": "k"}, "memory_key without a memory"),
        ({"memory": "a", "memory_key": 5}, "memory_key must be a key template string"),
        ({"memories": [{"id": "a", "key": "k"}], "memory_key": "k"},
         "tier 3 gives each memory its own key: remove memory_key"),
    ],
)  # fmt: skip
def test_a_configuration_outside_the_tiers_is_refused_naming_the_tier_rules(
    config: dict[str, Any], problem: str
) -> None:
    assert refused(config) == f"{problem}; {TIER_RULES}"


def test_the_tier_rules_describe_every_tier() -> None:
    for part in (
        "tier 1 'memory: <id>' with 'memory_key'",
        "tier 2 'memory: true' with 'memories: [ids]' and 'memory_key'",
        "tier 3 'memories: [{id, mode, key}]'",
        "'memory: [{id, mode, key}]' / 'memory: [ids]'",
        "'memory: false' for none",
    ):
        assert part in TIER_RULES


# --- errors about one item --------------------------------------------------------

ITEM_ERRORS = [
    pytest.param(
        {"memories": [{"id": "customer-support"}]},
        ["memories[0]: tier 3 needs a key for memory 'customer-support'"],
        id="tier-3-item-without-key",
    ),
    pytest.param(
        {"memories": [{"id": "a", "key": "k"}, {"id": "b", "key": ""}]},
        ["memories[1]: tier 3 needs a key for memory 'b'"],
        id="tier-3-item-with-empty-key",
    ),
    pytest.param(
        {"memories": [{"id": "a", "key": "k", "mode": "write"}]},
        ["memories[0].mode: Input should be 'read-write' or 'read-only'"],
        id="invalid-mode",
    ),
    pytest.param(
        {"memory": [{"id": "a", "mode": "readonly"}]},
        ["memory[0].mode: Input should be 'read-write' or 'read-only'"],
        id="invalid-mode-list-form",
    ),
    pytest.param(
        {"memory": "a", "memory_key": "support-{{ workflow.id"},
        ["memory", "invalid key template 'support-{{ workflow.id'"],
        id="invalid-template-tier-1",
    ),
    pytest.param(
        {"memories": [{"id": "a", "key": "{% if %}"}]},
        ["memories[0]", "invalid key template '{% if %}'"],
        id="invalid-template-tier-3",
    ),
    pytest.param(
        {"memory": ["a", "a"]},
        ["memory 'a' is listed twice; list each memory once"],
        id="duplicate-list-form",
    ),
    pytest.param(
        {"memories": [{"id": "a", "key": "k"}, {"id": "a", "key": "j", "mode": "read-only"}]},
        ["memory 'a' is listed twice; list each memory once"],
        id="duplicate-tier-3",
    ),
    pytest.param(
        {"memory": True, "memories": ["a", "b", "a"], "memory_key": "k"},
        ["memory 'a' is listed twice; list each memory once"],
        id="duplicate-tier-2",
    ),
    pytest.param(
        {"memory": "Customer Support", "memory_key": "k"},
        ["memory", "invalid resource id 'Customer Support'", "lower-case"],
        id="invalid-id",
    ),
    pytest.param(
        {"memory": [3]},
        ["memory[0]: expected an id or {id, mode, key}, got 3"],
        id="item-of-wrong-type",
    ),
    pytest.param(
        {"memory": [{"id": "a", "colour": "red"}]},
        ["memory[0].colour: Extra inputs are not permitted"],
        id="unknown-item-field",
    ),
]


@pytest.mark.parametrize(("config", "parts"), ITEM_ERRORS)
def test_an_item_error_names_the_item_and_what_is_wrong(
    config: dict[str, Any], parts: list[str]
) -> None:
    message = refused(config)
    for part in parts:
        assert part in message


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(p.values[0], id=p.id)
        for p in ITEM_ERRORS
        if p.id in {"tier-3-item-without-key", "invalid-mode", "invalid-template-tier-3",
                    "duplicate-tier-3"}
    ],
)  # fmt: skip
def test_an_item_error_names_the_tier_rules_too(config: dict[str, Any]) -> None:
    """parse_agent_memory promises "AgentConfigError naming the tier rules" for every
    configuration it refuses, item errors included."""
    assert refused(config).endswith(f"; {TIER_RULES}")


def test_a_bare_id_among_tier_3_items_is_refused_for_its_missing_key() -> None:
    """Tier 3 items need a key; a bare id in the list must not slip through without one
    (only the list form ``memory: [...]`` falls back to default_key_template)."""
    config = {"memories": [{"id": "customer-support", "key": SUPPORT_KEY}, "user-preferences"]}
    message = refused(config)
    assert "memories[1]" in message
    assert "tier 3 needs a key for memory 'user-preferences'" in message


# --- agents declared in resource files ---------------------------------------------


def test_a_tier_3_agent_file_loads_with_its_modes() -> None:
    agent = load_resource_file(MEMORIES / "support-agent.yaml")
    assert isinstance(agent, AgentResource)
    assert agent.id == "support-agent"
    assert [(m.id, m.mode) for m in agent.references] == [
        ("customer-support", RW),
        ("user-preferences", RO),
    ]
    assert agent.mode_for("customer-support") is RW
    assert agent.mode_for("user-preferences") is RO
    assert agent.mode_for("patient-intake") is None


def test_a_list_form_agent_file_loads_read_only() -> None:
    agent = load_resource_file(MEMORIES / "quality-reviewer.yaml")
    assert isinstance(agent, AgentResource)
    assert agent.references == [AgentMemory(id="customer-support", mode=RO, key=None)]
    assert agent.mode_for("customer-support") is RO


@pytest.mark.parametrize(
    ("agent", "resource", "read_only"),
    [
        ("quality-reviewer", "customer-support", True),
        ("support-agent", "user-preferences", True),
        ("support-agent", "customer-support", False),
        ("support-agent", "patient-intake", False),
        ("no-such-agent", "customer-support", False),
        (None, "customer-support", False),
        ("", "customer-support", False),
    ],
)
def test_the_registry_knows_which_agent_may_only_read_a_memory(
    registry: ResourceRegistry, agent: str | None, resource: str, read_only: bool
) -> None:
    assert registry.read_only(agent, resource) is read_only


def test_the_registry_keeps_agents_apart_from_memories(registry: ResourceRegistry) -> None:
    assert sorted(a.id for a in registry.agents) == ["quality-reviewer", "support-agent"]
    assert "support-agent" not in registry
    assert registry.agent("customer-support") is None


def test_an_agent_file_breaking_the_tier_rules_is_refused_with_file_and_rules(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("resource: agent\nid: bot\nmemory: customer-support\n", encoding="utf-8")
    with pytest.raises(ResourceError) as info:
        load_resource_file(path)
    assert str(info.value) == (
        f"{path}: (top level): tier 1 ('memory: customer-support') needs 'memory_key'; {TIER_RULES}"
    )


def test_a_misspelt_agent_field_gets_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "resource: agent\nid: bot\nmemory: customer-support\nmemory_keys: k\n", encoding="utf-8"
    )
    with pytest.raises(ResourceError) as info:
        load_resource_file(path)
    assert str(info.value) == f"{path}: memory_keys: unknown field: did you mean memory_key?"


def test_an_agent_naming_a_memory_no_file_defines_is_refused_at_load(tmp_path: Path) -> None:
    """Ids must exist in the registry: a misspelt id would otherwise leave the intended
    memory writable by an agent declared read-only."""
    (tmp_path / "memory.yaml").write_text(
        "resource: memory\nid: customer-support\nmax_tokens: 100\n", encoding="utf-8"
    )
    agent = tmp_path / "reviewer.yaml"
    agent.write_text(
        "resource: agent\nid: reviewer\nmemory:\n  - id: customer-suport\n    mode: read-only\n",
        encoding="utf-8",
    )
    with pytest.raises(ResourceError) as info:
        ResourceRegistry.load([tmp_path])
    message = str(info.value)
    assert message.startswith(f"{agent}: ")
    assert "'customer-suport'" in message
    assert "customer-support" in message.replace("'customer-suport'", "")


# --- resolving memories ------------------------------------------------------------


def context(**input: Any) -> dict[str, Any]:
    return template_context(workflow_id="wf-1", exec_id="ex-1", input=input, agent="bot")


def test_a_memory_resolves_to_a_tenant_namespaced_reference(registry: ResourceRegistry) -> None:
    memories = parse_agent_memory({"memory": "customer-support", "memory_key": SUPPORT_KEY})
    [resolved] = resolve_memories(
        memories, registry, tenant="acme", context=context(conversationId="c-42")
    )
    assert resolved.ref == MemoryRef("acme", "customer-support", "support-c-42")
    assert resolved.ref.memory_id == "acme/customer-support/support-c-42"
    assert resolved.mode is RW and resolved.writable
    assert resolved.resource is registry["customer-support"]


def test_a_rendered_key_is_sanitized_and_stays_under_the_tenant(
    registry: ResourceRegistry,
) -> None:
    memories = parse_agent_memory({"memory": "customer-support", "memory_key": SUPPORT_KEY})
    hostile = "../../other-tenant/customer-support/x:*{y}\n"
    [resolved] = resolve_memories(
        memories, registry, tenant="acme", context=context(conversationId=hostile)
    )
    assert resolved.ref.key == sanitize_key("support-" + hostile)
    assert resolved.ref.key != "support-" + hostile
    assert resolved.ref.memory_id.split("/") == ["acme", "customer-support", resolved.ref.key]


def test_go_style_keys_and_every_context_part_render(registry: ResourceRegistry) -> None:
    key = "{{ .agent }}-{{ .workflow.id }}-{{ .workflow.exec_id }}-{{ .input.n }}"
    memories = parse_agent_memory({"memory": "customer-support", "memory_key": key})
    [resolved] = resolve_memories(memories, registry, tenant="acme", context=context(n=7))
    assert resolved.ref.key == "bot-wf-1-ex-1-7"


def test_an_item_without_a_key_falls_back_to_the_default_key_template(
    registry: ResourceRegistry,
) -> None:
    memories = parse_agent_memory(
        {"memory": [{"id": "user-preferences", "mode": "read-only"}, "customer-support"]}
    )
    resolved = resolve_memories(
        memories, registry, tenant="acme", context=context(userId="u-9", conversationId="c-1")
    )
    assert [(r.ref.memory_id, r.mode, r.writable) for r in resolved] == [
        ("acme/user-preferences/prefs-u-9", RO, False),
        ("acme/customer-support/support-c-1", RW, True),
    ]


def test_an_item_key_wins_over_the_default_key_template(registry: ResourceRegistry) -> None:
    memories = parse_agent_memory({"memory": [{"id": "user-preferences", "key": "mine"}]})
    [resolved] = resolve_memories(memories, registry, tenant="acme", context=context())
    assert resolved.ref.key == "mine"


def test_the_same_key_under_two_tenants_names_two_memories(registry: ResourceRegistry) -> None:
    memories = parse_agent_memory({"memory": "customer-support", "memory_key": SUPPORT_KEY})
    ids = {
        resolve_memories(memories, registry, tenant=t, context=context(conversationId="c"))[
            0
        ].ref.memory_id
        for t in ("acme", "globex")
    }
    assert ids == {"acme/customer-support/support-c", "globex/customer-support/support-c"}


def test_an_unknown_resource_id_is_an_error_listing_the_known_ones(
    registry: ResourceRegistry,
) -> None:
    memories = parse_agent_memory({"memory": "billing", "memory_key": "k"})
    with pytest.raises(AgentConfigError) as info:
        resolve_memories(memories, registry, tenant="acme", context=context())
    assert str(info.value) == (
        "memory 'billing' names no loaded resource (known: customer-support, "
        "patient-intake, user-preferences)"
    )


def test_an_unknown_resource_id_with_nothing_loaded_says_so() -> None:
    memories = parse_agent_memory({"memory": "billing", "memory_key": "k"})
    with pytest.raises(AgentConfigError, match=r"\(known: none loaded\)"):
        resolve_memories(memories, {}, tenant="acme", context=context())


def test_no_key_and_no_default_key_template_is_an_error_saying_how_to_fix(
    registry: ResourceRegistry,
) -> None:
    assert registry["patient-intake"].default_key_template is None
    memories = parse_agent_memory({"memory": ["patient-intake"]})
    with pytest.raises(AgentConfigError) as info:
        resolve_memories(memories, registry, tenant="acme", context=context())
    assert str(info.value) == (
        "memory 'patient-intake' has no key: give it a key, or set default_key_template "
        "in the patient-intake resource"
    )


def test_a_missing_template_variable_is_an_error_naming_it_never_an_empty_key(
    registry: ResourceRegistry,
) -> None:
    memories = parse_agent_memory({"memory": ["user-preferences"]})
    with pytest.raises(TemplateKeyError) as info:
        resolve_memories(memories, registry, tenant="acme", context=context(conversationId="c"))
    message = str(info.value)
    assert "'userId'" in message
    assert "prefs-{{ workflow.input.userId }}" in message
    assert info.value.template == "prefs-{{ workflow.input.userId }}"


def test_a_missing_top_level_variable_is_an_error_naming_it(registry: ResourceRegistry) -> None:
    memories = parse_agent_memory({"memory": "customer-support", "memory_key": "{{ project }}"})
    with pytest.raises(TemplateKeyError, match="'project' is undefined"):
        resolve_memories(memories, registry, tenant="acme", context=context())


def test_an_invalid_tenant_is_refused(registry: ResourceRegistry) -> None:
    memories = parse_agent_memory({"memory": "customer-support", "memory_key": "k"})
    with pytest.raises(ValueError, match="invalid tenant 'ac/me'"):
        resolve_memories(memories, registry, tenant="ac/me", context=context())
