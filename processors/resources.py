"""``memstream resources``: check and list resource files."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from memory import AgentResource, ResourceError, ResourceRegistry, load_resource_file
from processors.clitools import EXIT_ERROR, settings_from


@click.group()
def resources() -> None:
    """Check and list memory resource (and agent) files."""


def _paths(given: tuple[str, ...]) -> list[Path]:
    return [Path(p) for p in given] or settings_from().resource_paths()


@resources.command()
@click.argument("paths", nargs=-1)
def validate(paths: tuple[str, ...]) -> None:
    """Validate resource files (default: the folders of --resources / MEMSTREAM_RESOURCES).

    Every problem of every file is printed; the exit code is 1 if there is any."""
    failed = 0
    loaded = 0
    registry = ResourceRegistry()
    for path in _paths(paths):
        try:
            files = ResourceRegistry.files_of(path)
        except ResourceError as e:
            click.echo(str(e), err=True)
            failed += 1
            continue
        for file in files:
            try:
                item = load_resource_file(file)
                registry.add(item, origin=str(file))
            except ResourceError as e:
                click.echo(str(e), err=True)
                failed += 1
                continue
            loaded += 1
            kind = "agent" if isinstance(item, AgentResource) else "memory"
            click.echo(f"ok: {file}: {kind} {item.id}")
            if not isinstance(item, AgentResource):
                for warning in item.warnings:
                    click.echo(f"warning: {file}: {warning}", err=True)
    click.echo(f"{loaded} file(s) valid, {failed} with errors")
    if failed:
        sys.exit(EXIT_ERROR)


@resources.command("list")
@click.argument("paths", nargs=-1)
def list_resources(paths: tuple[str, ...]) -> None:
    """List the loaded memory resources and agents."""
    try:
        registry = ResourceRegistry.load(_paths(paths))
    except ResourceError as e:
        click.echo(str(e), err=True)
        sys.exit(EXIT_ERROR)
    for resource_id in sorted(registry):
        r = registry[resource_id]
        limit = f"{r.token_limit} tokens" if r.token_limit else f"{r.max_messages} messages"
        click.echo(f"memory {r.id}: {r.type.value}, {limit}, flushing {r.flushing.type.value}")
    for agent in sorted(registry.agents, key=lambda a: a.id):
        refs = ", ".join(f"{m.id} ({m.mode.value})" for m in agent.references)
        click.echo(f"agent {agent.id}: {refs or 'no memory'}")
