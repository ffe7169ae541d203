"""Memory key templates: Jinja2 in a sandbox with strict undefined variables.

``support-{{ workflow.input.conversationId }}`` renders with a context of ``workflow``
(id, exec_id, status, input, output), ``input``, ``output``, ``project`` and ``agent``.
The Go-template style of the origin system (``{{ .workflow.input.id }}``) is accepted:
a leading dot in an expression is dropped. A missing variable is an error, never an
empty string; values are inserted as text and never rendered again, so template
syntax inside a variable stays inert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from memory.errors import DomainError

_GO_DOT = re.compile(r"(\{\{-?\s*)\.(?=[A-Za-z_])")
_GO_PIPE_DOT = re.compile(r"(\|\s*)\.(?=[A-Za-z_])")
MAX_TEMPLATE_LENGTH = 1024


class TemplateKeyError(DomainError, ValueError):
    """A key template that does not compile, or does not render in a context."""

    def __init__(self, message: str, *, template: str) -> None:
        super().__init__(message)
        self.template = template


def _not_none(value: Any) -> Any:
    """A null variable must not render as the text "None": every null id would then share
    one memory."""
    if value is None:
        raise ValueError("a variable of the key is null (None); give it a value")
    return value


#: Immutable: a template cannot call list.append, dict.pop, ... on the context it renders in.
_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, finalize=_not_none
)


def _from_go_style(source: str) -> str:
    return _GO_PIPE_DOT.sub(r"\1", _GO_DOT.sub(r"\1", source))


class KeyTemplate:
    """A compiled key template."""

    def __init__(self, source: str) -> None:
        if not source.strip():
            raise TemplateKeyError("a key template cannot be empty", template=source)
        if len(source) > MAX_TEMPLATE_LENGTH:
            raise TemplateKeyError(
                f"a key template is at most {MAX_TEMPLATE_LENGTH} characters", template=source
            )
        self.source = source
        try:
            self._template = _ENV.from_string(_from_go_style(source))
        except TemplateError as e:
            raise TemplateKeyError(
                f"invalid key template {source!r}: {e}; write e.g. "
                f"'support-{{{{ workflow.input.conversationId }}}}'",
                template=source,
            ) from e

    def render(self, context: Mapping[str, Any]) -> str:
        """The rendered (not yet sanitized) key."""
        try:
            rendered = self._template.render(**context)
        except UndefinedError as e:
            known = ", ".join(sorted(context)) or "nothing"
            raise TemplateKeyError(
                f"key template {self.source!r}: {e.message}; the context has {known}",
                template=self.source,
            ) from e
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as e:
            # OverflowError (the sandbox's range cap), ZeroDivisionError, TypeError, ...
            raise TemplateKeyError(
                f"key template {self.source!r} failed to render: {e}", template=self.source
            ) from e
        if not rendered.strip():
            raise TemplateKeyError(
                f"key template {self.source!r} rendered an empty key", template=self.source
            )
        return rendered

    def __repr__(self) -> str:
        return f"KeyTemplate({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyTemplate) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


def template_context(
    *,
    workflow_id: str | None = None,
    exec_id: str | None = None,
    status: str | None = None,
    input: Mapping[str, Any] | None = None,
    output: Mapping[str, Any] | None = None,
    project: str | None = None,
    agent: str | None = None,
) -> dict[str, Any]:
    """The context key templates render with; only what is known is defined."""
    context: dict[str, Any] = {}
    workflow: dict[str, Any] = {}
    for name, value in (
        ("id", workflow_id),
        ("exec_id", exec_id),
        ("status", status),
        ("input", input),
        ("output", output),
    ):
        if value is not None:
            workflow[name] = value
    if workflow:
        context["workflow"] = workflow
    if input is not None:
        context["input"] = input
    if output is not None:
        context["output"] = output
    if project is not None:
        context["project"] = project
    if agent is not None:
        context["agent"] = agent
    return context
