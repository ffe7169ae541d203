"""``memstream dlq``: inspect and replay dead letters."""

from __future__ import annotations

import contextlib
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


@dlq.command("show")
@click.argument("partition", type=int)
@click.argument("letter_id")
@click.option("--json", "as_json_out", is_flag=True)
def show(partition: int, letter_id: str, as_json_out: bool) -> None:
    """Show dead letter LETTER_ID of PARTITION whole: why, when, how often it failed, and
    the event it keeps (redacted by its resource's privacy policy)."""

    async def go() -> None:
        async with App(settings_from()) as app:
            letter = await DeadLetters(app.client, app.scripts, app.keys).get(partition, letter_id)
        if letter is None:
            click.echo(f"error: no dead letter {partition}/{letter_id}", err=True)
            sys.exit(1)
        fields = dict(letter.fields)
        event_text = fields.pop("event", None)
        event: object = event_text
        if event_text is not None:
            with contextlib.suppress(ValueError):  # not JSON: shown as it was
                event = json.loads(event_text)
        if as_json_out:
            click.echo(
                json.dumps({"partition": partition, "id": letter_id, **fields, "event": event})
            )
            return
        click.echo(f"dead letter {partition}/{letter_id}")
        for name, value in fields.items():
            click.echo(f"  {name}: {value}")
        if event is not None:
            shown = json.dumps(event, indent=2) if not isinstance(event, str) else event
            click.echo("  event:\n" + "\n".join(f"    {line}" for line in shown.splitlines()))
        click.echo(f"replay it after a fix: memstream dlq replay {partition} {letter_id}")

    run_async(go())


@dlq.command()
@click.argument("partition", type=int)
@click.argument("letter_id")
def replay(partition: int, letter_id: str) -> None:
    """Re-publish dead letter LETTER_ID of PARTITION to its stream (ingest, or lifecycle)."""

    async def go() -> None:
        async with App(settings_from()) as app:
            routed = await DeadLetters(app.client, app.scripts, app.keys).replay_routed(
                partition, letter_id
            )
        if routed is None:
            click.echo(f"error: no dead letter {partition}/{letter_id}", err=True)
            sys.exit(1)
        click.echo(f"replayed as {routed[0]}/{routed[1]}")

    run_async(go())
