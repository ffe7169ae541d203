"""The ``memstream`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import signal
import sys
from typing import Any

import click
from pydantic import ValidationError

from events.schema import event_schema_text
from memory import AgentResource, DomainError, MemoryRef, MemoryResource, Message, Role
from processors import dlq as dead_letters
from processors import erasecli, flushcli, gatewaycli, lifecli, opscli, repartcli
from processors.accountant import Accountant
from processors.app import App
from processors.appender import Appender
from processors.cleanup import Cleanup
from processors.clitools import EXIT_ERROR, EXIT_REFUSED, command, settings_from
from processors.logs import setup_logging
from processors.resources import resources
from processors.runtime import Worker
from processors.status import as_json, group_status, render
from processors.summarizer import Summarizer
from processors.supervisor import WorkerCommand, supervise
from processors.tokenizers import Tokenizers
from store import GenerationChangedError, Group, find_embedded

PROCESSORS = ("appender", "accountant", "summarizer", "cleanup", "all")
log = logging.getLogger(__name__)


def _ref(text: str, stored: bool = False) -> MemoryRef:
    """REF is TENANT/RESOURCE/KEY with the key as rendered (sanitized here), or with
    ``--stored-key`` the key as stored (as ``read --json`` and the dead letters show it)."""
    try:
        if stored:
            tenant, resource, key = [*text.split("/", 2), "", ""][:3]
            return MemoryRef(tenant, resource, key)
        return MemoryRef.parse(text)
    except DomainError as e:
        raise click.BadParameter(str(e), param_hint="REF") from e


STORED_KEY = click.option(
    "--stored-key", is_flag=True, help="KEY is the stored (sanitized) key, not the rendered one"
)


@click.group()
@click.version_option(package_name="memstream")
def main() -> None:
    """memstream: shared, token-budgeted conversation memory for LLM agents, on Redis Streams.

    Without REDIS_URL, `memstream run` starts an embedded Redis and every other command
    finds it.
    """


@main.command()
@click.argument("processor", type=click.Choice(PROCESSORS), default="all")
@click.option("--resources", help="colon-separated folders or files of memory resources")
@click.option("--partitions", type=int, help="partition count, stored on first start")
@click.option("--until-idle", is_flag=True, help="stop once every owned partition is idle")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="serve Prometheus metrics on this port (with --workers: this port and the next ones)",
)
@click.option(
    "--workers",
    "processes",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="run this many worker processes, supervised (each a member of the groups)",
)
@command
async def run(
    processor: str,
    resources: str | None,
    partitions: int | None,
    until_idle: bool,
    metrics_port: int | None,
    processes: int,
) -> None:
    """Run processors (all of them in one process by default)."""
    settings = settings_from(resources=resources, partitions=partitions, metrics_port=metrics_port)
    setup_logging(settings.log_level, settings.log_format)
    registry = App(settings).registry()
    if processes > 1:
        command = WorkerCommand(processor, resources, partitions, until_idle, settings.metrics_port)
        async with App(settings, start_embedded=True) as app:
            await app.partitions()  # stored once, before the workers race to store it
            click.echo(
                f"memstream {processor}: {processes} worker processes, Redis at "
                f"{app.describe()}; Ctrl-C stops",
                err=True,
            )
            code = await supervise(command, processes, app.url)
        if code:
            sys.exit(code)
        return
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings, start_embedded=True) as app:
        workers = []
        if processor in ("appender", "all"):
            workers.append(await app.appender(registry))
        tokenizers = (
            Tokenizers(threads=settings.count_threads)
            if processor in ("accountant", "summarizer", "all")
            else None
        )
        if processor in ("accountant", "all") and tokenizers:
            workers.append(await app.accountant(registry, tokenizers))
        if processor in ("summarizer", "all") and tokenizers:
            workers.append(await app.summarizer(registry, tokenizers))
        if processor in ("cleanup", "all"):
            workers.append(await app.cleanup(registry))
        loop.add_signal_handler(signal.SIGHUP, reload_resources, workers)
        if settings.metrics_port:
            app.metrics.serve(settings.metrics_port, settings.metrics_addr)
            click.echo(
                f"metrics on http://{settings.metrics_addr}:{settings.metrics_port}/metrics",
                err=True,
            )
        click.echo(
            f"memstream {processor}: {len(registry)} resource(s), {await app.partitions()} "
            f"partitions, Redis at {app.describe()}; Ctrl-C stops",
            err=True,
        )
        # Start-up objects (modules, models, resources: some 65,000) live as long as the
        # process. Left out of every collection, the collector's full passes, which the
        # workers' allocations trigger, stop walking them (25-40 ms a pass).
        gc.collect()
        gc.freeze()
        try:
            async with asyncio.TaskGroup() as tg:
                for worker in workers:
                    tg.create_task(worker.run(stop, until_idle=until_idle))
        finally:
            if tokenizers is not None:
                tokenizers.close()


def reload_resources(workers: list[Worker]) -> None:
    """SIGHUP: read the resource files again; keep the loaded ones if any file fails."""
    processors = [
        w.processor
        for w in workers
        if isinstance(w.processor, Appender | Accountant | Summarizer | Cleanup)
    ]
    if not processors:
        return
    try:
        fresh = processors[0].registry.reload()
    except DomainError as e:
        log.error("resources not reloaded, the loaded ones stay in use: %s", e)
        return
    for processor in processors:
        processor.registry = fresh
    log.info(
        "resources reloaded: %d memory resource(s), %d agent(s)", len(fresh), len(fresh.agents)
    )


@main.command()
@click.argument("ref")
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), default="user", show_default=True
)
@click.option("--content", required=True, help="the message text")
@click.option("--name", help="the author's name")
@click.option("--workflow", "workflow_id", help="the workflow writing the memory")
@click.option("--agent", "agent_id", help="the agent writing the memory")
@click.option("--idempotency-key", help="a repeat with the same key is applied once")
@click.option("--wait", is_flag=True, help="wait for the outcome (applied, or refused and why)")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.option("--json", "as_json_out", is_flag=True, help="print JSON")
@STORED_KEY
@command
async def publish(
    ref: str,
    role: str,
    content: str,
    name: str | None,
    workflow_id: str | None,
    agent_id: str | None,
    idempotency_key: str | None,
    wait: bool,
    timeout: float,
    as_json_out: bool,
    stored_key: bool,
) -> None:
    """Append a message to the memory REF (TENANT/RESOURCE/KEY)."""
    memory = _ref(ref, stored_key)
    try:
        message = Message(role=Role(role), content=content, name=name)
    except ValidationError as e:
        raise click.BadParameter(e.errors()[0]["msg"]) from e
    settings = settings_from()
    async with App(settings) as app:
        published = await app.publisher().append(
            memory,
            message,
            workflow_id=workflow_id,
            agent_id=agent_id,
            idempotency_key=idempotency_key,
            wait=wait,
            timeout=timeout,
        )
    r, outcome = published.receipt, published.outcome
    if r is None:
        assert outcome is not None
        if as_json_out:
            click.echo(json.dumps({"outcome": {k: v for k, v in vars_of(outcome).items() if v}}))
        else:
            click.echo(f"not published: {outcome.reason}: {outcome.detail}")
        sys.exit(EXIT_REFUSED)
    if as_json_out:
        data: dict[str, Any] = {
            "token": r.token,
            "partition": r.partition,
            "entry_id": r.entry_id,
            "event_id": r.event_id,
            "idempotency_key": r.idempotency_key,
        }
        if outcome is not None:
            data["outcome"] = {k: v for k, v in vars_of(outcome).items() if v is not None}
        click.echo(json.dumps(data))
    else:
        click.echo(f"published {r.token} (partition {r.partition}, entry {r.entry_id})")
        if outcome is not None:
            if outcome.ok:
                click.echo(f"{outcome.status}: seq {outcome.seq}, generation {outcome.gen}")
            else:
                click.echo(f"{outcome.status}: {outcome.reason}: {outcome.detail}")
    if outcome is not None and not outcome.ok:
        sys.exit(EXIT_REFUSED)


def vars_of(obj: object) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in getattr(obj, "__slots__", ())}


@main.command()
@click.argument("ref")
@click.option("--last", type=click.IntRange(min=1), help="the newest N messages")
@click.option("--after", type=click.IntRange(min=0), help="messages after this sequence (a page)")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="page size with --after",
)
@click.option(
    "--generation",
    type=click.IntRange(min=0),
    help="with --after: fail (exit 3) if the memory is no longer at this generation",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    help="what fits a context of N tokens: protected messages first, then the newest",
)
@click.option("--json", "as_json_out", is_flag=True, help="print JSON")
@STORED_KEY
@command
async def read(
    ref: str,
    last: int | None,
    after: int | None,
    limit: int,
    generation: int | None,
    budget: int | None,
    as_json_out: bool,
    stored_key: bool,
) -> None:
    """Print the memory REF (TENANT/RESOURCE/KEY), oldest message first."""
    memory = _ref(ref, stored_key)
    if sum(x is not None for x in (last, after, budget)) > 1:
        raise click.UsageError("pass one of --last, --after and --budget")
    fit: dict[str, Any] = {}
    async with App(settings_from()) as app:
        reader = app.reader()
        if budget is not None:
            resource = app.registry().get_resource(memory.resource)
            counter = Tokenizers().for_resource(resource)
            window = await reader.read_context(memory, resource, counter, budget=budget)
            await reader.touches_done()
            view = dataclasses.replace(window.view, messages=window.messages)
            fit = {"tokens": window.tokens, "budget": budget, "over_budget": window.over_budget}
        else:
            try:
                view = await reader.read(
                    memory, last=last, after=after, limit=limit, generation=generation
                )
            except GenerationChangedError as e:
                click.echo(f"error: {e}", err=True)
                sys.exit(EXIT_REFUSED)
    if as_json_out:
        click.echo(
            json.dumps(
                {
                    "memory": memory.memory_id,
                    "partition": view.partition,
                    "exists": view.exists,
                    "generation": view.generation,
                    "count": view.count,
                    "watermark": view.watermark,
                    "next_after": view.next_after,
                    **fit,
                    "messages": [
                        m.model_dump(mode="json", exclude_none=True) for m in view.messages
                    ],
                }
            )
        )
        return
    if not view.exists:
        click.echo(f"# {memory.memory_id}: no such memory (generation {view.generation})")
        return
    click.echo(
        f"# {memory.memory_id}: generation {view.generation}, {view.count} message(s), "
        f"showing {len(view.messages)}"
        + (f" ({fit['tokens']} of {budget} tokens)" if fit else "")
        + (" OVER BUDGET: protected messages alone exceed it" if fit.get("over_budget") else "")
    )
    for m in view.messages:
        content = m.content if isinstance(m.content, str) else json.dumps(m.model_dump()["content"])
        who = f"{m.role.value}({m.name})" if m.name else m.role.value
        click.echo(f"[{m.seq}] {who}: {content}")


@main.command()
@click.argument("ref")
@STORED_KEY
@command
async def recount(ref: str, stored_key: bool) -> None:
    """Recompute the token total of REF from its messages and compare it with the
    accountant's (they agree once the accountant has caught up)."""
    memory = _ref(ref, stored_key)
    settings = settings_from()
    async with App(settings) as app:
        resource = app.registry().get_resource(memory.resource)
        counter = Tokenizers().for_resource(resource)
        view = await app.reader().read(memory)
    recomputed = sum(counter.message(m) for m in view.messages)
    stored = sum(c for c in view.token_counts if c is not None)
    lagging = view.count - view.counted
    click.echo(
        f"{memory.memory_id}: {view.count} message(s); total {view.tokens} "
        f"(stored counts add up to {stored}); recomputed {recomputed} with {counter.name}"
        + (f"; {lagging} not counted yet" if lagging else "")
    )
    if lagging == 0 and recomputed != view.tokens:
        click.echo("error: the stored total disagrees with the messages", err=True)
        sys.exit(EXIT_REFUSED)


