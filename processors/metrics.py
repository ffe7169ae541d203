"""Prometheus metrics of the processors: one registry per process, passed to every
worker and processor that records something (``memstream run all`` serves one endpoint
for all of them).

Every name starts with ``memstream_``; labels are processors (consumer groups), event
kinds, outcomes, reasons, strategies and partition numbers, never a memory key or a
tenant, so their number stays bounded.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from store.breaker import Breaker, CircuitState

#: Seconds: from a millisecond script call to a slow LLM summary.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: The operation each appender op stands for (the ``kind`` label of events_total).
OP_KINDS = {
    "append": "append",
    "replace": "replace",
    "clear": "clear",
    "delete": "delete",
    "flush": "flush",
    "erase": "erase",
    "ended": "workflow_ended",
    "dlq": "refused",
    "drop": "dropped",
    "erased": "gone",
}


class Metrics:
    """The metrics of one process. Tests give each their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "memstream_events_total",
            "Entries settled, by processor, kind of operation and outcome",
            ["processor", "kind", "outcome"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "memstream_batch_seconds",
            "Time to process one batch of entries",
            ["processor"],
            buckets=_FAST,
            registry=r,
        )
        self.apply_seconds = Histogram(
            "memstream_apply_seconds",
            "Time of one fenced apply script call (the appender's batch, the accountant's counts)",
            ["processor"],
            buckets=_FAST,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "memstream_end_to_end_seconds",
            "From publish (the producer's clock) to applied (the worker's clock)",
            buckets=_SLOW,
            registry=r,
        )
        self.lag = Gauge(
            "memstream_partition_lag",
            "Entries of an owned partition's stream not yet delivered to the group",
            ["processor", "partition"],
            registry=r,
        )
        self.partitions_owned = Gauge(
            "memstream_partitions_owned",
            "Partitions this process holds the lease of",
            ["processor"],
            registry=r,
        )
        self.rebalances = Counter(
            "memstream_rebalances_total",
            "Changes of a group's membership this process saw",
            ["processor"],
            registry=r,
        )
        self.lease_losses = Counter(
            "memstream_lease_losses_total",
            "Leases lost (expired or taken over) while held",
            ["processor"],
            registry=r,
        )
        self.dead_letters = Counter(
            "memstream_dead_letters_total",
            "Entries written to a dead letter stream, by reason",
            ["processor", "reason"],
            registry=r,
        )
        self.failed_attempts = Counter(
            "memstream_failed_attempts_total",
            "Attempts counted against an entry whose processing failed",
            ["processor"],
            registry=r,
        )
        self.tokens_counted = Counter(
            "memstream_tokens_counted_total",
            "Tokens the accountant counted in new messages",
            registry=r,
        )
        self.flushes = Counter(
            "memstream_flushes_total",
            "Flushes that ended, by strategy and result",
            ["strategy", "result"],
            registry=r,
        )
        self.tokens_saved = Counter(
            "memstream_tokens_saved_total",
            "Tokens flushes removed from memories (net of the summaries they wrote)",
            ["strategy"],
            registry=r,
        )
        self.summary_seconds = Histogram(
            "memstream_summary_seconds",
            "Time to write one summary, by writer (extractive, llm)",
            ["writer"],
            buckets=_SLOW,
            registry=r,
        )
        self.redis_errors = Counter(
            "memstream_redis_errors_total",
            "Redis errors a processor met (each is retried with backoff)",
            ["processor", "error"],
            registry=r,
        )
        self.retries = Counter(
            "memstream_retries_total",
            "Steps retried after a Redis error",
            ["processor"],
            registry=r,
        )

        self.circuit_state = Gauge(
            "memstream_circuit_state",
            "A Redis client's circuit breaker: 0 closed, 1 half-open (the next call is a "
            "trial), 2 open (calls fail at once)",
            ["client"],
            registry=r,
        )
        self.circuit_opens = Counter(
            "memstream_circuit_opens_total",
            "Times a Redis client's circuit breaker opened",
            ["client"],
            registry=r,
        )

        self.gateway_requests = Counter(
            "memstream_gateway_requests_total",
            "HTTP gateway requests, by method, route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.gateway_seconds = Histogram(
            "memstream_gateway_request_seconds",
            "HTTP gateway request durations, by method and route template",
            ["method", "route"],
            registry=r,
        )

    def settled(self, processor: str, outcomes: Iterable[tuple[str, str]]) -> None:
        """Count settled entries: (op kind, outcome) pairs (one increment per pair)."""
        for (kind, outcome), n in collections.Counter(outcomes).items():
            self.events.labels(processor, OP_KINDS.get(kind, kind), outcome).inc(n)

    def forget_partition(self, processor: str, partition: int) -> None:
        """A partition given up: its lag is no longer this process's to report."""
        with contextlib.suppress(KeyError):
            self.lag.remove(processor, str(partition))

    def watch_circuit(self, breaker: Breaker) -> None:
        """Report a client's breaker: its state at every scrape, and each opening."""
        self.circuit_state.labels(breaker.name).set_function(lambda: float(breaker.state))
        opens = self.circuit_opens.labels(breaker.name)

        def changed(state: CircuitState) -> None:
            if state is CircuitState.OPEN:
                opens.inc()

        breaker.add_listener(changed)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` (a thread of this process)."""
        start_http_server(port, addr, registry=self.registry)
