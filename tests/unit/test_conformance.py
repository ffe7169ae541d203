"""The committed contract files (events/conformance.json, events/schema.json) equal what
the code computes now: a change of the sanitization, the memory id, the partition
function or the event models fails here until the files are regenerated on purpose
(``python -m events.conformance``) and other producers are told."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import pytest

from events.conformance import (
    PARTITION_COUNTS,
    committed_conformance_text,
    conformance_text,
    write,
)
from events.schema import committed_schema_text, event_schema_text
from memory import InvalidReferenceError, sanitize_key
from memory.ref import MAX_KEY_LENGTH

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "run `python -m events.conformance` and tell the producers in other languages"


def committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "events" / "conformance.json").read_text("utf-8"))
    return data


def test_committed_conformance_vectors_equal_what_the_code_computes() -> None:
    assert committed_conformance_text() == conformance_text(), REGENERATE


def test_committed_event_schema_equals_the_models() -> None:
    assert committed_schema_text() == event_schema_text(), REGENERATE
    assert (ROOT / "events" / "schema.json").read_text("utf-8") == event_schema_text()


def test_vectors_follow_the_described_algorithm_independently_of_the_code() -> None:
    """Recompute every vector the way a producer in another language would, from the
    file alone: keep a short safe key, else readable part + '~' + SHA-256 prefix."""
    data = committed()
    safe = set(data["safe_alphabet"])
    cap, prefix, digits = data["max_key_length"], data["readable_prefix"], data["hash_hex_digits"]
    assert data["partition_counts"] == list(PARTITION_COUNTS)
    for v in data["vectors"]:
        raw_text = v["raw_key"]
        raw = raw_text.encode("utf-8")
        assert raw.hex() == v["raw_key_utf8_hex"]
        if len(raw_text) <= cap and all(c in safe for c in raw_text):
            key = raw_text
        else:
            readable = "".join(c if c in safe else "_" for c in raw_text[:prefix])
            key = readable + "~" + hashlib.sha256(raw).hexdigest()[:digits]
        assert key == v["sanitized_key"]
        assert len(key) <= cap
        memory_id = f"{v['tenant']}/{v['resource']}/{key}"
        assert memory_id == v["memory_id"]
        crc = zlib.crc32(memory_id.encode("utf-8"))
        assert crc == v["crc32"]
        assert v["partition"] == {str(n): crc % n for n in data["partition_counts"]}


def test_vectors_cover_the_inputs_other_languages_get_wrong() -> None:
    raws = [v["raw_key"] for v in committed()["vectors"]]
    for needle in (" ", "/", "%", ":", "{", "}", "~", "é", "会", "😀", "\n", "*", ".."):
        assert any(needle in raw for raw in raws), needle
    sanitized = [v["sanitized_key"] for v in committed()["vectors"]]
    assert sum(len(k) == MAX_KEY_LENGTH for k in sanitized) >= 2
    assert any("~" in k for k in sanitized) and any("~" not in k for k in sanitized)
    assert any(raw.isascii() and raw.isalnum() for raw in raws)


def test_rejected_keys_are_refused_by_the_code() -> None:
    rejected = committed()["rejected"]
    assert rejected
    for r in rejected:
        with pytest.raises(InvalidReferenceError):
            sanitize_key(r["raw_key"])


def test_the_description_explains_the_algorithm_on_its_own() -> None:
    description = committed()["description"]
    for term in ("UTF-8", "SHA-256", "lower-case hex", "CRC32", "modulo", "<tenant>/<resource>/"):
        assert term in description


def test_write_produces_both_contract_files(tmp_path: Path) -> None:
    written = write(tmp_path)
    assert sorted(p.name for p in written) == ["conformance.json", "schema.json"]
    assert (tmp_path / "conformance.json").read_text("utf-8") == conformance_text()
    assert (tmp_path / "schema.json").read_text("utf-8") == event_schema_text()
