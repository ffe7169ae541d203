"""A chaos-test producer: publishes its share of a run's messages, one at a time.

Run with the project's Python from the repository root::

    python -m tests.chaos.producer --url redis://... --namespace t1 --run r1 \
        --producer 0 --producers 4 --messages 20000 --memories 500 --rate 250

Message ``g`` of the run (0 <= g < messages) belongs to producer ``g % producers`` as its
sequence number ``g // producers`` and goes to memory ``conv-<g % memories>`` of tenant
``acme``, resource ``customer-support``. Its content names (producer, sequence) and its
idempotency key is ``<run>:<producer>:<sequence>``. Each message is published only after
the previous publish returned, so a producer's order is defined; a publish whose outcome
is unknown (or that could not reach Redis) is retried with the same idempotency key.
Exits 0 once every message of its share is published.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from events import Publisher, PublishOutcomeUnknownError, RedisUnavailableError
from memory import MemoryRef, Message, Role
from store import Keys, connect

TENANT = "acme"
RESOURCE = "customer-support"
RETRY_FOR = 60.0


@dataclass(frozen=True, slots=True)
class Planned:
    """One message of a producer's share."""

    producer: int
    seq: int
    key: str

    @property
    def content(self) -> str:
        return f"p{self.producer} s{self.seq}"

    def idempotency_key(self, run: str) -> str:
        return f"{run}:{self.producer}:{self.seq}"


def memory_key(index: int) -> str:
    return f"conv-{index}"


def ref_of(key: str) -> MemoryRef:
    return MemoryRef(TENANT, RESOURCE, key)


def share(producer: int, producers: int, messages: int, memories: int) -> list[Planned]:
    """The messages ``producer`` publishes, in its publish order."""
    return [
        Planned(producer, g // producers, memory_key(g % memories))
        for g in range(producer, messages, producers)
    ]


def plan(producers: int, messages: int, memories: int) -> dict[str, list[tuple[int, int]]]:
    """Every memory's expected (producer, sequence) pairs, each producer's in order."""
    expected: dict[str, list[tuple[int, int]]] = {memory_key(i): [] for i in range(memories)}
    for p in range(producers):
        for m in share(p, producers, messages, memories):
            expected[m.key].append((m.producer, m.seq))
    return expected


async def publish_one(publisher: Publisher, run: str, m: Planned) -> int:
    """Publish ``m``, retrying an unknown outcome with the same key; returns the retries."""
    retries = 0
    deadline = time.monotonic() + RETRY_FOR
    message = Message(
        role=Role.USER, content=m.content, metadata={"producer": m.producer, "seq": m.seq}
    )
    while True:
        try:
            await publisher.append(ref_of(m.key), message, idempotency_key=m.idempotency_key(run))
            return retries
        except (PublishOutcomeUnknownError, RedisUnavailableError) as e:
            if time.monotonic() > deadline:
                raise
            retries += 1
            print(f"retrying {m.idempotency_key(run)}: {e}", file=sys.stderr, flush=True)
            await asyncio.sleep(min(1.0, 0.05 * retries))


async def main(args: argparse.Namespace) -> int:
    mine = share(args.producer, args.producers, args.messages, args.memories)
    client = connect(args.url)
    retries = 0
    started = time.monotonic()
    try:
        publisher = Publisher(client, keys=Keys(args.namespace), default_partitions=16)
        for i, m in enumerate(mine):
            if args.rate > 0:
                ahead = started + i / args.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            retries += await publish_one(publisher, args.run, m)
    finally:
        await client.aclose()
    elapsed = time.monotonic() - started
    print(
        f"producer {args.producer}: published {len(mine)} in {elapsed:.1f}s ({retries} retries)",
        flush=True,
    )
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--run", required=True, help="prefix of the idempotency keys")
    parser.add_argument("--producer", type=int, required=True)
    parser.add_argument("--producers", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True, help="of the whole run")
    parser.add_argument("--memories", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s, 0: unpaced")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
