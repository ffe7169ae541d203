"""The append benchmark's options and its scenarios: which system runs which load, in
which order, with how many appender workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TENANT = "bench"
WARMUP_TENANT = "bench-warmup"
RESOURCE = "customer-support"

#: The pool of the producers' client (both systems): an open loop can have many calls
#: in flight at once when the machine stalls, and must not fail for want of connections.
CONNECTIONS = 1000

#: The scenarios ``--mode`` can name, in the order they run.
MODES = ("batched", "single", "wait")


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    memories: int
    batch: int
    producers: int
    workers: int
    partitions: int
    modes: tuple[str, ...]
    wait_messages: int
    wait_batch: int
    repeat: int
    rate: float
    content_bytes: int
    redis_url: str | None
    aof: bool
    timeout: float
    resources: Path
    json: bool
    save: Path | None = None
    worker_command: tuple[str, ...] = ()
    workflows: int = 0
    scale_workers: int = 0  # > 0: batched once more with this many appender workers
    peer: str | None = None  # "langchain": the batched messages through that peer too
    peer_ttl: int = 0  # the peer's key TTL in seconds (0: none)


@dataclass(frozen=True, slots=True)
class Scenario:
    system: str  # baseline | memstream | langchain
    label: str  # batched | single | wait | scaled (batched, more workers) | peer
    batch: int
    messages: int
    wait: bool = False
    workers: int = 0  # memstream: appender worker processes


def workflow_of(memory: int, workflows: int) -> str | None:
    """With --workflows K, the workflow that writes memory m: one of K, m mod K."""
    return f"wf-{memory % workflows:04d}" if workflows else None


def scenarios(opts: Options) -> list[Scenario]:
    """Each memstream scenario right after the baseline with the same batch size; with
    --scale-workers, batched memstream again with that many workers right after the
    first; with --peer, the peer on the batched messages after them."""
    out: list[Scenario] = []
    labels = [m for m in MODES if m in opts.modes]
    sizes = {"batched": opts.batch, "single": 1, "wait": opts.wait_batch}
    if opts.batch == 1 and "single" in labels and "batched" in labels:
        labels.remove("batched")
    if opts.wait_messages < 1 and "wait" in labels:
        labels.remove("wait")
    for label in labels:
        batch, wait = sizes[label], label == "wait"
        messages = opts.wait_messages if wait else opts.messages
        if not any(s.system == "baseline" and s.batch == batch for s in out):
            out.append(Scenario("baseline", label, batch, messages))
        out.append(Scenario("memstream", label, batch, messages, wait=wait, workers=opts.workers))
        if label == "batched" and opts.scale_workers:
            out.append(Scenario("memstream", "scaled", batch, messages, workers=opts.scale_workers))
        if label == "batched" and opts.peer:
            out.append(Scenario(opts.peer, "peer", 1, messages))
    return out