@main.command()
@click.option("--json", "as_json_out", is_flag=True, help="print JSON")
@command
async def status(as_json_out: bool) -> None:
    """Partitions, owners, fencing tokens, lag and dead letters."""
    settings = settings_from()
    async with App(settings) as app:
        info = await app.client.info("server")
        ttl = int(settings.lease_ttl * 1000)
        result = await group_status(app.client, app.scripts, app.keys, Group.APPENDER, ttl)
        counting = await group_status(app.client, app.scripts, app.keys, Group.ACCOUNTANT, ttl)
        flushing = await group_status(app.client, app.scripts, app.keys, Group.SUMMARIZER, ttl)
        ending = await group_status(app.client, app.scripts, app.keys, Group.CLEANUP, ttl)
        if as_json_out:
            data = {
                "redis": app.describe(),
                **as_json(result),
                "accountant": as_json(counting),
                "summarizer": as_json(flushing),
                "cleanup": as_json(ending),
            }
            click.echo(json.dumps(data))
            return
        version = info.get("redis_version", "?") if isinstance(info, dict) else "?"
        click.echo(
            f"redis: {app.describe()} (version {version}), {len(result.partitions)} partitions"
        )
        click.echo(render(result))
        click.echo(render(counting))
        click.echo(render(flushing))
        click.echo(render(ending))


