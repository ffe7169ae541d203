"""The documented ACL users (``store.acl``, ``memstream acl``): the whole pipeline runs
with processors and producers under them (on Redis 6.2, 7 and a Cluster), and a
producer can publish and wait for its outcomes but read no memory and change nothing
else."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from events import Publisher
from memory import MemoryRef, ResourceRegistry, partition_for
from processors import Appender, Worker
from processors.accountant import Accountant
from processors.cleanup import Cleanup
from processors.tokenizers import Tokenizers
from store import (
    Accounts,
    Group,
    Keys,
    MemoryReader,
    MemoryStore,
    PartitionStreams,
    RedisClient,
    RedisServerProcess,
    Scripts,
    connect,
    ensure_partitions,
)
from store.acl import processor_rules, producer_rules, setuser
from tests.conftest import DEFAULT_FLAVOUR, FLAVOURS, own_server
from tests.runtime.conftest import FAST, PARTITIONS, ROOT, user
from tests.servers import Cluster


@dataclass
class Users:
    processor_url: str
    producer_url: str
    redis7: bool


async def add_users(url: str, redis7: bool) -> None:
    admin = connect(url)
    try:
        rules = processor_rules(redis7=redis7)
        await admin.execute_command(*setuser("memstream-processor", "p-secret", rules))
        await admin.execute_command(*setuser("agent-producer", "a-secret", producer_rules()))
    finally:
        await admin.aclose()


def as_users(url: str, redis7: bool) -> Users:
    scheme, _, host = url.partition("://")
    return Users(
        f"{scheme}://memstream-processor:p-secret@{host}",
        f"{scheme}://agent-producer:a-secret@{host}",
        redis7,
    )


@pytest.fixture(
    params=[
        *sorted(FLAVOURS),
        pytest.param("cluster", marks=[pytest.mark.cluster, pytest.mark.timeout(180)]),
    ]
)
async def acl_server(
    request: pytest.FixtureRequest,
    server_factory: list[RedisServerProcess],
    tmp_path: Path,
) -> AsyncIterator[Users]:
    """A server (or a 3-master Cluster) of its own (the ACL users are the test's), with
    the two users on every node."""
    if request.param != "cluster":
        server = own_server(server_factory, tmp_path, str(request.param), appendonly=False)
        await add_users(server.url, redis7=request.param != "6.2")
        yield as_users(server.url, redis7=request.param != "6.2")
        return
    cluster = Cluster(FLAVOURS[DEFAULT_FLAVOUR], tmp_path / "cluster")
    cluster.start()
    try:
        for node in cluster.nodes:
            await add_users(node.url, redis7=DEFAULT_FLAVOUR != "6.2")
        yield as_users(cluster.url, redis7=DEFAULT_FLAVOUR != "6.2")
    finally:
        cluster.stop()


async def test_the_pipeline_runs_under_the_acl_users(acl_server: Users) -> None:
    processor_url, producer_url = acl_server.processor_url, acl_server.producer_url
    keys = Keys()
    registry = ResourceRegistry.load([ROOT / "memories"])
    worker_client = connect(processor_url)
    producer_client = connect(producer_url)
    try:
        worker_scripts = Scripts(worker_client)
        await worker_scripts.load()
        store = MemoryStore(worker_scripts, keys)
        await ensure_partitions(worker_client, keys, PARTITIONS)
        workers = [
            Worker(
                worker_client,
                worker_scripts,
                keys,
                Appender(store, keys, registry, PARTITIONS),
                PARTITIONS,
                FAST,
                "appender",
            ),
            Worker(
                worker_client,
                worker_scripts,
                keys,
                Accountant(Accounts(worker_client, worker_scripts, keys), registry, Tokenizers()),
                PARTITIONS,
                FAST,
                "accountant",
            ),
        ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]

        publisher = Publisher(producer_client, keys=keys, default_partitions=PARTITIONS)
        ref = MemoryRef("acme", "customer-support", f"acl-{uuid.uuid4().hex[:6]}")
        for text in ("hello", "world"):
            published = await publisher.append(ref, user(text), workflow_id="wf-acl", wait=True)
            assert published.outcome is not None and published.outcome.ok, published.outcome
        started = await publisher.workflow_started("acme", "wf-acl")
        assert started.receipt is not None

        reader = MemoryReader(worker_client, worker_scripts, keys)
        view = await reader.read(ref)
        assert [str(m.content) for m in view.messages] == ["hello", "world"]

        async def counted() -> bool:
            return (await reader.read(ref)).counted == 2

        for _ in range(100):
            if await counted():
                break
            await asyncio.sleep(0.05)
        assert await counted()

        # The engine's end of a workflow, waited for under the producer user.
        workers.append(
            Worker(
                worker_client,
                worker_scripts,
                keys,
                Cleanup(
                    Publisher(worker_client, keys=keys, scripts=worker_scripts),
                    PartitionStreams(worker_client, worker_scripts, keys, Group.CLEANUP),
                    registry,
                ),
                1,
                FAST,
                "cleanup",
            )
        )
        tasks.append(asyncio.create_task(workers[-1].run(stop)))
        ended = await publisher.workflow_terminated("acme", "wf-acl", wait=True)
        assert ended.outcome is not None and ended.outcome.ok, ended.outcome
        late = await publisher.append(ref, user("late"), workflow_id="wf-acl", wait=True)
        assert late.outcome is not None and late.outcome.reason == "workflow_ended"

        await check_refusals(producer_client, worker_client, keys, ref)
        if acl_server.redis7:
            where = {}
            if isinstance(worker_client, RedisCluster):  # a keyless command: name a node
                where = {"target_nodes": worker_client.get_random_node()}
            with pytest.raises(NoPermissionError):
                await worker_client.execute_command("FUNCTION", "FLUSH", **where)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await worker_client.aclose()
        await producer_client.aclose()


async def check_refusals(
    producer_client: RedisClient, worker_client: RedisClient, keys: Keys, ref: MemoryRef
) -> None:
    # The producer reads no memory and writes nothing but events.
    p = partition_for(ref.memory_id, PARTITIONS)
    k = keys.memory(p, ref.memory_id)
    with pytest.raises(NoPermissionError):
        await producer_client.zrange(k.log, 0, -1)
    with pytest.raises(NoPermissionError):
        await producer_client.hset(keys.config, "partitions", "3")
    with pytest.raises(NoPermissionError):
        await producer_client.hsetnx(keys.outcomes(p, "1-0"), "1-0", "{}")
    with pytest.raises(NoPermissionError):
        await producer_client.delete(keys.ingest(p))
    with pytest.raises(ResponseError):  # NOPERM, raised inside the script
        await producer_client.eval(f"return redis.call('DEL', '{k.log}')", 0)
    with pytest.raises(NoPermissionError):
        await producer_client.config_get("*")
    # ... nor can the processors administer the server.
    with pytest.raises(NoPermissionError):
        await worker_client.config_set("maxmemory", "1")
    with pytest.raises(NoPermissionError):
        await worker_client.flushall()


async def acl_lines(version: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMSTREAM_")}
    memstream = str(Path(sys.executable).with_name("memstream"))
    proc = await asyncio.create_subprocess_exec(
        memstream,
        "acl",
        "--producer-user",
        "p1",
        "--redis",
        version,
        env={**env, "MEMSTREAM_NAMESPACE": "tenantns"},
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return stdout.decode().splitlines()


async def test_memstream_acl_prints_commands_the_server_accepts(
    server_factory: list[RedisServerProcess], tmp_path: Path
) -> None:
    for flavour in sorted(FLAVOURS):
        lines = await acl_lines("6.2" if flavour == "6.2" else "7")
        assert len(lines) == 2 and all(line.startswith("ACL SETUSER ") for line in lines)
        assert "~tenantns:ingest:*" in lines[1] and " p1 " in lines[1]
        assert ("-function" in lines[0]) == (flavour != "6.2")
        server = own_server(server_factory, tmp_path / flavour, flavour, appendonly=False)
        admin = connect(server.url)
        try:
            for line in lines:
                assert await admin.execute_command(*shlex.split(line)) in (True, "OK")
            users = await admin.execute_command("ACL", "USERS")
            assert {"memstream-processor", "p1"} <= set(users)
        finally:
            await admin.aclose()
