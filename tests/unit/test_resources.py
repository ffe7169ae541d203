"""Memory resource files: the shipped ones load, and every loading error names the file,
the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from memory import (
    AgentResource,
    MemoryResource,
    MemoryType,
    ResourceError,
    ResourceRegistry,
    UnknownResourceError,
    load_resource_file,
)

ROOT = Path(__file__).resolve().parents[2]
MEMORIES = ROOT / "memories"

VALID = """\
resource: memory
id: {id}
type: token_based
max_tokens: 1000
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        load_resource_file(path)
    return info.value


def test_the_shipped_customer_support_resource_loads() -> None:
    registry = ResourceRegistry.load([MEMORIES])
    assert "customer-support" in registry
    resource = registry.get_resource("customer-support")
    assert resource.type is MemoryType.TOKEN_BASED
    assert resource.max_tokens == 4000
    assert resource.model == "gpt-4o-mini"
    assert resource.persistence.ttl == 24 * 3600
    assert resource.ttl_ms == 24 * 3600 * 1000
    assert resource.default_key_template == "support-{{ workflow.input.conversationId }}"


def test_every_shipped_resource_file_loads_on_its_own() -> None:
    files = sorted([*MEMORIES.glob("*.yaml"), *MEMORIES.glob("*.yml")])
    assert files
    items = [load_resource_file(f) for f in files]
    registry = ResourceRegistry.load([MEMORIES])
    memories = {i.id for i in items if isinstance(i, MemoryResource)}
    agents = {i.id for i in items if isinstance(i, AgentResource)}
    assert set(registry) == memories and {a.id for a in registry.agents} == agents
    assert len(memories) + len(agents) == len(files)
    assert {"customer-support", "user-preferences", "patient-intake"} <= memories


def test_the_shipped_files_satisfy_the_json_schema_given_to_editors() -> None:
    """``memstream schema resource`` is the schema editors check these files with: the
    files that load must not be flagged (e.g. ``ttl: 24h``)."""
    schemas = {
        "memory": jsonschema.Draft202012Validator(MemoryResource.model_json_schema()),
        "agent": jsonschema.Draft202012Validator(AgentResource.model_json_schema()),
    }
    for path in sorted(MEMORIES.glob("*.y*ml")):
        data = yaml.safe_load(path.read_text("utf-8"))
        validator = schemas[data["resource"]]
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(data)]
        assert not errors, f"{path.name}: {errors}"


def test_the_json_schema_refuses_what_loading_refuses() -> None:
    validator = jsonschema.Draft202012Validator(MemoryResource.model_json_schema())
    assert not validator.is_valid({"id": "x", "max_tokens": 5, "colour": "red"})
    assert not validator.is_valid({"id": "x", "max_tokens": 0})
    assert validator.is_valid({"id": "x", "max_tokens": 5, "persistence": {"ttl": 3600}})


def test_a_folder_loads_yaml_and_yml_files_and_single_files_load_too(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", VALID.format(id="alpha"))
    write(tmp_path, "b.yml", VALID.format(id="beta"))
    write(tmp_path, "notes.txt", "not a resource")
    assert sorted(ResourceRegistry.load([tmp_path])) == ["alpha", "beta"]
    assert list(ResourceRegistry.load([tmp_path / "b.yml"])) == ["beta"]


def test_an_unknown_field_is_named_with_the_fix_to_remove_it(tmp_path: Path) -> None:
    path = write(tmp_path, "typo.yaml", VALID.format(id="typo") + "max_token: 5\n")
    error = load_error(path)
    assert error.path == str(path)
    assert error.field == "max_token"
    assert str(error) == f"{path}: max_token: unknown field: did you mean max_tokens?"


def test_an_unknown_nested_field_is_named_by_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "nested.yaml", VALID.format(id="nested") + "persistence:\n  tll: 24h\n")
    error = load_error(path)
    assert error.field == "persistence.tll"
    assert "unknown field: did you mean ttl?" in str(error)


