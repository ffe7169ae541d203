"""Workflow lifecycle and inventory from the command line: ``workflow started`` and
``workflow terminated`` (what a workflow engine publishes), and ``ls`` (the memories of
a tenant, a resource or a workflow, from the indexes: no SCAN)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import click

from events import WorkflowStatus
from memory.privacy import workflow_names
from memory.ref import check_resource_id, check_tenant
from processors.app import App
from processors.clitools import EXIT_REFUSED, command, settings_from
from store import list_memories
from store.acl import processor_rules, producer_rules, setuser
from store.inventory import Listed


def _when(ms: int | None) -> str:
    if ms is None:
        return "no expiry"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _tenant(value: str) -> str:
    try:
        return check_tenant(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tenant") from e


async def workflow_event(
    kind: str,
    tenant: str,
    workflow_id: str,
    status: str,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    settings = settings_from()
    async with App(settings) as app:
        publisher = app.publisher(resources=False)
        if kind == "started":
            published = await publisher.workflow_started(
                tenant, workflow_id, wait=wait, timeout=timeout
            )
        else:
            published = await publisher.workflow_terminated(
                tenant, workflow_id, status, wait=wait, timeout=timeout
            )
    receipt, outcome = published.receipt, published.outcome
    assert receipt is not None
    if as_json:
        data: dict[str, object] = {"entry_id": receipt.entry_id, "event_id": receipt.event_id}
        if outcome is not None:
            data["outcome"] = {
                "status": outcome.status.value,
                "reason": outcome.reason,
                "detail": outcome.detail,
            }
        click.echo(json.dumps(data))
    else:
        click.echo(f"published workflow {kind} {tenant}/{workflow_id} (entry {receipt.entry_id})")
        if outcome is not None:
            why = f"{outcome.reason}: " if outcome.reason else ""
            click.echo(f"{outcome.status.value}: {why}{outcome.detail or ''}")
    if outcome is not None and not outcome.ok:
        sys.exit(EXIT_REFUSED)


async def _listed(
    app: App, tenant: str, resource: str | None, workflows: list[str | None]
) -> AsyncIterator[Listed]:
    for workflow in workflows:
        async for listed in list_memories(
            app.client, app.keys, tenant, resource=resource, workflow=workflow
        ):
            yield listed


async def ls(
    tenant: str, resource: str | None, workflow: str | None, limit: int, as_json: bool
) -> None:
    shown = 0
    async with App(settings_from()) as app:
        # Named as the appender names it (its pseudonym, maybe): without the resources,
        # both names are looked for.
        names: list[str | None] = [None]
        if workflow is not None:
            registry = app.registry_if_present()
            found = [registry.workflow_name(workflow)] if registry else workflow_names(workflow)
            names = list(found)
        async for listed in _listed(app, tenant, resource, names):
            if shown >= limit:
                click.echo(f"(more: raise --limit above {limit})", err=True)
                break
            shown += 1
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "memory": listed.memory_id,
                            "partition": listed.partition,
                            "expires_at_ms": listed.expires_at_ms,
                        }
                    )
                )
            else:
                click.echo(
                    f"{listed.memory_id}  (partition {listed.partition}, expires "
                    f"{_when(listed.expires_at_ms)})"
                )
    if not as_json:
        click.echo(f"{shown} memor{'y' if shown == 1 else 'ies'}", err=True)


def register(main: click.Group) -> None:
    """Add the commands to ``main``."""

    @main.command("acl")
    @click.option("--processor-user", default="memstream-processor", show_default=True)
    @click.option("--producer-user", default="memstream-producer", show_default=True)
    @click.option(
        "--redis",
        "redis_version",
        type=click.Choice(["6.2", "7"]),
        default="7",
        show_default=True,
        help="the server's major version (7 also denies FUNCTION)",
    )
    def acl_cmd(processor_user: str, producer_user: str, redis_version: str) -> None:
        """Print the ACL SETUSER commands of the Redis users memstream needs (for the
        namespace of MEMSTREAM_NAMESPACE): processors (and the CLI) get the namespace's
        keys and no administration; producers may only publish and wait for outcomes.
        Replace the passwords; connect with redis://USER:PASSWORD@host:port."""
        namespace = settings_from().namespace
        for user, rules in (
            (processor_user, processor_rules(namespace, redis7=redis_version == "7")),
            (producer_user, producer_rules(namespace)),
        ):
            click.echo(" ".join(setuser(user, "CHANGE-ME", rules)))

    @main.command("workflow")
    @click.argument("kind", type=click.Choice(["started", "terminated"]))
    @click.argument("workflow_id")
    @click.option("--tenant", required=True, help="the tenant (project) the workflow runs for")
    @click.option(
        "--status",
        type=click.Choice([s.value for s in WorkflowStatus]),
        default=WorkflowStatus.COMPLETED.value,
        show_default=True,
        help="terminated: how the workflow ended",
    )
    @click.option("--wait", is_flag=True, help="wait until the cleanup processor handled it")
    @click.option("--timeout", type=float, default=10.0, show_default=True)
    @click.option("--json", "as_json_out", is_flag=True, help="print JSON")
    @command
    async def workflow_cmd(
        kind: str,
        workflow_id: str,
        tenant: str,
        status: str,
        wait: bool,
        timeout: float,
        as_json_out: bool,
    ) -> None:
        """Publish that workflow WORKFLOW_ID started or terminated (to the lifecycle
        stream). A termination ends the workflow in every partition: its later writes are
        refused, and each memory it wrote runs its resource's cleanup.on_workflow_end
        policy (delete, expire after grace, keep) once no live workflow writes it."""
        await workflow_event(kind, _tenant(tenant), workflow_id, status, wait, timeout, as_json_out)

    @main.command("ls")
    @click.argument("tenant")
    @click.option("--resource", help="only the memories of this resource")
    @click.option("--workflow", help="only the memories this live workflow wrote")
    @click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
    @click.option("--json", "as_json_out", is_flag=True, help="print one JSON object per line")
    @command
    async def ls_cmd(
        tenant: str,
        resource: str | None,
        workflow: str | None,
        limit: int,
        as_json_out: bool,
    ) -> None:
        """List the live memories of TENANT (of one resource, or of one workflow), from
        the inventory indexes: no SCAN of the server."""
        if resource is not None and workflow is not None:
            raise click.UsageError("use --resource or --workflow, not both")
        if resource is not None:
            try:
                check_resource_id(resource)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--resource") from e
        await ls(_tenant(tenant), resource, workflow, limit, as_json_out)
