"""``memstream dlq``: inspect and replay dead letters."""

from __future__ import annotations

import json
import sys

import click

from processors.app import App
from processors.clitools import run_async, settings_from
from store import DeadLetters


@click.group()
def dlq() -> None:
    """Inspect and replay dead letters."""


@dlq.command("list")
@click.option("--partition", type=int, help="only this partition")
@click.option("--count", type=int, default=100, show_default=True, help="per partition")
@click.option("--json", "as_json_out", is_flag=True)
def list_letters(partition: int | None, count: int, as_json_out: bool) -> None:
    """List dead letters with their reasons."""

    async def go() -> None:
        async with App(settings_from()) as app:
            letters = await DeadLetters(app.client, app.scripts, app.keys).list(partition, count)
        for letter in letters:
            if as_json_out:
                click.echo(
                    json.dumps({"partition": letter.partition, "id": letter.id, **letter.fields})
                )
            else:
                click.echo(
                    f"{letter.partition}/{letter.id}  {letter.reason}: "
                    f"{letter.fields.get('detail', '')}  (entry {letter.fields.get('entry', '?')})"
                )

    run_async(go())


@dlq.command()
@click.argument("partition", type=int)
@click.argument("letter_id")
def replay(partition: int, letter_id: str) -> None:
    """Re-publish dead letter LETTER_ID of PARTITION to its stream (ingest, or lifecycle)."""

    async def go() -> None:
        async with App(settings_from()) as app:
            new_id = await DeadLetters(app.client, app.scripts, app.keys).replay(
                partition, letter_id
            )
        if new_id is None:
            click.echo(f"error: no dead letter {partition}/{letter_id}", err=True)
            sys.exit(1)
        click.echo(f"replayed as {partition}/{new_id}")

    run_async(go())
