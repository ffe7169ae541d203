"""``memstream erase-tenant``: erase everything one tenant left in Redis (its memories,
their backups, tombstones, indexes and locks, its stream entries and dead letters, the
outcomes that name it), for a request to forget a customer."""

from __future__ import annotations

import json
import sys

import click

from memory import DomainError
from memory.ref import check_tenant
from processors.app import App
from processors.clitools import EXIT_ERROR, command, settings_from
from store import NotConfiguredError, get_partitions
from store.erasure import TenantErasure, erase_tenant, tenant_remnants

#: Remnants printed by --verify before "... and N more".
SHOWN_REMNANTS = 20


def _tenant(text: str) -> str:
    try:
        return check_tenant(text)
    except DomainError as e:
        raise click.BadParameter(str(e), param_hint="TENANT") from e


def describe(erased: TenantErasure) -> str:
    return (
        f"erased tenant {erased.tenant}: {erased.entries} stream entr"
        f"{'y' if erased.entries == 1 else 'ies'} (ingest {erased.ingest}, changes "
        f"{erased.changes}, flush {erased.flush}, lifecycle {erased.lifecycle}, dead letters "
        f"{erased.dlq}), {erased.keys} key(s), {erased.outcomes} outcome(s)"
    )


async def erase(tenant: str, verify: bool, as_json: bool) -> None:
    async with App(settings_from()) as app:
        try:
            partitions = await get_partitions(app.client, app.keys)
        except NotConfiguredError:
            partitions = 0  # nothing was ever published: no partitioned stream to read
        erased = await erase_tenant(app.scripts, app.keys, tenant, partitions=partitions)
        remnants = await tenant_remnants(app.client, app.keys, tenant) if verify else None
    if as_json:
        data = erased.as_json()
        if remnants is not None:
            data["remnants"] = remnants
        click.echo(json.dumps(data))
    else:
        click.echo(describe(erased))
        if remnants == []:
            click.echo(f"verified: nothing in Redis mentions tenant {tenant} any more")
    if remnants:
        if not as_json:
            for line in remnants[:SHOWN_REMNANTS]:
                click.echo(f"remains: {line}", err=True)
            if len(remnants) > SHOWN_REMNANTS:
                click.echo(f"... and {len(remnants) - SHOWN_REMNANTS} more", err=True)
            click.echo(
                f"{len(remnants)} remnant(s) of tenant {tenant}: stop its producers and run "
                "erase-tenant again",
                err=True,
            )
        sys.exit(EXIT_ERROR)


def register(main: click.Group) -> None:
    """Add ``erase-tenant`` to ``main``."""

    @main.command("erase-tenant")
    @click.argument("tenant")
    @click.option("--yes", is_flag=True, help="really erase everything of TENANT")
    @click.option(
        "--verify",
        is_flag=True,
        help="then read every key and value (slow on a large Redis); exit 1 if any names TENANT",
    )
    @click.option("--json", "as_json_out", is_flag=True, help="print the counts as JSON")
    @command
    async def erase_tenant_cmd(tenant: str, yes: bool, verify: bool, as_json_out: bool) -> None:
        """Erase everything of TENANT, for good: every memory (messages, summaries,
        backups, token counts, tombstones), its indexes and locks, its events in the
        ingest, changes, flush and lifecycle streams, its dead letters, and the outcomes
        that name it. Needs --yes.

        Stop the tenant's producers first: events published during the erasure may
        survive it, and so may an event a worker is applying at that moment (run with
        --verify, and again if it reports anything). An event published afterwards
        starts a new memory: nothing of the old one is left, not even its tombstone.
        Sequence and generation counters are partition-wide and hold no tenant data:
        they stay. Redis frees a deleted stream entry's bytes only when the stream is
        trimmed past its whole node, so until then they remain in memory and in RDB
        snapshots; snapshots and append-only files written before the erasure hold
        the data until they are rewritten or expire.
        """
        name = _tenant(tenant)
        if not yes:
            raise click.UsageError(
                f"erase-tenant removes every memory, stream entry, dead letter and outcome "
                f"of tenant {name}, for good: pass --yes"
            )
        await erase(name, verify, as_json_out)
