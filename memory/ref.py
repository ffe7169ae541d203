"""Memory references: tenant, resource id and sanitized key, and the memory id they form.

The memory id ``tenant/resource/key`` is part of the event contract: producers in any
language compute it (and from it the partition) the same way. ``sanitize_key`` keeps a
rendered key readable and never lets two different keys name the same memory:

- a key of 1 to 128 characters, all of ``A-Z a-z 0-9 - _ .``, is kept as it is;
- any other key (another character anywhere, or longer than 128) becomes its readable
  part, every other character replaced by ``_`` and cut to 95 characters, then ``~``
  and the first 32 hex digits of the SHA-256 of the whole key's UTF-8 bytes.

``~`` is never part of a kept key, so a hashed key cannot equal a kept one, and two
hashed keys differ in their hash (128 bits). Unicode look-alikes, ``..``, braces, ``*``,
``:``, ``/`` and newlines all stay distinct: nothing is folded, only hashed. Keys never
contain ``/``, so a memory id always splits into exactly three parts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from memory.errors import InvalidReferenceError

MAX_KEY_LENGTH = 128
HASH_HEX_DIGITS = 32
READABLE_PREFIX = MAX_KEY_LENGTH - 1 - HASH_HEX_DIGITS
SAFE_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
_SAFE = frozenset(SAFE_CHARACTERS)
_SANITIZED = re.compile(
    rf"^(?:[A-Za-z0-9._-]{{1,{MAX_KEY_LENGTH}}}"
    rf"|[A-Za-z0-9._-]{{0,{READABLE_PREFIX}}}~[0-9a-f]{{{HASH_HEX_DIGITS}}})$"
)
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
#: The same rules as JSON Schema (ECMA-262) patterns, for the event contract.
TENANT_PATTERN = _TENANT.pattern
RESOURCE_PATTERN = _RESOURCE.pattern
SANITIZED_KEY_PATTERN = _SANITIZED.pattern


def sanitize_key(raw: str) -> str:
    """The sanitized form of a rendered memory key (see the module docstring)."""
    if not raw:
        raise InvalidReferenceError("a memory key cannot be empty", value=raw)
    if len(raw) <= MAX_KEY_LENGTH and all(c in _SAFE for c in raw):
        return raw
    try:
        digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:HASH_HEX_DIGITS]
    except UnicodeEncodeError as e:
        raise InvalidReferenceError(
            "a memory key must be valid Unicode text (it holds a lone surrogate)", value=raw
        ) from e
    readable = "".join(c if c in _SAFE else "_" for c in raw[:READABLE_PREFIX])
    return f"{readable}~{digest}"


def is_sanitized(key: str) -> bool:
    """True when ``key`` is already in sanitized form (what events must carry)."""
    return bool(_SANITIZED.fullmatch(key))


def check_tenant(tenant: str) -> str:
    if not _TENANT.fullmatch(tenant):
        raise InvalidReferenceError(
            f"invalid tenant {tenant!r}: use 1-64 characters of letters, digits, '_', '.', "
            f"'-', starting with a letter or digit",
            value=tenant,
        )
    return tenant


def check_resource_id(resource: str) -> str:
    if not _RESOURCE.fullmatch(resource):
        raise InvalidReferenceError(
            f"invalid resource id {resource!r}: use 1-64 characters of lower-case letters, "
            f"digits, '_', '.', '-', starting with a letter or digit",
            value=resource,
        )
    return resource


@dataclass(frozen=True, slots=True)
class MemoryRef:
    """One memory: a tenant's instance of a resource under a sanitized key."""

    tenant: str
    resource: str
    key: str

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        check_resource_id(self.resource)
        if not is_sanitized(self.key):
            raise InvalidReferenceError(
                f"memory key {self.key!r} is not sanitized; build the reference with "
                f"MemoryRef.from_raw() or sanitize_key()",
                value=self.key,
            )

    @classmethod
    def checked(cls, tenant: str, resource: str, key: str) -> MemoryRef:
        """A reference from parts already checked as ``__post_init__`` checks them (a
        validated event's): not checked again."""
        ref = object.__new__(cls)
        object.__setattr__(ref, "tenant", tenant)
        object.__setattr__(ref, "resource", resource)
        object.__setattr__(ref, "key", key)
        return ref

    @classmethod
    def from_raw(cls, tenant: str, resource: str, raw_key: str) -> MemoryRef:
        """A reference from a rendered (not yet sanitized) key."""
        return cls(tenant, resource, sanitize_key(raw_key))

    @classmethod
    def parse(cls, text: str) -> MemoryRef:
        """Parse ``TENANT/RESOURCE/KEY``; KEY is the rendered key, sanitized here."""
        parts = text.split("/", 2)
        if len(parts) != 3 or not all(parts):
            raise InvalidReferenceError(
                f"invalid memory reference {text!r}: write TENANT/RESOURCE/KEY, "
                f"e.g. acme/customer-support/support-123",
                value=text,
            )
        return cls.from_raw(parts[0], parts[1], parts[2])

    @classmethod
    def parse_id(cls, memory_id: str) -> MemoryRef:
        """The reference of a stored memory id (its key already sanitized)."""
        parts = memory_id.split("/", 2)
        if len(parts) != 3:
            raise InvalidReferenceError(
                f"invalid memory id {memory_id!r}: expected tenant/resource/key", value=memory_id
            )
        return cls(*parts)

    @property
    def memory_id(self) -> str:
        """``tenant/resource/key``: the string the partition function hashes."""
        return f"{self.tenant}/{self.resource}/{self.key}"

    def __str__(self) -> str:
        return self.memory_id
