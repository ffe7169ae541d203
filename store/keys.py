"""Every Redis key name memstream uses, built here and nowhere else.

All keys of a partition share one hash tag, ``{p}``, so one Lua script can check a
lease, apply, emit and acknowledge atomically, on a single Redis and on a Cluster
(where a partition is one slot). Global keys (configuration, membership) carry no
partition tag. The layout, with the default namespace ``ms``::

    ms:config                         hash: partitions (the partition count)
    ms:members:<group>                zset: worker id -> last heartbeat (ms, Redis clock)
    ms:circuits:<group>               hash: worker id -> its circuit breaker (JSON)
    ms:ingest:{p}                     stream: memory events for partition p
    ms:changes:{p}  ms:flush:{p}      streams: the appender's change events, flush requests
    ms:dlq:{p}                        stream: dead letters of partition p
    ms:lease:{p}:<group>              string: <fence>:<worker>:<random>, with a TTL
    ms:fence:{p}:<group>              counter, never expires, INCR on every acquisition
    ms:released:{p}:<group>           the fence of the last clean release
    ms:attempts:{p}:<group>           hash: entry id -> counted attempts
    ms:held:{p}:<group>               string: why the partition is held back (JSON)
    ms:counters:{p}                   hash: seq, gen (never expire, never reused); swept:
                                      the newest ingest entry an erasure removed
    ms:pcount:{p}                     string: the partition count p belongs to ('moving'
                                      while ``memstream repartition`` runs); absent
                                      until the count is first changed
    ms:lock:{<name>}                  string: a DistributedLock, <fence>:<owner>:<random>
    ms:lockfence:{<name>}             counter: the lock's fence (expires 7d after last use)
    ms:out:{p}:<minute>               hash: entry id -> outcome (JSON), minute of the entry id
    ms:out:{p}:<group>:<minute>       the same for the entries of other groups' streams
    ms:lifecycle:{0}                  stream: workflow lifecycle events (one partition)
    ms:tenant:{p}:<tenant>            zset: memory id -> data deadline (ms): ``memstream ls``
    ms:resource:{p}:<tenant>/<resource>     zset: the same, for one resource
    ms:wf:{p}:<tenant>/<workflow>     zset: memory id -> first write, for a live workflow
    ms:ended:{p}:<tenant>             zset: ended workflow id -> remembered until (ms)
    ms:m:{p}:<tenant>/<resource>/<key>:log   zset: seq -> message (JSON)
    ms:m:{p}:<tenant>/<resource>/<key>:meta  hash: generation, counts, times
    ms:m:{p}:<tenant>/<resource>/<key>:tomb  hash: watermark, generation, last reset
    ms:m:{p}:<tenant>/<resource>/<key>:idem  zset: idempotency key digest -> expiry (ms)
    ms:m:{p}:<tenant>/<resource>/<key>:tok   hash: seq -> token count (and gen); readers'
                                      use (a:<seq>, f:<seq>); the protected messages
                                      (prot: rules fingerprint, prot:seqs: "s1,s2,")
    ms:m:{p}:<tenant>/<resource>/<key>:backup zset: the messages its last clear --backup
                                      removed (its id in tomb 'backup'), with a TTL
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

OUTCOME_BUCKET_MS = 60_000


class Topic(StrEnum):
    """The partitioned streams, named after what flows in them."""

    INGEST = "ingest"
    CHANGES = "changes"
    FLUSH = "flush"
    LIFECYCLE = "lifecycle"


#: Topics of one partition only (partition 0): the lifecycle stream.
SINGLE_PARTITION_TOPICS = frozenset({Topic.LIFECYCLE})


class Group(StrEnum):
    """Consumer groups: one per processor, named after it."""

    APPENDER = "appender"
    ACCOUNTANT = "accountant"
    SUMMARIZER = "summarizer"
    CLEANUP = "cleanup"


#: The groups each topic must have before it may be trimmed (DESIGN rule 8).
TOPIC_GROUPS: dict[Topic, tuple[Group, ...]] = {
    Topic.INGEST: (Group.APPENDER,),
    Topic.CHANGES: (Group.ACCOUNTANT,),
    Topic.FLUSH: (Group.SUMMARIZER,),
    Topic.LIFECYCLE: (Group.CLEANUP,),
}

#: The topic each group consumes.
GROUP_TOPIC: dict[Group, Topic] = {
    group: topic for topic, groups in TOPIC_GROUPS.items() for group in groups
}


@dataclass(frozen=True, slots=True)
class MemoryKeys:
    """The keys of one memory."""

    log: str
    meta: str
    tomb: str
    idem: str
    tok: str
    backup: str

    def all(self) -> tuple[str, str, str, str, str, str]:
        return (self.log, self.meta, self.tomb, self.idem, self.tok, self.backup)


def outcome_minute(entry_id: str) -> int:
    """The minute of entry ids whose outcomes share a bucket (see ``Keys.outcomes``)."""
    return int(entry_id.split("-", 1)[0]) // OUTCOME_BUCKET_MS


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace."""

    namespace: str = "ms"

    @property
    def config(self) -> str:
        return f"{self.namespace}:config"

    def members(self, group: str) -> str:
        return f"{self.namespace}:members:{group}"

    def circuits(self, group: str) -> str:
        """hash: worker id -> the state of its circuit breaker (``memstream status``)."""
        return f"{self.namespace}:circuits:{group}"

    @staticmethod
    def tag(partition: int) -> str:
        return f"{{{partition}}}"

    def topic(self, topic: Topic, partition: int) -> str:
        return f"{self.namespace}:{topic.value}:{{{partition}}}"

    def ingest(self, partition: int) -> str:
        return self.topic(Topic.INGEST, partition)

    def changes(self, partition: int) -> str:
        return self.topic(Topic.CHANGES, partition)

    def flush(self, partition: int) -> str:
        return self.topic(Topic.FLUSH, partition)

    @property
    def lifecycle(self) -> str:
        """The lifecycle stream: one partition (0), consumed by one cleanup leaseholder."""
        return self.topic(Topic.LIFECYCLE, 0)

    def dlq(self, partition: int) -> str:
        return f"{self.namespace}:dlq:{{{partition}}}"

    def lease(self, partition: int, group: str) -> str:
        return f"{self.namespace}:lease:{{{partition}}}:{group}"

    def fence(self, partition: int, group: str) -> str:
        return f"{self.namespace}:fence:{{{partition}}}:{group}"

    def released(self, partition: int, group: str) -> str:
        return f"{self.namespace}:released:{{{partition}}}:{group}"

    def attempts(self, partition: int, group: str) -> str:
        return f"{self.namespace}:attempts:{{{partition}}}:{group}"

    def held(self, partition: int, group: str) -> str:
        return f"{self.namespace}:held:{{{partition}}}:{group}"

    def lock(self, name: str) -> str:
        """A DistributedLock's key (the name is its hash tag: one slot per lock)."""
        return f"{self.namespace}:lock:{{{name}}}"

    def lock_fence(self, name: str) -> str:
        return f"{self.namespace}:lockfence:{{{name}}}"

    def counters(self, partition: int) -> str:
        return f"{self.namespace}:counters:{{{partition}}}"

    def partition_count(self, partition: int) -> str:
        """string: the count the partition belongs to, checked by every lease taken."""
        return f"{self.namespace}:pcount:{{{partition}}}"

    def outcomes(self, partition: int, entry_id: str, group: str = "appender") -> str:
        """The outcome bucket of an entry: one hash per minute of entry ids, per group
        (entry ids are unique only within one stream)."""
        minute = outcome_minute(entry_id)
        if group == "appender":
            return f"{self.namespace}:out:{{{partition}}}:{minute}"
        return f"{self.namespace}:out:{{{partition}}}:{group}:{minute}"

    def tenant_index(self, partition: int, tenant: str) -> str:
        """zset: the tenant's memories in the partition -> their data deadline (ms)."""
        return f"{self.namespace}:tenant:{{{partition}}}:{tenant}"

    def resource_index(self, partition: int, tenant: str, resource: str) -> str:
        """zset: the memories of one resource of a tenant -> their data deadline (ms)."""
        return f"{self.namespace}:resource:{{{partition}}}:{tenant}/{resource}"

    def workflow_index(self, partition: int, tenant: str, workflow: str) -> str:
        """zset: the memories a live workflow wrote in the partition -> first write (ms)."""
        return f"{self.namespace}:wf:{{{partition}}}:{tenant}/{workflow}"

    def ended(self, partition: int, tenant: str) -> str:
        """zset: the tenant's workflows that ended -> until when that is remembered (ms)."""
        return f"{self.namespace}:ended:{{{partition}}}:{tenant}"

    def memory(self, partition: int, memory_id: str) -> MemoryKeys:
        base = f"{self.namespace}:m:{{{partition}}}:{memory_id}"
        return MemoryKeys(
            f"{base}:log",
            f"{base}:meta",
            f"{base}:tomb",
            f"{base}:idem",
            f"{base}:tok",
            f"{base}:backup",
        )
