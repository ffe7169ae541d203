"""Metrics, recorded by real workers on real Redis: every processor counts what it
settles, how long it takes and what went wrong, under names that start with
``memstream_`` and labels that never carry a memory key or a tenant."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from events import WorkflowStatus
from memory import FlushStrategy, MemoryRef
from tests.runtime.conftest import PARTITIONS, Rig, user

WORDS = " ".join(f"word{i}" for i in range(200))


def value(rig: Rig, name: str, **labels: str) -> float:
    return rig.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_processors_count_what_they_do(rig: Rig) -> None:
    rig.start_all()
    rig.start_cleanup()
    ref = MemoryRef.parse("acme/customer-support/metrics-1")
    for i in range(6):
        published = await rig.publisher.append(
            ref, user(f"m{i}. {WORDS}"), workflow_id="wf-m", wait=True
        )
        assert published.outcome is not None and published.outcome.ok
    refused = await rig.publisher.append(
        MemoryRef.parse("acme/no-such-resource/x"), user("hi"), wait=True
    )
    assert refused.outcome is not None and refused.outcome.reason == "unknown_resource"

    async def counted() -> bool:
        return (await rig.reader.read(ref)).counted == 6

    await rig.eventually(counted, what="the accountant")
    await rig.publisher.request_flush(ref, strategy=FlushStrategy.FIFO, wait=True)
    await rig.eventually(
        lambda: value(rig, "memstream_flushes_total", strategy="fifo", result="applied") >= 1,
        what="the flush",
    )
    ended = await rig.publisher.workflow_terminated(
        "acme", "wf-m", WorkflowStatus.COMPLETED, wait=True
    )
    assert ended.outcome is not None and ended.outcome.ok

    # An outcome is written by the same script that applies; the metrics are recorded
    # once the script has answered: wait for them, never assume them.
    applied = {"processor": "appender", "outcome": "applied"}
    expected: list[tuple[str, dict[str, str], float]] = [
        ("memstream_events_total", {"kind": "append", **applied}, 6),
        ("memstream_events_total", {"kind": "flush", **applied}, 1),
        ("memstream_events_total", {"kind": "workflow_ended", **applied}, PARTITIONS),
        (
            "memstream_events_total",
            {"processor": "appender", "kind": "refused", "outcome": "refused"},
            1,
        ),
        (
            "memstream_dead_letters_total",
            {"processor": "appender", "reason": "unknown_resource"},
            1,
        ),
        (
            "memstream_events_total",
            {"processor": "cleanup", "kind": "lifecycle", "outcome": "applied"},
            1,
        ),
        ("memstream_end_to_end_seconds_count", {}, 6),
    ]

    def recorded() -> bool:
        return all(value(rig, name, **labels) >= n for name, labels, n in expected)

    await rig.eventually(recorded, what="the metrics of what was settled")
    for name, labels, n in expected:
        assert value(rig, name, **labels) == n, (name, labels)
    assert (
        value(
            rig, "memstream_events_total", processor="accountant", kind="count", outcome="applied"
        )
        >= 6
    )
    view = await rig.reader.read(ref)
    assert value(rig, "memstream_tokens_counted_total") >= view.tokens > 0
    assert value(rig, "memstream_tokens_saved_total", strategy="fifo") > 0
    assert value(rig, "memstream_apply_seconds_count", processor="appender") >= 1
    assert value(rig, "memstream_batch_seconds_count", processor="summarizer") >= 1
    assert value(rig, "memstream_summary_seconds_count", writer="extractive") == 0  # fifo
    for group in ("appender", "accountant", "summarizer"):
        assert value(rig, "memstream_partitions_owned", processor=group) == PARTITIONS
    assert value(rig, "memstream_partitions_owned", processor="cleanup") == 1

    # Every name starts with memstream_, and no label value names a memory or tenant.
    text = generate_latest(rig.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("memstream_"), family.name
        for sample in family.samples:
            blob = json.dumps(sample.labels)
            assert "acme" not in blob and "metrics-1" not in blob, sample


async def test_lease_losses_and_lag_are_reported(rig: Rig) -> None:
    worker = rig.start("appender")
    ref = MemoryRef.parse("acme/customer-support/metrics-lag")
    await rig.publisher.append(ref, user("one"), wait=True)
    p = ref_partition = (await rig.reader.read(ref)).partition
    await rig.eventually(
        lambda: (
            rig.metrics.registry.get_sample_value(
                "memstream_partition_lag", {"processor": "appender", "partition": str(p)}
            )
            == 0
        ),
        what="the lag of the partition",
    )
    # Another worker's lease overwrites ours: the loss is counted.
    await rig.client.set(rig.keys.lease(ref_partition, "appender"), "999:intruder:x", px=5000)
    await rig.eventually(
        lambda: value(rig, "memstream_lease_losses_total", processor="appender") >= 1,
        what="the lease loss",
    )
    assert worker.metrics is rig.metrics
