"""``memstream flush`` and ``memstream health``: flush a memory by hand (or see what a
flush would do), and a memory's budget, contents and flush history."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable

import click

from memory import FlushStrategy, MemoryRef
from memory.flush import plan_flush
from processors.app import App
from processors.clitools import EXIT_REFUSED, command, settings_from
from processors.health import health_of, render
from processors.summarizer import counted
from processors.tokenizers import Tokenizers
from store import Flushes

STRATEGIES = click.Choice([s.value for s in FlushStrategy])


def _finished(meta: dict[str, str], since_ms: int) -> str | None:
    """How the first flush attempt ending after ``since_ms`` ended, if one did."""
    if int(meta.get("last_flush_at") or 0) >= since_ms:
        return (
            f"applied ({meta.get('last_flush_strategy')}, {meta.get('last_flush_removed')} removed)"
        )
    if int(meta.get("last_flush_note_at") or 0) >= since_ms:
        return f"ended: {meta.get('last_flush_note')}"
    return None


async def flush_memory(
    memory: MemoryRef,
    strategy: str | None,
    dry_run: bool,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    settings = settings_from()
    async with App(settings) as app:
        registry = app.registry()
        resource = registry.get_resource(memory.resource)
        chosen = FlushStrategy(strategy) if strategy else None
        if dry_run:
            # A dry run needs no ordering: plan here, from a snapshot, and change nothing.
            counter = Tokenizers().for_resource(resource)
            p = await app.reader().partition_of(memory)
            snapshot = await Flushes(app.scripts, app.keys).snapshot(p, memory.memory_id)
            if not snapshot.exists:
                click.echo(f"{memory.memory_id}: no such memory", err=True)
                sys.exit(EXIT_REFUSED)
            plan = plan_flush(counted(snapshot, counter), resource, chosen)
            click.echo(json.dumps(plan.describe()) if as_json else _describe(plan.describe()))
            return
        publisher = app.publisher(registry)
        started = int(time.time() * 1000)
        published = await publisher.request_flush(
            memory, strategy=chosen, wait=True, timeout=timeout
        )
        outcome = published.outcome
        if outcome is None or not outcome.ok:
            reason = f"{outcome.reason}: {outcome.detail}" if outcome else "not published"
            click.echo(f"flush refused: {reason}", err=True)
            sys.exit(EXIT_REFUSED)
        if not wait:
            click.echo(f"flush requested ({published.receipt.token if published.receipt else '-'})")
            return
        reader = app.reader()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = await reader.read(memory, last=1)
            ended = _finished(view.meta, started - 1000)
            if ended:
                click.echo(
                    f"{memory.memory_id}: flush {ended}; "
                    f"{view.tokens} tokens, {view.count} message(s)"
                )
                return
            await asyncio.sleep(0.1)
        click.echo(
            f"the flush of {memory.memory_id} did not end within {timeout:g}s "
            "(is a summarizer running?)",
            err=True,
        )
        sys.exit(EXIT_REFUSED)


def _describe(plan: dict[str, object]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in plan.items())


async def memory_health(memory: MemoryRef, as_json: bool) -> None:
    async with App(settings_from()) as app:
        resource = app.registry().get_resource(memory.resource)
        view = await app.reader().read(memory)
    health = health_of(view, resource, Tokenizers().for_resource(resource))
    click.echo(json.dumps(health.as_json()) if as_json else render(health))


def register(
    main: click.Group,
    ref_of: Callable[[str, bool], MemoryRef],
    stored_key: Callable[[Callable[..., None]], Callable[..., None]],
) -> None:
    """Add the commands to ``main`` (REF parsing and --stored-key are the CLI's)."""

    @main.command()
    @click.argument("ref")
    @click.option("--strategy", type=STRATEGIES, help="instead of the resource's strategy")
    @click.option("--dry-run", is_flag=True, help="print the plan and change nothing")
    @click.option("--wait", is_flag=True, help="wait until a summarizer has ended the flush")
    @click.option("--timeout", type=float, default=30.0, show_default=True)
    @click.option("--json", "as_json_out", is_flag=True, help="print JSON")
    @stored_key
    @command
    async def flush(
        ref: str,
        strategy: str | None,
        dry_run: bool,
        wait: bool,
        timeout: float,
        as_json_out: bool,
        stored_key: bool,
    ) -> None:
        """Flush the memory REF now (through its partition, in order with its appends),
        or with --dry-run show what a flush would remove and summarize."""
        await flush_memory(ref_of(ref, stored_key), strategy, dry_run, wait, timeout, as_json_out)

    @main.command()
    @click.argument("ref")
    @click.option("--json", "as_json_out", is_flag=True, help="print JSON")
    @stored_key
    @command
    async def health(ref: str, as_json_out: bool, stored_key: bool) -> None:
        """Budget use, contents by priority and role, pending and past flushes of REF."""
        await memory_health(ref_of(ref, stored_key), as_json_out)