@main.command()
@click.argument("what", type=click.Choice(["events", "resource", "agent"]), default="events")
def schema(what: str) -> None:
    """Print a JSON Schema: the event contract, or a resource file's format (memory
    resource or agent), for editors."""
    if what == "events":
        click.echo(event_schema_text(), nl=False)
    else:
        model = MemoryResource if what == "resource" else AgentResource
        click.echo(json.dumps(model.model_json_schema(), indent=2, sort_keys=True))


@main.command()
def url() -> None:
    """Print the URL of the Redis server memstream uses, for other programs: REDIS_URL,
    else the embedded server that `memstream run` started (exit 1 when none runs)."""
    settings = settings_from()
    if settings.redis_url:
        click.echo(settings.redis_url)
        return
    running = find_embedded()
    if running is None:
        click.echo(
            "error: no REDIS_URL and no embedded Redis running: start one with `memstream "
            "run`, or set REDIS_URL",
            err=True,
        )
        sys.exit(EXIT_ERROR)
    click.echo(running.url)


main.add_command(dead_letters.dlq)
flushcli.register(main, _ref, STORED_KEY)
opscli.register(main, _ref, STORED_KEY)
lifecli.register(main)
erasecli.register(main)
gatewaycli.register(main)
repartcli.register(main)
main.add_command(resources)

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        main()
