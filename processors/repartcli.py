"""``memstream repartition N``: change the partition count (drain, move, reset
watermarks), with every processor stopped."""

from __future__ import annotations

import json
import sys
import time

import click

from processors.app import App
from processors.clitools import EXIT_REFUSED, command, settings_from
from store.errors import RepartitionRefusedError
from store.repartition import Repartitioned, Repartitioner

#: How often --wait-drained says what it still waits for.
WAIT_REPORT_SECONDS = 10.0


def describe(done: Repartitioned) -> str:
    if done.old == done.new and not done.resumed:
        if not done.forwarded:
            return f"the partition count is {done.new} already: nothing to do"
        return (
            f"the partition count is {done.new} already: {done.forwarded} event(s) published "
            f"with an older count forwarded from partitions past it"
        )
    return (
        f"{'finished the change' if done.resumed else 'changed the partition count'} from "
        f"{done.old} to {done.new} partitions in {done.seconds:.1f}s: {done.moved} "
        f"memor{'y' if done.moved == 1 else 'ies'} moved, {done.kept} kept, "
        f"{done.index_entries} index entr{'y' if done.index_entries == 1 else 'ies'} moved, "
        f"{done.ended} ended-workflow record(s) copied, {done.letters} dead letter(s) "
        f"re-homed, {done.forwarded} waiting event(s) forwarded, {done.streams_deleted} "
        f"stream(s) deleted; start the processors, then the producers"
    )


async def repartition(partitions: int, wait: float, as_json: bool) -> None:
    settings = settings_from()
    last = [0.0]

    def waiting(problems: list[str]) -> None:
        if time.monotonic() - last[0] >= WAIT_REPORT_SECONDS:
            last[0] = time.monotonic()
            click.echo("waiting: " + "; ".join(problems), err=True)

    async with App(settings) as app:
        tool = Repartitioner(
            app.client, app.scripts, app.keys, member_ttl_ms=int(settings.lease_ttl * 1000)
        )
        try:
            done = await tool.run(partitions, wait=wait, on_wait=waiting)
        except RepartitionRefusedError as e:
            if as_json:
                click.echo(json.dumps({"refused": e.problems}))
            click.echo("refused: the partition count was not changed:", err=True)
            for problem in e.problems:
                click.echo(f"  {problem}", err=True)
            sys.exit(EXIT_REFUSED)
    click.echo(json.dumps(done.as_json()) if as_json else describe(done))


def register(main: click.Group) -> None:
    """Add ``repartition`` to ``main``."""

    @main.command("repartition")
    @click.argument("partitions", type=click.IntRange(1, 16384))
    @click.option("--yes", is_flag=True, help="really change the partition count")
    @click.option(
        "--wait-drained",
        "wait",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="seconds to wait for the streams to drain and the processors to stop",
    )
    @click.option("--json", "as_json_out", is_flag=True, help="print what was done as JSON")
    @command
    async def repartition_cmd(partitions: int, yes: bool, wait: float, as_json_out: bool) -> None:
        """Change the partition count to PARTITIONS: move every memory whose partition
        changes (messages, tombstone, idempotency keys, token counts, backup, index
        entries, dead letters) and reset its watermark. Needs --yes.

        First stop the producers, let the processors drain (`memstream status`: lag and
        pending 0 everywhere), then stop every processor. Without that it refuses (exit
        3) and says what is wrong; --wait-drained SECONDS polls that long first. While
        it runs, processors refuse to start. If it is interrupted, run the same command
        again: it goes on where it stopped. Then start the processors, then restart the
        producers and readers (they read the count once). With the current count it only
        forwards the events that producers using an older count left in partitions past
        it."""
        if not yes:
            raise click.UsageError(
                f"repartition moves memories between partitions and needs every "
                f"processor stopped: pass --yes to change the count to {partitions}"
            )
        await repartition(partitions, wait, as_json_out)
