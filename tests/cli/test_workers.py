"""``memstream run PROCESSOR --workers N``: N supervised worker processes that share the
partitions, one restarted when it dies, all stopped by one SIGTERM."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import redis

from tests.cli.test_cli import MEMSTREAM, PARTITIONS, Cli, wait_for


def appender_leases(direct: redis.Redis, namespace: str) -> dict[str, str]:
    keys = [f"{namespace}:lease:{{{p}}}:appender" for p in range(PARTITIONS)]
    return {k: v for k, v in zip(keys, direct.mget(keys), strict=True) if v}


def owners(direct: redis.Redis, namespace: str) -> set[str]:
    return {v.split(":")[1] for v in appender_leases(direct, namespace).values()}


def test_workers_share_the_partitions_and_are_restarted(
    cli: Cli, direct: redis.Redis, namespace: str, tmp_path: Path
) -> None:
    with (tmp_path / "run.err").open("w") as err:
        proc = subprocess.Popen(
            [MEMSTREAM, "run", "appender", "--workers", "2"],
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(
            "two workers sharing every partition",
            lambda: (
                len(appender_leases(direct, namespace)) == PARTITIONS
                and len(owners(direct, namespace)) == 2
            ),
            timeout=60,
        )
        done = cli("publish", "acme/customer-support/two-workers", "--content", "hi", "--wait")
        assert done.code == 0, done.err
        status = cli("status", "--json").json()
        assert len(status["members"]) == 2
        children = psutil.Process(proc.pid).children()
        assert len(children) == 2
        victim = children[0]
        victim.kill()
        victim.wait(10)
        wait_for(
            "the dead worker replaced",
            lambda: (
                len(psutil.Process(proc.pid).children()) == 2
                and victim.pid not in {c.pid for c in psutil.Process(proc.pid).children()}
            ),
            timeout=30,
        )
        wait_for(
            "two live workers owning every partition again",
            lambda: (
                len(appender_leases(direct, namespace)) == PARTITIONS
                and len(owners(direct, namespace)) == 2
                and str(victim.pid) not in " ".join(owners(direct, namespace))
            ),
            timeout=60,
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "run.err").read_text()
        assert appender_leases(direct, namespace) == {}
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
