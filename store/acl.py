"""Redis ACL rules for memstream's users, for Redis 6.2 and 7 alike: producers may only
publish (XADD to the ingest and lifecycle streams through the publish scripts) and read
what the publish path reads; processors get the namespace's keys and the commands the
runtime and its scripts use, nothing administrative.

``memstream acl`` prints them as ``ACL SETUSER`` lines; the tests run the whole pipeline
under them. One Redis ACL cannot tell tenants apart here: every tenant's events share
the partitions' ingest streams, so a producer allowed to publish can publish for any
tenant. Give each tenant its own API key at the HTTP gateway to separate them.
"""

from __future__ import annotations

#: Commands every client needs to connect and run the scripts it loads (and, for a
#: Redis Cluster, to learn the slots and follow redirections).
_CONNECT = [
    "+ping",
    "+hello",
    "+auth",
    "+select",
    "+cluster|slots",
    "+cluster|nodes",
    "+command",
    "+asking",
    "+readonly",
    # Durable publishes and the appender wait for replicas (MEMSTREAM_DURABLE_REPLICAS).
    "+wait",
]
_SCRIPTS = ["+evalsha", "+script|load", "+script|exists", "+time"]


def producer_rules(namespace: str = "ms") -> list[str]:
    """A producer: publish events (and wait for their outcomes), nothing else.

    Keys: the ingest and lifecycle streams (XADD, and creating their consumer groups
    before the first entry); read only (no command that writes them is allowed): the
    configuration (the partition count, which the processors store) and each
    partition's count (checked by the publish script), outcomes, held-partition markers
    and the ended workflows (read while waiting). Not the changes and dead letter
    streams (other tenants' data): a producer waits for outcomes by polling, without
    their doorbells (``store.poller``)."""
    ns = namespace
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *_CONNECT,
        *_SCRIPTS,
        "+xadd",
        "+xlen",
        "+xgroup|create",
        "+hget",
        "+hmget",
        "+get",
        "+zscore",
        f"~{ns}:ingest:*",
        f"~{ns}:lifecycle:*",
        f"~{ns}:config",
        f"~{ns}:out:*",
        f"~{ns}:held:*",
        f"~{ns}:ended:*",
        f"~{ns}:pcount:*",
    ]


def processor_rules(namespace: str = "ms", *, redis7: bool = True) -> list[str]:
    """A processor (any of them) and the operator's CLI: every key of the namespace,
    reads, writes, streams and scripts; no administration (CONFIG, SHUTDOWN, FLUSHALL,
    KEYS, DEBUG, ...), no pub/sub, and on Redis 7 no FUNCTION (server-wide). SCAN, which
    `erase-tenant` needs, shows key names outside the namespace too."""
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        "+@read",
        "+@write",
        "+@stream",
        "-@dangerous",
        *(["-function"] if redis7 else []),
        *_CONNECT,
        "+eval",
        *_SCRIPTS,
        "+info",
        "+scan",
        f"~{namespace}:*",
    ]


def setuser(user: str, password: str, rules: list[str]) -> list[str]:
    """The ``ACL SETUSER`` arguments for ``user``."""
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", *rules]
