"""Key templates: Jinja2 and the origin system's Go style, strict undefined variables, a
sandbox, values that stay inert, errors for empty renders and bad syntax, and property
tests that no input renders to a key outside its tenant or onto another input's key."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import KeyTemplate, MemoryRef, TemplateKeyError, sanitize_key, template_context
from memory.template import MAX_TEMPLATE_LENGTH

PROPERTY = settings(deadline=None, max_examples=300, database=None)
EXAMPLE = "write e.g. 'support-{{ workflow.input.conversationId }}'"


def ctx(**input: Any) -> dict[str, Any]:
    return template_context(workflow_id="wf-1", input=input)


def render_error(source: str, context: dict[str, Any]) -> TemplateKeyError:
    template = KeyTemplate(source)
    with pytest.raises(TemplateKeyError) as info:
        template.render(context)
    assert info.value.template == source
    return info.value


# --- rendering --------------------------------------------------------------------


def test_a_jinja_template_renders_in_the_workflow_context() -> None:
    template = KeyTemplate("support-{{ workflow.input.conversationId }}")
    assert template.render(ctx(conversationId="c-42")) == "support-c-42"


@pytest.mark.parametrize(
    ("source", "rendered"),
    [
        ("{{ .workflow.input.id }}", "Ab-1"),
        ("{{.workflow.input.id}}", "Ab-1"),
        ("{{- .workflow.input.id -}}", "Ab-1"),
        ("user-{{ .workflow.input.id }}-{{ .workflow.id }}", "user-Ab-1-wf-1"),
        ("{{ .workflow.input.id | lower }}", "ab-1"),
        ("{{ .workflow.input.id | upper | replace('-', '_') }}", "AB_1"),
        ("{{ .input.id | lower }}", "ab-1"),
        ("v1.{{ .workflow.id }}.x", "v1.wf-1.x"),  # dots outside expressions are text
        ("{{ workflow.input.id }}", "Ab-1"),
    ],
)
def test_go_style_leading_dots_and_pipes_render_like_jinja(source: str, rendered: str) -> None:
    assert KeyTemplate(source).render(ctx(id="Ab-1")) == rendered


def test_the_context_holds_only_what_is_known() -> None:
    full = template_context(
        workflow_id="wf",
        exec_id="ex",
        status="running",
        input={"a": 1},
        output={"b": 2},
        project="proj",
        agent="bot",
    )
    assert full == {
        "workflow": {
            "id": "wf",
            "exec_id": "ex",
            "status": "running",
            "input": {"a": 1},
            "output": {"b": 2},
        },
        "input": {"a": 1},
        "output": {"b": 2},
        "project": "proj",
        "agent": "bot",
    }
    assert template_context() == {}
    assert template_context(project="p") == {"project": "p"}


def test_every_context_part_is_reachable_from_a_template() -> None:
    context = template_context(
        workflow_id="wf", exec_id="ex", status="done", input={"a": "i"}, output={"b": "o"},
        project="p", agent="g",
    )  # fmt: skip
    source = (
        "{{ workflow.id }}.{{ workflow.exec_id }}.{{ workflow.status }}.{{ input.a }}."
        "{{ output.b }}.{{ workflow.output.b }}.{{ project }}.{{ agent }}"
    )
    assert KeyTemplate(source).render(context) == "wf.ex.done.i.o.o.p.g"


# --- strict undefined -------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("prefs-{{ workflow.input.userId }}", "'dict object' has no attribute 'userId'"),
        ("prefs-{{ .workflow.input.userId }}", "'dict object' has no attribute 'userId'"),
        ("{{ workflow.input.userId | lower }}", "'dict object' has no attribute 'userId'"),
        ("{{ workflow.input.user.id }}", "'dict object' has no attribute 'user'"),
        ("x-{{ workflow.input.userId ~ '' }}", "'dict object' has no attribute 'userId'"),
        ("{{ project }}", "'project' is undefined"),
        ("{{ .agent }}-key", "'agent' is undefined"),
    ],
)
def test_a_missing_variable_is_an_error_naming_it_and_the_context(source: str, named: str) -> None:
    error = render_error(source, ctx(conversationId="c"))
    assert str(error) == f"key template {source!r}: {named}; the context has input, workflow"


def test_a_missing_variable_in_an_empty_context_says_the_context_has_nothing() -> None:
    error = render_error("{{ workflow.id }}", {})
    assert str(error) == "key template '{{ workflow.id }}': 'workflow' is undefined; " + (
        "the context has nothing"
    )


# --- the sandbox ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "attribute"),
    [
        ("{{ workflow.__class__ }}", "__class__"),
        ("{{ ''.__class__.__mro__ }}", "__class__"),
        ("{{ input.id.__class__.__base__.__subclasses__() }}", "__class__"),
        ("{{ lipsum.__globals__ }}", "__globals__"),
        ("{{ cycler.__init__.__globals__.os }}", "__init__"),
        ("{{ '{0.__class__}'.format(input) }}", "__class__"),
        ("{{ .lipsum.__dict__ }}", "__dict__"),
        ("{{ input.__getitem__('id') }}", "__getitem__"),
        ("{{ input.keys.__self__ }}", "__self__"),
    ],
)
def test_private_attributes_and_unsafe_calls_raise_and_never_render(
    source: str, attribute: str
) -> None:
    error = render_error(source, ctx(id="x"))
    assert str(error).startswith(f"key template {source!r} failed to render: ")
    assert f"access to attribute '{attribute}'" in str(error)
    assert "is unsafe" in str(error)


@pytest.mark.parametrize(
    "source", ["{{ input.pop('id') }}", "{{ input.clear() }}x", "{{ input.tags.append('t') }}"]
)
def test_a_template_cannot_modify_the_context_it_renders_in(source: str) -> None:
    """The same context renders every memory of an agent: a key template must not be able
    to change what the next one sees."""
    context = ctx(id="x", tags=["a"])
    before = copy.deepcopy(context)
    with pytest.raises(TemplateKeyError):
        KeyTemplate(source).render(context)
    assert context == before


@pytest.mark.parametrize(
    "source",
    [
        "{{ workflow.input.n + 1 }}",  # TypeError: a string plus a number
        "{{ 1 / workflow.input.zero }}",  # ZeroDivisionError
        "{{ range(1000000) | list | length }}",  # OverflowError from the sandbox
    ],
)
def test_any_failure_while_rendering_is_a_template_key_error(source: str) -> None:
    """``TemplateKeyError``: a key template that does not render in a context."""
    error = render_error(source, ctx(n="abc", zero=0))
    assert str(error).startswith(f"key template {source!r} failed to render: ")


# --- values stay inert ------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "{{ 7 * 7 }}",
        "{% for x in range(3) %}x{% endfor %}",
        "{{ .workflow.id }}",
        "{{ workflow.__class__ }}",
        "{# comment #}",
        "{% raw %}",
        "}}{{",
    ],
)
def test_template_syntax_inside_a_value_is_rendered_literally(value: str) -> None:
    assert KeyTemplate("k-{{ workflow.input.v }}").render(ctx(v=value)) == f"k-{value}"
    assert KeyTemplate("{{ .input.v }}").render(ctx(v=value)) == value


def test_html_in_a_value_is_not_escaped() -> None:
    assert KeyTemplate("{{ input.v }}").render(ctx(v="<a&b>'\"")) == "<a&b>'\""


# --- empty renders and construction errors ----------------------------------------


@pytest.mark.parametrize(
    ("source", "value"),
    [("{{ workflow.input.v }}", ""), ("{{ workflow.input.v }}", " \n\t"), ("  {{ '' }} ", "x")],
)
def test_an_empty_render_is_an_error(source: str, value: str) -> None:
    error = render_error(source, ctx(v=value))
    assert str(error) == f"key template {source!r} rendered an empty key"


@pytest.mark.parametrize("source", ["", "   ", "\n\t"])
def test_an_empty_template_is_refused_at_construction(source: str) -> None:
    with pytest.raises(TemplateKeyError) as info:
        KeyTemplate(source)
    assert str(info.value) == "a key template cannot be empty"
    assert info.value.template == source


def test_a_template_over_the_length_cap_is_refused_at_construction() -> None:
    KeyTemplate("k" * MAX_TEMPLATE_LENGTH)
    with pytest.raises(TemplateKeyError, match=f"at most {MAX_TEMPLATE_LENGTH} characters"):
        KeyTemplate("k" * (MAX_TEMPLATE_LENGTH + 1))


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        ("support-{{ workflow.id", "unexpected end of template"),
        ("{{ a b }}", "expected token 'end of print statement', got 'b'"),
        ("{% if %}", "Expected an expression, got 'end of statement block'"),
        ("{% for x in y %}", "Unexpected end of template"),
        ("{{ .1 }}", "unexpected '.'"),
        ("{{ }}", "Expected an expression"),
    ],
)
def test_invalid_syntax_is_an_error_at_construction(source: str, detail: str) -> None:
    with pytest.raises(TemplateKeyError) as info:
        KeyTemplate(source)
    message = str(info.value)
    assert message.startswith(f"invalid key template {source!r}: ")
    assert detail in message
    assert message.endswith(EXAMPLE)
    assert info.value.template == source


def test_templates_are_equal_by_source() -> None:
    assert KeyTemplate("a-{{ x }}") == KeyTemplate("a-{{ x }}")
    assert KeyTemplate("a-{{ x }}") != KeyTemplate("b-{{ x }}")
    assert len({KeyTemplate("a-{{ x }}"), KeyTemplate("a-{{ x }}")}) == 1
    assert repr(KeyTemplate("a-{{ x }}")) == "KeyTemplate('a-{{ x }}')"


# --- properties: no key outside its tenant, no collisions -------------------------

FRAGMENTS = [
    "{", "}", "{{", "}}", "{%", "%}", "{#", "*", ":", "/", "\\", "\n", "\r", "..", "../",
    "~", " ", "\t", "\x00", "%2F", "\u0430", "é", "e\u0301", "\ufb01", "\uff21", "\u200b",
    "{{ 7*7 }}", "{{ .workflow.id }}", "acme", "globex/", "-", "_", ".",
]  # fmt: skip
values = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=12).map("".join),
)
tenants = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
# Each template holds one variable between fixed text: rendered keys differ iff values do.
TEMPLATES = [
    ("support-{{ workflow.input.v }}", "support-{}"),
    ("{{ .workflow.input.v }}", "{}"),
    ("{{ input.v }}-{{ workflow.id }}", "{}-wf-1"),
    ("u/{{ .input.v }}:x", "u/{}:x"),
]
templates = st.sampled_from(TEMPLATES)


def rendered_key(source: str, value: str) -> str | None:
    """The sanitized key, or None when the render is (rightly) refused as empty."""
    try:
        raw = KeyTemplate(source).render(ctx(v=value))
    except TemplateKeyError as e:
        assert str(e).endswith("rendered an empty key")
        assert not value.strip()
        return None
    return sanitize_key(raw)


@PROPERTY
@given(templates, values)
def test_a_value_renders_literally_whatever_it_holds(template: tuple[str, str], value: str) -> None:
    source, shape = template
    expected = shape.replace("{}", value)
    if not expected.strip():
        with pytest.raises(TemplateKeyError, match="rendered an empty key"):
            KeyTemplate(source).render(ctx(v=value))
    else:
        assert KeyTemplate(source).render(ctx(v=value)) == expected


@PROPERTY
@given(tenants, templates, values)
def test_no_rendered_key_leaves_its_tenant(
    tenant: str, template: tuple[str, str], value: str
) -> None:
    key = rendered_key(template[0], value)
    if key is None:
        return
    ref = MemoryRef(tenant, "customer-support", key)
    assert ref.memory_id.split("/") == [tenant, "customer-support", key]
    assert MemoryRef.parse(ref.memory_id).tenant == tenant


@PROPERTY
@given(templates, values, values)
def test_different_values_never_share_a_memory(template: tuple[str, str], a: str, b: str) -> None:
    key_a, key_b = rendered_key(template[0], a), rendered_key(template[0], b)
    if key_a is None or key_b is None:
        return
    assert (key_a == key_b) == (a == b)


@PROPERTY
@given(st.tuples(tenants, values), st.tuples(tenants, values))
def test_different_tenants_or_values_never_share_a_memory_id(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    source = "support-{{ .workflow.input.v }}"
    refs = [
        MemoryRef(tenant, "customer-support", key)
        for tenant, value in (first, second)
        if (key := rendered_key(source, value)) is not None
    ]
    assert (refs[0].memory_id == refs[1].memory_id) == (first == second)


def test_look_alike_values_stay_apart() -> None:
    source = "support-{{ workflow.input.v }}"
    looks = ["cafe\u0301", "café", "\u0441afé", "\uff43afé", "cafe", "cafe\u200b"]
    keys = {rendered_key(source, v) for v in looks}
    assert len(keys) == len(looks)


def test_a_null_variable_is_an_error_never_the_text_none() -> None:
    template = KeyTemplate("prefs-{{ workflow.input.userId }}")
    with pytest.raises(TemplateKeyError, match="null"):
        template.render({"workflow": {"input": {"userId": None}}})
