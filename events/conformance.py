"""Conformance vectors for producers in other languages.

A producer that does not use the Python SDK (Go, TypeScript, ...) must name memories and
route events exactly as this code does. ``events/conformance.json`` records, for a list
of inputs (tenant, resource id, rendered key), the sanitized key, the memory id
``tenant/resource/key``, its CRC32 and its partition under several partition counts,
plus keys that must be refused. It is generated from the code (``python -m
events.conformance`` writes it and ``events/schema.json``) and a test keeps the
committed copy equal to what the code computes, so a change of the sanitization or of
the partition function fails the build instead of silently misrouting other producers.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from events.envelope import SCHEMA_VERSION
from events.schema import event_schema_text
from memory import InvalidReferenceError, MemoryRef, partition_for, sanitize_key
from memory.ref import HASH_HEX_DIGITS, MAX_KEY_LENGTH, READABLE_PREFIX, SAFE_CHARACTERS

#: The partition counts every vector is routed under.
PARTITION_COUNTS: tuple[int, ...] = (1, 8, 16, 64, 256)
SAFE_ALPHABET = SAFE_CHARACTERS

CONFORMANCE_FILE = "conformance.json"
SCHEMA_FILE = "schema.json"

DESCRIPTION = (
    "How a producer names a memory and picks the ingest partition of its events. "
    "(1) Sanitize the rendered key. A key of 1 to "
    f"{MAX_KEY_LENGTH} characters, all of A-Z a-z 0-9 '-' '_' '.', is kept as it is. "
    "Any other non-empty key becomes: its first "
    f"{READABLE_PREFIX} characters (Unicode code points) with every character outside that "
    "alphabet replaced by '_', then '~', then the first "
    f"{HASH_HEX_DIGITS} lower-case hex digits of the SHA-256 of the whole key's UTF-8 "
    "bytes. An empty key is refused. (2) The memory id is "
    "'<tenant>/<resource>/<sanitized key>'. The tenant matches "
    "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ and the resource id ^[a-z0-9][a-z0-9_.-]{0,63}$; "
    "neither is changed. (3) The partition is the CRC32 (zlib / IEEE 802.3 polynomial, the "
    "one of Go's hash/crc32.ChecksumIEEE) of the UTF-8 bytes of the memory id, as an "
    "unsigned 32-bit integer, modulo the partition count N. N is the 'partitions' field "
    "of the hash '<namespace>:config' in Redis (namespace 'ms' by default); every producer "
    "reads it there. (4) The event is published with XADD <namespace>:ingest:{<p>} * event "
    "<json>, the JSON following events/schema.json, its payload.memory holding the resource "
    "id and the sanitized key, and its 'partitions' field set to the N it routed with. "
    "Each vector lists the input, the sanitized key, the memory id, its CRC32 and the "
    "partition for each count; 'rejected' lists keys a producer must refuse."
)


@dataclass(frozen=True, slots=True)
class VectorInput:
    """One input of the vectors: what a producer starts from."""

    tenant: str
    resource: str
    raw_key: str
    note: str


_AT_LIMIT = "k" * MAX_KEY_LENGTH

INPUTS: tuple[VectorInput, ...] = (
    VectorInput("acme", "customer-support", "support-123", "plain ASCII, kept as is"),
    VectorInput("acme", "customer-support", "A", "one safe character"),
    VectorInput("acme", "customer-support", "a.b_c-D9", "every kind of safe character"),
    VectorInput("acme", "customer-support", "..", "dots are safe, kept"),
    VectorInput("acme", "customer-support", "hello world", "a space: readable part and hash"),
    VectorInput("acme", "customer-support", "hello_world", "what the space became, kept"),
    VectorInput("acme", "customer-support", "a/b/c", "slashes never reach the memory id"),
    VectorInput("acme", "customer-support", "100%", "'%'"),
    VectorInput("acme", "customer-support", "user:42:thread", "colons"),
    VectorInput("acme", "customer-support", "{tag}", "braces (Redis hash tag characters)"),
    VectorInput("acme", "customer-support", "*", "a glob character"),
    VectorInput("acme", "customer-support", "~", "the hash separator itself"),
    VectorInput("acme", "customer-support", "line\nbreak\ttab", "control characters"),
    VectorInput("acme", "customer-support", "nul\x00byte", "a NUL character"),
    VectorInput("acme", "customer-support", "café", "an accented letter"),
    VectorInput("acme", "customer-support", "cafe\u0301", "the same, decomposed: distinct"),
    VectorInput(
        "acme", "customer-support", "\u0440\u0430\u0443\u0440\u0430l", "Cyrillic look-alikes"
    ),
    VectorInput("acme", "customer-support", "会话-42", "CJK"),
    VectorInput("acme", "customer-support", "chat-😀", "an emoji"),
    VectorInput("acme", "customer-support", "{{ workflow.id }}", "template syntax in a value"),
    VectorInput("acme", "customer-support", _AT_LIMIT, f"{MAX_KEY_LENGTH} safe characters: kept"),
    VectorInput("acme", "customer-support", _AT_LIMIT + "k", "one more: cut and hashed"),
    VectorInput("acme", "customer-support", "é" * 200, "long and unsafe: cut and hashed"),
    VectorInput("Acme_Corp.eu-1", "customer-support", "support-123", "tenant alphabet"),
    VectorInput("t0", "billing.v2_x", "support-123", "resource alphabet"),
    VectorInput("acme", "research", "support-123", "another resource, same key"),
    VectorInput("globex", "customer-support", "support-123", "another tenant, same key"),
)

REJECTED_KEYS: tuple[tuple[str, str], ...] = (("", "an empty key"),)


def vector(item: VectorInput) -> dict[str, Any]:
    """The expected outputs for one input."""
    ref = MemoryRef.from_raw(item.tenant, item.resource, item.raw_key)
    memory_id = ref.memory_id
    return {
        "note": item.note,
        "tenant": item.tenant,
        "resource": item.resource,
        "raw_key": item.raw_key,
        "raw_key_utf8_hex": item.raw_key.encode("utf-8").hex(),
        "sanitized_key": ref.key,
        "memory_id": memory_id,
        "crc32": zlib.crc32(memory_id.encode("utf-8")),
        "partition": {str(n): partition_for(memory_id, n) for n in PARTITION_COUNTS},
    }


def rejected(raw_key: str, note: str) -> dict[str, Any]:
    """A key a producer must refuse; raises if the code accepts it."""
    try:
        sanitize_key(raw_key)
    except InvalidReferenceError:
        return {"raw_key": raw_key, "note": note}
    raise AssertionError(f"the key {raw_key!r} ({note}) is accepted; drop it from REJECTED_KEYS")


def conformance() -> dict[str, Any]:
    """Every conformance vector, computed by the code."""
    return {
        "description": DESCRIPTION,
        "schema_version": SCHEMA_VERSION,
        "safe_alphabet": SAFE_ALPHABET,
        "max_key_length": MAX_KEY_LENGTH,
        "readable_prefix": READABLE_PREFIX,
        "hash_hex_digits": HASH_HEX_DIGITS,
        "partition_counts": list(PARTITION_COUNTS),
        "vectors": [vector(item) for item in INPUTS],
        "rejected": [rejected(raw, note) for raw, note in REJECTED_KEYS],
    }


def conformance_text() -> str:
    """``events/conformance.json`` as the code computes it now."""
    return json.dumps(conformance(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def committed_conformance_text() -> str:
    """The committed ``events/conformance.json``."""
    return (resources.files("events") / CONFORMANCE_FILE).read_text(encoding="utf-8")


def write(folder: Path | None = None) -> list[Path]:
    """Write the conformance vectors and the event JSON Schema; returns the files."""
    target = folder or Path(__file__).resolve().parent
    written = []
    for name, text in ((CONFORMANCE_FILE, conformance_text()), (SCHEMA_FILE, event_schema_text())):
        path = target / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    for path in write():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
