"""The configuration reference (``docs/configuration.md``), generated from the models so
it cannot drift from them: ``make docs`` writes it, a test compares it with the models.

Run ``python -m processors.docgen`` to print it, ``--write`` to write the file.
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from memory import AgentResource, MemoryResource
from processors.settings import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (list, tuple, set):
        args = typing.get_args(annotation)
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        key, value = typing.get_args(annotation) or (str, Any)
        return f"mapping of {_type(key)} to {_type(value)}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is None:
            return "required"
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(the defaults of its fields)"
        if isinstance(value, dict):
            value = {getattr(k, "value", k): v for k, v in value.items()}
        return f"`{json.dumps(value)}`"
    value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "empty"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _nested(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field holds, and how a path goes into it ('.' or '[].')."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate, "."
        if typing.get_origin(candidate) is list:
            inner = _nested(typing.get_args(candidate)[0])
            if inner is not None:
                return inner[0], "[]."
    return None


def _model_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        nested = _nested(field.annotation)
        if nested is not None:
            rows.extend(_model_rows(nested[0], f"{path}{nested[1]}"))
            continue
        rows.append(
            f"| `{path}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
            f"{_cell(field.description or '')} |"
        )
    return rows


def _settings_rows() -> list[str]:
    rows = []
    for name, field in Settings.model_fields.items():
        variable = "REDIS_URL" if name == "redis_url" else f"MEMSTREAM_{name.upper()}"
        rows.append(
            f"| `{variable}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
            f"{_cell(field.description or '')} |"
        )
    return rows


def configuration_markdown() -> str:
    header = "| name | type | default | description |\n| --- | --- | --- | --- |"
    parts = [
        "# Configuration reference",
        "",
        "Generated from the models (`make docs`); a test fails when it differs from them.",
        "Durations take seconds or strings such as `30s`, `15m`, `24h`, `7d`.",
        "",
        "## Processes: environment variables",
        "",
        "Every `memstream` command reads them (flags of `memstream run` override some).",
        "A misspelt `MEMSTREAM_*` variable is an error.",
        "",
        header,
        *_settings_rows(),
        "",
        "## Memory resources (`resource: memory` files)",
        "",
        "See [resources.md](resources.md) for what each part does.",
        "",
        header,
        *_model_rows(MemoryResource),
        "",
        "## Agents (`resource: agent` files)",
        "",
        "An agent declares its memories in one of three tiers (see",
        "[resources.md](resources.md)): `memory: <id>` with `memory_key`; `memory: true`",
        "with `memories: [ids]` and a shared `memory_key`; or `memories: [{id, mode:",
        "read-write | read-only, key}]`.",
        "",
        header,
        *_model_rows(AgentResource),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    text = configuration_markdown()
    if "--write" in argv:
        DOC.write_text(text, encoding="utf-8")
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