@pytest.mark.parametrize("ttl", ["1 fortnight", "24 hours", "-5s", "h"])
def test_a_bad_ttl_duration_names_the_field_and_shows_valid_durations(
    tmp_path: Path, ttl: str
) -> None:
    path = write(
        tmp_path, "ttl.yaml", VALID.format(id="ttl") + f"persistence:\n  ttl: {json.dumps(ttl)}\n"
    )
    error = load_error(path)
    assert error.field == "persistence.ttl"
    message = str(error)
    assert message.startswith(f"{path}: persistence.ttl: ")
    assert "24h" in message


def test_a_ttl_under_a_second_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "ttl.yaml", VALID.format(id="ttl") + "persistence:\n  ttl: 500ms\n")
    error = load_error(path)
    assert error.field == "persistence.ttl"
    assert "between 1s and 3650d" in str(error)


def test_a_ttl_as_a_number_is_seconds(tmp_path: Path) -> None:
    path = write(tmp_path, "ttl.yaml", VALID.format(id="ttl") + "persistence:\n  ttl: 90\n")
    assert load_resource_file(path).persistence.ttl == 90


def test_token_based_without_max_tokens_says_what_is_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "budget.yaml", "resource: memory\nid: budget\ntype: token_based\n")
    error = load_error(path)
    message = str(error)
    assert message.startswith(f"{path}: ")
    assert "a token_based memory needs max_tokens" in message


@pytest.mark.parametrize(
    ("extra", "needs"),
    [
        ("type: message_count_based\n", "needs max_messages"),
        ("type: buffer\nmax_tokens: 10\n", "needs both a token limit"),
    ],
)
def test_other_budget_types_say_what_is_missing(tmp_path: Path, extra: str, needs: str) -> None:
    path = write(tmp_path, "budget.yaml", "resource: memory\nid: budget\n" + extra)
    assert needs in str(load_error(path))


def test_an_invalid_id_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "id.yaml", VALID.format(id="Customer Support"))
    error = load_error(path)
    assert error.field == "id"
    assert "lower-case" in str(error)


def test_every_error_is_reported_on_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, "many.yaml", VALID.format(id="many") + "colour: red\nsize: 3\n")
    lines = str(load_error(path)).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["colour", "size"]
    assert all(line.startswith(f"{path}: ") and "unknown field" in line for line in lines)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_a_file_that_is_not_a_mapping_says_what_is_expected(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "list.yaml", text)
    error = load_error(path)
    assert str(error).startswith(f"{path}: ")
    assert "expected a mapping" in str(error)
    assert "'resource: memory' and 'id'" in str(error)


def test_invalid_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "resource: memory\nid: [unclosed\n")
    error = load_error(path)
    assert str(error).startswith(f"{path}: not valid YAML")
    assert "line" in str(error)


def test_duplicate_ids_are_refused_naming_both_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", VALID.format(id="dup"))
    second = write(tmp_path, "b.yaml", VALID.format(id="dup"))
    with pytest.raises(ResourceError) as info:
        ResourceRegistry.load([tmp_path])
    message = str(info.value)
    assert str(first) in message
    assert str(second) in message
    assert info.value.field == "id"
    assert "give one of them another id" in message


def test_duplicate_ids_across_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    write(tmp_path / "one", "x.yaml", VALID.format(id="same"))
    write(tmp_path / "two", "y.yaml", VALID.format(id="same"))
    with pytest.raises(ResourceError, match="duplicate resource id 'same'"):
        ResourceRegistry.load([tmp_path / "one", tmp_path / "two"])


def test_a_missing_path_is_named_with_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ResourceError) as info:
        ResourceRegistry.load([missing])
    assert (
        str(info.value)
        == f"{missing}: no such file or folder; pass an existing path to --resources"
    )


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    error = load_error(folder)
    assert str(error).startswith(f"{folder}: cannot read the file")


def test_an_unknown_resource_lists_the_known_ones_and_the_fix() -> None:
    registry = ResourceRegistry.load([MEMORIES])
    with pytest.raises(UnknownResourceError) as info:
        registry.get_resource("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert "customer-support" in message
    assert "MEMSTREAM_RESOURCES" in message
    assert registry.find("nope") is None


def test_resources_added_in_code_refuse_duplicates_too() -> None:
    resource = MemoryResource(id="inline", max_tokens=10)
    registry = ResourceRegistry([resource])
    with pytest.raises(ResourceError, match=r"already defined in \(code\)"):
        registry.add(resource, origin="file.yaml")
