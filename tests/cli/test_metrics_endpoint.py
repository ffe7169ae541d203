"""``memstream run all --metrics-port``: one endpoint for every processor of the
process, and every metric the shipped dashboard and alert rules use exists there."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cli.test_cli import LEASES, ROOT, Cli, lease_keys, wait_for

NAME = re.compile(r"\bmemstream_[a-z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def exposed_names(text: str) -> set[str]:
    """Every sample name the endpoint can show: declared families with their suffixes
    (a labelled metric with no sample yet is declared all the same)."""
    names = set()
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def dashboard_expressions() -> list[str]:
    board = json.loads((ROOT / "deploy/grafana/memstream.json").read_text())
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_run_all_serves_metrics_that_the_dashboard_and_alerts_use(
    cli: Cli, direct: redis.Redis, namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    proc = cli.start("--metrics-port", str(port))
    wait_for(
        "every partition leased",
        lambda: proc.poll() is None and len(lease_keys(direct, namespace)) == LEASES,
    )
    done = cli("publish", "acme/customer-support/metrics", "--content", "hi", "--wait")
    assert done.code == 0, done.err
    text = wait_for(
        "the append in the metrics",
        lambda: (
            (t := scrape(port))
            and 'memstream_events_total{kind="append",outcome="applied",processor="appender"} 1.0'
            in t
            and t
        ),
    )
    for group in ("appender", "accountant", "summarizer", "cleanup"):
        assert f'memstream_partitions_owned{{processor="{group}"}}' in text
    names = exposed_names(text)
    used = {n for expr in dashboard_expressions() + alert_expressions() for n in NAME.findall(expr)}
    assert used, "the dashboard and the alert rules name no metric"
    assert used <= names, f"named but not exposed: {sorted(used - names)}"
    # The dashboard shows every family the processors expose.
    families = {
        f.name for f in text_string_to_metric_families(text) if not f.name.endswith("_created")
    }
    shown = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in used}
    assert families <= shown, sorted(families - shown)
    assert cli.stop(proc) == 0, cli.stderr_of(proc)
