"""``memstream gateway`` (serve the HTTP gateway) and ``memstream apikey`` (the
gateway's per-tenant API keys)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator

import click

from processors.app import App
from processors.clitools import EXIT_REFUSED, command, settings_from
from processors.logs import setup_logging
from store.apikeys import ApiKeys


async def serve(host: str | None, port: int | None, resources: str | None) -> None:
    import uvicorn  # the web stack loads only for the gateway, not for every command

    from processors.gateway import create_gateway

    settings = settings_from(gateway_host=host, gateway_port=port, resources=resources)
    setup_logging(settings.log_level, settings.log_format)
    App(settings).registry()  # a bad resource file fails here, with its name and field
    config = uvicorn.Config(
        create_gateway(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )

    class Server(uvicorn.Server):
        """SIGTERM and SIGINT stop it gracefully and the command exits 0 (uvicorn's
        own handling re-raises the signal after the shutdown)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, setattr, server, "should_exit", True)
    click.echo(
        f"memstream gateway on http://{settings.gateway_host}:{settings.gateway_port} "
        f"(OpenAPI at /openapi.json); Ctrl-C stops",
        err=True,
    )
    await server.serve()
    if not server.started:
        sys.exit(1)


def register(main: click.Group) -> None:
    """Add the commands to ``main``."""

    @main.command("gateway")
    @click.option("--host", help="address to listen on (MEMSTREAM_GATEWAY_HOST)")
    @click.option(
        "--port", type=click.IntRange(1, 65535), help="port to listen on (MEMSTREAM_GATEWAY_PORT)"
    )
    @click.option("--resources", help="colon-separated folders or files of memory resources")
    @command
    async def gateway_cmd(host: str | None, port: int | None, resources: str | None) -> None:
        """Serve the HTTP gateway: REST with per-tenant API keys (see `memstream apikey`)."""
        await serve(host, port, resources)

    @main.group("apikey")
    def apikey() -> None:
        """The HTTP gateway's API keys: each belongs to one tenant."""

    @apikey.command("create")
    @click.argument("tenant")
    @click.option("--name", default="", help="what the key is for")
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    @command
    async def create_cmd(tenant: str, name: str, as_json: bool) -> None:
        """Create a key for TENANT; it is shown once, only its digest is stored."""
        async with App(settings_from()) as app:
            secret, record = await ApiKeys(app.client, app.keys).create(tenant, name)
        if as_json:
            click.echo(json.dumps({**record.as_json(), "api_key": secret}))
        else:
            click.echo(secret)
            click.echo(f"key {record.key_id} of tenant {tenant}: shown only now", err=True)

    @apikey.command("list")
    @click.option("--tenant", help="only this tenant's keys")
    @click.option("--json", "as_json", is_flag=True, help="print JSON lines")
    @command
    async def list_cmd(tenant: str | None, as_json: bool) -> None:
        """List the keys (their ids and tenants, never the keys)."""
        async with App(settings_from()) as app:
            records = await ApiKeys(app.client, app.keys).list(tenant)
        for r in records:
            if as_json:
                click.echo(json.dumps(r.as_json()))
            else:
                click.echo(f"{r.key_id}  {r.tenant}  {r.name}")

    @apikey.command("revoke")
    @click.argument("key_id")
    @command
    async def revoke_cmd(key_id: str) -> None:
        """Revoke the key KEY_ID: it stops working at once."""
        async with App(settings_from()) as app:
            revoked = await ApiKeys(app.client, app.keys).revoke(key_id)
        if not revoked:
            click.echo(f"no API key {key_id}", err=True)
            sys.exit(EXIT_REFUSED)
        click.echo(f"revoked {key_id}")
