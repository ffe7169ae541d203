"""What ``memstream status`` shows: partitions, owners, fencing tokens, lag, dead letters,
and each worker's circuit breaker."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from store import (
    TOPIC_GROUPS,
    CircuitRecord,
    Group,
    Keys,
    LeaseHolder,
    RedisClient,
    Scripts,
    get_partitions,
    read_circuits,
)
from store.keys import SINGLE_PARTITION_TOPICS
from store.streams import group_lag

LAG_CAP = 10_000


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    partition: int
    owner: str | None
    fence: int | None
    lease_ttl_ms: int | None
    length: int
    pending: int
    lag: int | None  # entries not yet delivered; None when the group does not exist yet
    dead_letters: int
    # Why the partition waits at one entry: a newer schema (kind newer_schema), or an
    # entry whose processing keeps failing (kind failing: its attempts and last error).
    held: dict[str, Any] | None
    # The entry with the most counted attempts (a worker that died on it counts too).
    most_attempts: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class GroupStatus:
    group: str
    members: list[str]
    partitions: list[PartitionStatus]
    circuits: dict[str, CircuitRecord] = field(default_factory=dict)  # live members' only

    @property
    def total_lag(self) -> int:
        return sum(p.lag or 0 for p in self.partitions)


def _kv(flat: list[Any]) -> dict[str, Any]:
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


async def group_status(
    client: RedisClient, scripts: Scripts, keys: Keys, group: Group, member_ttl_ms: int
) -> GroupStatus:
    partitions = await get_partitions(client, keys)
    members = [
        str(m)
        for m in await scripts("heartbeat", [keys.members(group.value)], ["", member_ttl_ms, "0"])
    ]
    topic = next(t for t, gs in TOPIC_GROUPS.items() if group in gs)
    if topic in SINGLE_PARTITION_TOPICS:
        partitions = 1
    rows = []
    for p in range(partitions):
        stream = keys.topic(topic, p)
        pipe = client.pipeline(transaction=False)
        pipe.get(keys.lease(p, group.value))
        pipe.pttl(keys.lease(p, group.value))
        pipe.xlen(stream)
        pipe.xlen(keys.dlq(p))
        pipe.get(keys.held(p, group.value))
        pipe.hgetall(keys.attempts(p, group.value))
        lease, ttl, length, dead, held, attempts = await pipe.execute()
        counted = {str(k): int(v) for k, v in attempts.items()}
        most = max(counted.items(), key=lambda kv: kv[1]) if counted else None
        pending, lag = 0, None
        try:
            infos = await client.execute_command("XINFO", "GROUPS", stream)
        except ResponseError:
            infos = []
        for info in infos:
            g = info if isinstance(info, dict) else _kv(info)
            if g.get("name") == group.value:
                pending = int(g.get("pending", 0))
                lag = await group_lag(client, stream, g, LAG_CAP)
        rows.append(
            PartitionStatus(
                partition=p,
                owner=LeaseHolder(lease, 0).worker if lease else None,
                fence=LeaseHolder(lease, 0).fence if lease else None,
                lease_ttl_ms=int(ttl) if lease and int(ttl) >= 0 else None,
                length=int(length),
                pending=pending,
                lag=lag,
                dead_letters=int(dead),
                held=json.loads(held) if held else None,
                most_attempts=most,
            )
        )
    recorded = await read_circuits(client, keys, group.value)
    circuits = {m: recorded[m] for m in members if m in recorded}
    return GroupStatus(group.value, members, rows, circuits)


def describe_circuit(record: CircuitRecord | None) -> str:
    """``circuit: closed (opened 2 times, last at 2024-05-01 12:00:03Z)``"""
    if record is None:
        return "circuit: unknown (not recorded)"
    times = "once" if record.opens == 1 else f"{record.opens} times"
    if record.opens == 0 or record.last_opened_at is None:
        return f"circuit: {record.state} (never opened)"
    at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(record.last_opened_at))
    return f"circuit: {record.state} (opened {times}, last at {at})"


def render(status: GroupStatus) -> str:
    lines = [
        f"{status.group}: {len(status.members)} live worker(s)"
        + (f": {', '.join(status.members)}" if status.members else ""),
        f"{'p':>4}  {'owner':<28} {'fence':>6} {'length':>8} {'pending':>8} {'lag':>8} "
        f"{'dlq':>6}  held",
    ]
    for p in status.partitions:
        lag = "-" if p.lag is None else (f">={LAG_CAP}" if p.lag >= LAG_CAP else str(p.lag))
        held = ""
        if p.held:
            word = "stuck" if p.held.get("kind") == "failing" else "held"
            held = f"{word} at {p.held['entry']}: {p.held['reason']}"
        elif p.most_attempts:
            held = f"entry {p.most_attempts[0]}: {p.most_attempts[1]} failed attempt(s)"
        fence = "-" if p.fence is None else str(p.fence)
        lines.append(
            f"{p.partition:>4}  {(p.owner or '(none)'):<28} {fence:>6} "
            f"{p.length:>8} {p.pending:>8} {lag:>8} {p.dead_letters:>6}  {held}"
        )
    lines.extend(f"{m}: {describe_circuit(status.circuits.get(m))}" for m in status.members)
    lines.append(
        f"total: lag {status.total_lag}, pending {sum(p.pending for p in status.partitions)}, "
        f"dead letters {sum(p.dead_letters for p in status.partitions)}"
    )
    return "\n".join(lines)


def as_json(status: GroupStatus) -> dict[str, Any]:
    return {
        "group": status.group,
        "members": status.members,
        "circuits": {m: asdict(c) for m, c in status.circuits.items()},
        "partitions": [asdict(p) for p in status.partitions],
    }
