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
from store.inflight import InFlight

#: Remnants printed by --verify before "... and N more"; entry ids named per stream.
SHOWN_REMNANTS = 20
SHOWN_ENTRIES = 5
#: How many lease TTLs the erasure waits, by default, for the processors.
WAIT_LEASES = 3


def _tenant(text: str) -> str:
    try:
        return check_tenant(text)
    except DomainError as e:
        raise click.BadParameter(str(e), param_hint="TENANT") from e


def _in_flight(found: list[InFlight] | tuple[InFlight, ...], ids: bool = False) -> str:
    """``cleanup worker w1: 1 entry of ms:lifecycle:{0}``, for each stream."""
    parts = []
    for f in found:
        n = len(f.entries)
        text = f"{f.group} worker {f.worker}: {n} entr{'y' if n == 1 else 'ies'} of {f.stream}"
        if ids:
            more = ", ..." if n > SHOWN_ENTRIES else ""
            text += f" ({', '.join(f.entries[:SHOWN_ENTRIES])}{more})"
        parts.append(text)
    return "; ".join(parts)


def describe(erased: TenantErasure) -> str:
    return (
        f"erased tenant {erased.tenant}: {erased.entries} stream entr"
        f"{'y' if erased.entries == 1 else 'ies'} (ingest {erased.ingest}, changes "
        f"{erased.changes}, flush {erased.flush}, lifecycle {erased.lifecycle}, dead letters "
        f"{erased.dlq}), {erased.keys} key(s), {erased.outcomes} outcome(s)"
    )


async def erase(tenant: str, verify: bool, as_json: bool, wait: float | None) -> None:
    settings = settings_from()
    timeout = settings.lease_ttl * WAIT_LEASES if wait is None else wait

    def waiting(found: list[InFlight]) -> None:
        click.echo(
            f"waiting up to {timeout:g}s for what processors read before an erasure "
            f"removed it: {_in_flight(found)}",
            err=True,
        )

    async with App(settings) as app:
        try:
            partitions = await get_partitions(app.client, app.keys)
        except NotConfiguredError:
            partitions = 0  # nothing was ever published: no partitioned stream to read
        erased = await erase_tenant(
            app.scripts,
            app.keys,
            tenant,
            partitions=partitions,
            wait=timeout,
            waiting=waiting,
        )
        remnants = await tenant_remnants(app.client, app.keys, tenant) if verify else None
    if as_json:
        data = erased.as_json()
        if remnants is not None:
            data["remnants"] = remnants
        click.echo(json.dumps(data))
    else:
        click.echo(describe(erased))
        if remnants == [] and not erased.unsettled:
            click.echo(f"verified: nothing in Redis mentions tenant {tenant} any more")
    if remnants and not as_json:
        for line in remnants[:SHOWN_REMNANTS]:
            click.echo(f"remains: {line}", err=True)
        if len(remnants) > SHOWN_REMNANTS:
            click.echo(f"... and {len(remnants) - SHOWN_REMNANTS} more", err=True)
        click.echo(
            f"{len(remnants)} remnant(s) of tenant {tenant}: stop its producers and run "
            "erase-tenant again",
            err=True,
        )
    if erased.unsettled and not as_json:
        click.echo(
            f"still in flight after {timeout:g}s: {_in_flight(erased.unsettled, ids=True)}. "
            f"What they do with these entries may name tenant {tenant} again (a workflow's "
            "end sent to the ingest streams, a memory's flush lock): run erase-tenant again "
            "once `memstream status` shows those processors caught up",
            err=True,
        )
    if remnants or erased.unsettled:
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
    @click.option(
        "--wait",
        type=click.FloatRange(min=0),
        default=None,
        metavar="SECONDS",
        help="how long to wait (twice at most) for processors to finish what they read "
        "before the erasure removed it: a workflow's end the cleanup processor is sending, "
        f"a flush (default: {WAIT_LEASES} lease TTLs); exit 1 if they have not",
    )
    @command
    async def erase_tenant_cmd(
        tenant: str, yes: bool, verify: bool, as_json_out: bool, wait: float | None
    ) -> None:
        """Erase everything of TENANT, for good: every memory (messages, summaries,
        backups, token counts, tombstones), its indexes and locks, its events in the
        ingest, changes, flush and lifecycle streams, its dead letters, and the outcomes
        that name it. Needs --yes.

        Stop the tenant's producers first (its agents, and the workflow engine for its
        workflows): events published during the erasure may survive it (run with
        --verify). The processors may keep running: an event the appender applies late
        is settled as erased, and the erasure waits (--wait) for the cleanup processor
        to finish sending a workflow's end it had read and for the summarizer to finish
        a flush it had started, then removes what they wrote; it exits 1, naming them,
        if they have not finished by then. An event published afterwards starts a new
        memory: nothing of the old one is left, not even its tombstone.
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
        await erase(name, verify, as_json_out, wait)
