"""Dependencies run one way (DESIGN.md, Layout): the domain package ``memory`` imports
none of ``events``, ``store``, ``processors`` and does no network or process I/O;
``events`` and ``store`` never import ``processors``. Checked on the source's AST, so an
import hidden under ``TYPE_CHECKING``, inside a function or relative counts too."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("memory", "events", "store", "processors")

#: package -> top-level modules it must never import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "memory": frozenset({"events", "store", "processors", "redis", "socket", "asyncio",
                         "subprocess"}),
    "events": frozenset({"processors"}),
    "store": frozenset({"processors"}),
    "processors": frozenset(),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # absolute dotted name
    line: int


def imports_of(source: str, path: Path, root: Path = ROOT) -> list[Import]:
    """Every module a source file imports, relative imports resolved, dynamic imports
    by a constant name (``importlib.import_module("x")``, ``__import__("x")``) included."""
    package = list(path.relative_to(root).parent.parts)  # a module's own package
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append(Import(module, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            found.append(Import(node.args[0].value, node.lineno))
    return found


def violations(path: Path, source: str | None = None, root: Path = ROOT) -> list[str]:
    """The wrong arrows of one module, as ``file:line imports module``."""
    package = path.relative_to(root).parts[0]
    forbidden = FORBIDDEN[package]
    text = path.read_text("utf-8") if source is None else source
    return [
        f"{path.relative_to(root)}:{imp.line} imports {imp.module}"
        for imp in imports_of(text, path, root)
        if imp.module.split(".")[0] in forbidden
    ]


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_against_the_dependency_arrows(package: str) -> None:
    files = modules(package)
    assert files, f"no modules found in {package}/"
    wrong = [v for f in files for v in violations(f)]
    assert not wrong, "wrong dependency arrows:\n" + "\n".join(wrong)


def test_every_package_is_walked() -> None:
    walked = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in modules(pkg)}
    for expected in ("memory/ref.py", "events/codec.py", "store/keys.py", "processors/cli.py"):
        assert expected in walked


def test_the_events_package_really_depends_on_memory_and_store() -> None:
    """The walker sees real imports (so the arrows test is not vacuous)."""
    seen = {
        imp.module.split(".")[0]
        for f in modules("events")
        for imp in imports_of(f.read_text("utf-8"), f)
    }
    assert {"memory", "store", "pydantic"} <= seen


@pytest.mark.parametrize(
    ("path", "source", "offender"),
    [
        ("memory/x.py", "import processors.cli\n", "processors.cli"),
        ("memory/x.py", "from events import decode\n", "events"),
        ("memory/x.py", "from redis.asyncio import Redis\n", "redis.asyncio"),
        ("memory/x.py", "import asyncio, json\n", "asyncio"),
        ("memory/x.py", "def f():\n    import subprocess\n", "subprocess"),
        ("memory/x.py", "import socket as s\n", "socket"),
        (
            "memory/x.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from store import Keys\n",
            "store",
        ),
        ("memory/x.py", "import importlib\nimportlib.import_module('store.keys')\n", "store.keys"),
        ("events/x.py", "from ..processors import app\n", "processors"),
        ("events/x.py", "from processors.settings import Settings\n", "processors.settings"),
        ("store/sub/x.py", "from ...processors import cli\n", "processors"),
        ("store/x.py", "__import__('processors')\n", "processors"),
    ],
)
def test_the_checker_catches_a_wrong_arrow(path: str, source: str, offender: str) -> None:
    found = violations(ROOT / path, source)
    assert found
    assert found[0].endswith(f"imports {offender}")


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("memory/x.py", "from memory.ref import sanitize_key\nimport re, zlib, json\n"),
        ("memory/x.py", "from . import ref\nfrom .duration import parse_duration\n"),
        ("events/x.py", "from store import Keys\nfrom memory import MemoryRef\n"),
        ("store/x.py", "import redis\nimport asyncio\n"),
        ("processors/x.py", "from events import Publisher\nimport subprocess\n"),
    ],
)
def test_the_checker_allows_the_right_arrows(path: str, source: str) -> None:
    assert violations(ROOT / path, source) == []


def test_relative_imports_resolve_against_the_package() -> None:
    found = imports_of("from . import keys\nfrom .lua import x\n", ROOT / "store" / "__init__.py")
    assert [i.module for i in found] == ["store", "store.lua"]
    found = imports_of("from ..memory import ref\n", ROOT / "events" / "codec.py")
    assert [i.module for i in found] == ["memory"]
