"""Counting what leaves a client: the round trips that read outcome buckets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from store import RedisClient


@dataclass
class OutcomeReads:
    """The round trips of one client that read outcome buckets, counted as they leave
    the client (its pipelines and single commands), whoever sends them."""

    prefix: str
    round_trips: int = 0
    entries: int = 0
    most: int = 0  # entries asked for in one round trip, at most
    last: int = 0  # entries asked for in the last round trip

    def count(self, commands: list[tuple[Any, ...]]) -> None:
        reads = [
            c
            for c in commands
            if str(c[0]).upper() in ("HGET", "HMGET") and str(c[1]).startswith(self.prefix)
        ]
        if not reads:
            return
        asked = sum(len(c) - 2 for c in reads)
        self.round_trips += 1
        self.entries += asked
        self.most = max(self.most, asked)
        self.last = asked

    def install(self, client: RedisClient, monkeypatch: pytest.MonkeyPatch) -> None:
        make_pipeline = client.pipeline
        send = client.execute_command

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = make_pipeline(*args, **kwargs)
            execute = pipe.execute

            async def counted(*a: Any, **k: Any) -> Any:
                self.count(queued(pipe))
                return await execute(*a, **k)

            pipe.execute = counted  # type: ignore[method-assign]
            return pipe

        async def command(*args: Any, **kwargs: Any) -> Any:
            self.count([args])
            return await send(*args, **kwargs)

        monkeypatch.setattr(client, "pipeline", pipeline)
        monkeypatch.setattr(client, "execute_command", command)


def queued(pipe: Any) -> list[tuple[Any, ...]]:
    """The commands a pipeline holds: a single server's stack, or a Cluster pipeline's."""
    if hasattr(pipe, "command_stack"):
        return [tuple(args) for args, _ in pipe.command_stack]
    found = pipe._queued()
    return list(found) if found is not None else []
