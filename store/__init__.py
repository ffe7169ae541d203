"""Redis: connections, keys, Lua scripts, leases, the materialized memory and its reader."""

from store.accounting import Accounts, MemoryCounts, ToCount
from store.breaker import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitRecord,
    CircuitState,
    read_circuits,
    record_circuit,
)
from store.config import ensure_partitions, get_partitions
from store.connection import (
    TRANSIENT_ERRORS,
    RedisClient,
    breaker_of,
    connect,
    describe,
    gate_of,
    is_cluster_url,
)
from store.deadletters import DeadLetter, DeadLetters
from store.embedded import EmbeddedRedis, RedisServerProcess, find_embedded, find_server_binary
from store.erasure import TenantErasure, erase_tenant, tenant_remnants
from store.errors import (
    ConnectionSetupError,
    GenerationChangedError,
    LeaseLostError,
    NotConfiguredError,
    OutcomeMismatchError,
    PartitionCountChangedError,
    RepartitionError,
    RepartitionInProgressError,
    RepartitionRefusedError,
    ScriptKeyError,
    StoreError,
    WaitTimeoutError,
)
from store.flushing import BudgetLimits, Change, FlushEnd, Flushes, Snapshot
from store.gate import CallGate, ConnectionsBusyError
from store.inflight import InFlight, removed_in_flight
from store.inventory import Listed, list_memories
from store.keys import GROUP_TOPIC, TOPIC_GROUPS, Group, Keys, MemoryKeys, Topic
from store.lease import Lease, LeaseHolder, Leases
from store.memory import ApplyBatch, Ending, Lookups, MemoryStore, Retention, Target
from store.reader import ContextWindow, MemoryReader, MemoryView, Outcome, OutcomeStatus
from store.repartition import Repartitioned, Repartitioner, refuse_while_repartitioning
from store.scripts import Scripts
from store.streams import Claim, Delivery, PartitionStreams, Settle, StreamEntry, ensure_groups

__all__ = [
    "GROUP_TOPIC",
    "TOPIC_GROUPS",
    "TRANSIENT_ERRORS",
    "Accounts",
    "ApplyBatch",
    "BudgetLimits",
    "CallGate",
    "Change",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitRecord",
    "CircuitState",
    "Claim",
    "ConnectionSetupError",
    "ConnectionsBusyError",
    "ContextWindow",
    "DeadLetter",
    "DeadLetters",
    "Delivery",
    "EmbeddedRedis",
    "Ending",
    "FlushEnd",
    "Flushes",
    "GenerationChangedError",
    "Group",
    "InFlight",
    "Keys",
    "Lease",
    "LeaseHolder",
    "LeaseLostError",
    "Leases",
    "Listed",
    "Lookups",
    "MemoryCounts",
    "MemoryKeys",
    "MemoryReader",
    "MemoryStore",
    "MemoryView",
    "NotConfiguredError",
    "Outcome",
    "OutcomeMismatchError",
    "OutcomeStatus",
    "PartitionCountChangedError",
    "PartitionStreams",
    "RedisClient",
    "RedisServerProcess",
    "RepartitionError",
    "RepartitionInProgressError",
    "RepartitionRefusedError",
    "Repartitioned",
    "Repartitioner",
    "Retention",
    "ScriptKeyError",
    "Scripts",
    "Settle",
    "Snapshot",
    "StoreError",
    "StreamEntry",
    "Target",
    "TenantErasure",
    "ToCount",
    "Topic",
    "WaitTimeoutError",
    "breaker_of",
    "connect",
    "describe",
    "ensure_groups",
    "ensure_partitions",
    "erase_tenant",
    "find_embedded",
    "find_server_binary",
    "gate_of",
    "get_partitions",
    "is_cluster_url",
    "list_memories",
    "read_circuits",
    "record_circuit",
    "refuse_while_repartitioning",
    "removed_in_flight",
    "tenant_remnants",
]
