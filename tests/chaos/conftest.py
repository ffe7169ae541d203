"""Fixtures of the chaos tests: fleets of worker and producer processes that are always
terminated, and whose logs are printed when the test fails."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Fleet

REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures know whether the test failed."""
    report: pytest.TestReport = yield  # type: ignore[misc]
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report  # type: ignore[return-value]


@pytest.fixture(
    params=[
        pytest.param("default", id="redis"),
        pytest.param("cluster", id="cluster", marks=pytest.mark.cluster),
    ]
)
def chaos_url(request: pytest.FixtureRequest) -> str:
    """The default server, then the 3-master Redis Cluster."""
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster").url)
    return str(request.getfixturevalue("default_redis_url"))


@pytest.fixture
def fleets(
    request: pytest.FixtureRequest, tmp_path: Path, namespace: str
) -> Iterator[Callable[[str], Fleet]]:
    """Makes fleets on a URL; stops every process at the end, printing logs on failure."""
    made: list[Fleet] = []

    def make(url: str) -> Fleet:
        fleet = Fleet(url, namespace, tmp_path / f"fleet{len(made)}", run=namespace)
        made.append(fleet)
        return fleet

    yield make
    started = time.monotonic()
    for fleet in made:
        fleet.close()
    print(f"\nfleet stopped in {time.monotonic() - started:.1f}s")
    reports = request.node.stash.get(REPORTS, {})
    if any(r.failed for r in reports.values()):
        for fleet in made:
            fleet.dump_logs()
