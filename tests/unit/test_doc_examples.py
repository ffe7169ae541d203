"""Examples in the docs that a reader copies: each is checked against the code, so a doc
cannot drift from what memstream does."""

from __future__ import annotations

import json
import re
from pathlib import Path

from events import MessageAppended, decode
from memory import partition_for

ROOT = Path(__file__).resolve().parents[2]


def test_the_contracts_raw_xadd_names_the_partition_of_its_memory() -> None:
    text = (ROOT / "docs" / "contract.md").read_text("utf-8")
    found = re.findall(r"XADD ms:ingest:\{(\d+)\} \* event '([^']+)'", text)
    assert found, "docs/contract.md shows no raw XADD of an event"
    for partition, event in found:
        data = json.loads(event)
        memory = data["payload"]["memory"]
        memory_id = f"{data['tenant']}/{memory['resource']}/{memory['key']}"
        assert int(partition) == partition_for(memory_id, data["partitions"]), memory_id
        decoded = decode({"event": event})  # a valid event of the current contract
        assert isinstance(decoded.event, MessageAppended)


def test_the_langchain_example_connects_to_the_server_memstream_uses() -> None:
    text = (ROOT / "docs" / "langchain.md").read_text("utf-8")
    assert '["memstream", "url"]' in text
    assert "localhost:6379" not in text
