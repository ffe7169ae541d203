"""Memory references: key sanitization (never two raw keys on one memory, a safe
alphabet, a length cap, a stable hash suffix), tenants and resource ids, and
MemoryRef.parse errors that tell the fix."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory import InvalidReferenceError, MemoryRef, is_sanitized, sanitize_key
from memory.ref import (
    HASH_HEX_DIGITS,
    MAX_KEY_LENGTH,
    READABLE_PREFIX,
    check_resource_id,
    check_tenant,
)

SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
KEPT = re.compile(r"[A-Za-z0-9._-]{1,128}")
HASHED = re.compile(r"[A-Za-z0-9._-]{0,95}~[0-9a-f]{32}")
keys = st.text(min_size=1, max_size=300)
# Keys built from few characters, mostly safe, so that near-collisions are common.
near = st.text(alphabet=st.sampled_from("ab_.~ /é\n{}*:"), min_size=1, max_size=140)
PROPERTY = settings(deadline=None, max_examples=400, database=None)


@PROPERTY
@given(keys, keys)
def test_different_raw_keys_never_share_a_sanitized_key(a: str, b: str) -> None:
    assert (sanitize_key(a) == sanitize_key(b)) == (a == b)


@PROPERTY
@given(near, near)
def test_near_identical_keys_stay_distinct(a: str, b: str) -> None:
    assert (sanitize_key(a) == sanitize_key(b)) == (a == b)


@PROPERTY
@given(keys)
def test_sanitized_keys_are_short_safe_and_recognised(raw: str) -> None:
    key = sanitize_key(raw)
    assert KEPT.fullmatch(key) or HASHED.fullmatch(key), key
    assert len(key) <= MAX_KEY_LENGTH
    assert is_sanitized(key)
    assert "/" not in key and "{" not in key and ":" not in key


@PROPERTY
@given(keys)
def test_sanitizing_is_stable(raw: str) -> None:
    assert sanitize_key(raw) == sanitize_key(raw)


@PROPERTY
@given(st.text(alphabet=SAFE, min_size=1, max_size=MAX_KEY_LENGTH))
def test_safe_keys_within_the_cap_are_kept_as_they_are(raw: str) -> None:
    assert sanitize_key(raw) == raw


@PROPERTY
@given(keys, keys, keys)
def test_no_key_reaches_another_tenant_or_resource(a: str, b: str, key: str) -> None:
    tenant_a, tenant_b = "t-" + str(len(a)), "u-" + str(len(b))
    ref_a = MemoryRef.from_raw(tenant_a, "res", key)
    assert ref_a.memory_id.split("/") == [tenant_a, "res", ref_a.key]
    assert not ref_a.memory_id.startswith(tenant_b + "/")


def expected_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:HASH_HEX_DIGITS]


@pytest.mark.parametrize(
    ("raw", "readable"),
    [
        ("hello world", "hello_world"),
        ("a/b", "a_b"),
        ("100%", "100_"),
        ("user:42", "user_42"),
        ("{tag}", "_tag_"),
        ("~", "_"),
        ("*", "_"),
        ("café", "caf_"),
        ("会", "_"),
        ("😀", "_"),
        ("a\nb", "a_b"),
        ("{{ x }}", "___x___"),
    ],
)
def test_a_key_with_unsafe_characters_gets_a_readable_part_and_a_hash(
    raw: str, readable: str
) -> None:
    assert sanitize_key(raw) == f"{readable}~{expected_hash(raw)}"


def test_a_replaced_key_never_equals_the_key_it_looks_like() -> None:
    assert sanitize_key("hello_world") == "hello_world"
    assert sanitize_key("hello world") != sanitize_key("hello_world")
    assert sanitize_key("hello world") != sanitize_key("hello\tworld")


def test_unicode_look_alikes_are_kept_apart_never_folded() -> None:
    composed, decomposed, cyrillic = "café", "cafe\u0301", "\u0441af\u00e9"
    assert len({sanitize_key(k) for k in (composed, decomposed, cyrillic)}) == 3


def test_a_key_at_the_cap_is_kept_and_one_over_it_is_cut_and_hashed() -> None:
    at_cap = "k" * MAX_KEY_LENGTH
    assert sanitize_key(at_cap) == at_cap
    over = at_cap + "k"
    assert sanitize_key(over) == "k" * READABLE_PREFIX + "~" + expected_hash(over)
    assert len(sanitize_key(over)) == MAX_KEY_LENGTH


def test_long_keys_sharing_a_prefix_stay_distinct() -> None:
    a, b = "x" * 500 + "a", "x" * 500 + "b"
    assert sanitize_key(a) != sanitize_key(b)
    assert sanitize_key(a)[:READABLE_PREFIX] == sanitize_key(b)[:READABLE_PREFIX]


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(InvalidReferenceError, match="cannot be empty"):
        sanitize_key("")


def test_a_key_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidReferenceError, match="lone surrogate"):
        sanitize_key("a\ud800")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "a b",
        "a/b",
        "%41",
        "~",
        "abc~" + "0" * 31,  # hash too short
        "abc~" + "A" * 32,  # upper-case hex is not the canonical form
        "k" * (MAX_KEY_LENGTH + 1),
        "x" * (READABLE_PREFIX + 1) + "~" + "0" * 32,
        "abc\n",
        "é",
    ],
)
def test_is_sanitized_refuses_keys_not_in_sanitized_form(key: str) -> None:
    assert not is_sanitized(key)


def test_memory_ref_refuses_an_unsanitized_key_and_points_to_from_raw() -> None:
    with pytest.raises(InvalidReferenceError, match=r"from_raw\(\)") as info:
        MemoryRef("acme", "customer-support", "a b")
    assert info.value.value == "a b"


def test_memory_id_is_tenant_resource_and_sanitized_key() -> None:
    ref = MemoryRef.from_raw("acme", "customer-support", "ticket/42 é")
    assert ref.key == "ticket_42__~" + expected_hash("ticket/42 é")
    assert ref.memory_id == f"acme/customer-support/{ref.key}"
    assert str(ref) == ref.memory_id


def test_parse_keeps_slashes_of_the_key_inside_the_key() -> None:
    ref = MemoryRef.parse("acme/customer-support/a/b/c")
    assert (ref.tenant, ref.resource) == ("acme", "customer-support")
    assert ref.key == sanitize_key("a/b/c")


@pytest.mark.parametrize(
    "text", ["acme", "acme/customer-support", "acme//key", "/customer-support/key", "acme/x/"]
)
def test_parse_errors_show_the_expected_form_and_an_example(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        MemoryRef.parse(text)
    message = str(info.value)
    assert "TENANT/RESOURCE/KEY" in message
    assert "acme/customer-support/support-123" in message
    assert info.value.value == text


def test_parse_error_for_a_bad_tenant_names_the_allowed_characters() -> None:
    with pytest.raises(InvalidReferenceError, match="invalid tenant '-acme'") as info:
        MemoryRef.parse("-acme/customer-support/key")
    assert "1-64 characters" in str(info.value)


def test_parse_error_for_a_bad_resource_id_asks_for_lower_case() -> None:
    with pytest.raises(InvalidReferenceError, match="invalid resource id 'Support'") as info:
        MemoryRef.parse("acme/Support/key")
    assert "lower-case" in str(info.value)


@pytest.mark.parametrize("tenant", ["acme", "A", "0", "Acme_Corp.eu-1", "t" * 64])
def test_valid_tenants_are_accepted(tenant: str) -> None:
    assert check_tenant(tenant) == tenant


@pytest.mark.parametrize(
    "tenant",
    ["", "t" * 65, "-acme", ".acme", "_acme", "ac me", "acme/x", "ac:me", "acmé", "acme\n"],
)
def test_invalid_tenants_are_refused(tenant: str) -> None:
    with pytest.raises(InvalidReferenceError):
        check_tenant(tenant)


@pytest.mark.parametrize("resource", ["customer-support", "r", "9", "billing.v2_x", "r" * 64])
def test_valid_resource_ids_are_accepted(resource: str) -> None:
    assert check_resource_id(resource) == resource


@pytest.mark.parametrize(
    "resource",
    ["", "r" * 65, "Customer", "-support", "sup port", "a/b", "sup{1}", "support\n"],
)
def test_invalid_resource_ids_are_refused(resource: str) -> None:
    with pytest.raises(InvalidReferenceError):
        check_resource_id(resource)


def test_a_trailing_newline_cannot_sneak_into_a_memory_id() -> None:
    with pytest.raises(InvalidReferenceError):
        MemoryRef("acme", "customer-support", "support-123\n")
