"""docs/configuration.md is generated from the models: it must equal what they say."""

from __future__ import annotations

from processors.docgen import DOC, configuration_markdown
from processors.settings import Settings


def test_the_configuration_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == configuration_markdown(), (
        "docs/configuration.md is stale: run `make docs`"
    )


def test_every_setting_and_resource_field_is_described() -> None:
    text = configuration_markdown()
    for name in Settings.model_fields:
        variable = "REDIS_URL" if name == "redis_url" else f"MEMSTREAM_{name.upper()}"
        assert f"| `{variable}` |" in text
    for line in text.splitlines():
        if line.startswith("| `") and not line.startswith(("| `description`", "| `version`")):
            assert not line.rstrip().endswith("|  |"), f"no description: {line}"
