"""The partition function, part of the event contract.

p = CRC32 (zlib, the IEEE polynomial) of the UTF-8 memory id ``tenant/resource/key``
(with the sanitized key), modulo the partition count stored in Redis.
"""

from __future__ import annotations

import zlib


def partition_for(memory_id: str, partitions: int) -> int:
    """The partition of a memory id under ``partitions`` partitions."""
    if partitions < 1:
        raise ValueError(f"partition count must be at least 1, got {partitions}")
    return zlib.crc32(memory_id.encode("utf-8")) % partitions
