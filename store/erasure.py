"""Erasing a tenant: every stream entry, key and outcome that holds its data, while
the processors run.

``erase_tenant`` works in sweeps, each cluster-safe (one key per command, or a pipeline
of single-key commands, which a Cluster client splits by node). Entries go before keys
(no event of the tenant still waiting in a stream can bring back a memory the key sweep
removed), and a sweep of a stream whose processor may still act on an entry it read
before the erasure removed it waits for that processor (``store.inflight``):

1. lifecycle: the tenant's ``workflow.*`` entries, with XDEL. The cleanup processor may
   have read one and be sending that workflow's end into the ingest streams: the
   erasure waits until the lifecycle leaseholder has settled every removed entry it
   had read, so what it sent is in the ingest streams before they are swept. Then the
   outcomes it recorded for them.
2. ingest: the tenant's entries of every partition, and their outcomes. The appender
   needs no wait: the script step that removes entries raises the partition's sweep
   mark (``erase_entries.lua``), and the apply script settles every entry of a batch at
   or below the mark that is gone as ``erased`` (``apply_batch.lua``), however late.
3. keys: SCAN over every primary (redis-py's Cluster ``scan_iter`` visits each one until
   its cursor returns to 0) for the keys named for the tenant: its memories' keys
   (``m:{p}:<tenant>/...``), its indexes (``tenant``, ``resource``, ``wf``, ``ended``)
   and its memories' locks (``lock`` and ``lockfence`` of ``flush:<tenant>/...``). From
   here on no processor writes a change or a flush request for its memories: they
   change only memories that exist.
4. changes and flush: the tenant's entries of every partition, and their outcomes (the
   accountant and the summarizer may have written some before step 3). A flush the
   summarizer had read takes its memory's lock (a new fence key) even when the memory
   is gone: the erasure waits for the summarizers' removed entries in flight, then
   deletes those locks again.
5. dead letters, then the fields of the outcome hashes (``out:{p}:...``) that name the
   tenant (a memory id ``<tenant>/``, or ``"tenant"``) though their entry is gone.

A removed entry pending for a worker that does not hold the lease (it died) is not
waited for: the next holder claims it, finds it gone and settles it as ``erased``.

Partition-wide keys (configuration, membership, leases and fences, attempts, held
markers, sequence and generation counters) hold no tenant data and are never touched,
but for the sweep mark (the newest ingest entry id an erasure removed) in the counters.

``tenant_remnants`` reads every key and every value of the namespace and describes
whatever still mentions the tenant: the check that an erasure left nothing behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from memory.ref import check_tenant
from store.connection import RedisClient
from store.inflight import InFlight, wait_settled
from store.keys import TOPIC_GROUPS, Group, Keys, Topic
from store.scripts import Scripts

#: What a tenant name is made of (memory.ref's TENANT_PATTERN): an occurrence of the
#: tenant counts only where none of these comes right before it.
_TENANT_CHARS = "A-Za-z0-9_.-"
SCAN_COUNT = 1000
DELETE_BATCH = 500
#: How long an erasure waits, by default, for a processor to settle what it had read of
#: the entries it removed (three of the default lease TTLs).
SETTLE_WAIT = 30.0
#: Key kinds (the segment after the namespace) that are never named for a tenant.
_SHARED_KINDS = frozenset(
    {
        "config",
        "members",
        "lease",
        "fence",
        "released",
        "attempts",
        "held",
        "counters",
        "out",
        "ingest",
        "changes",
        "flush",
        "dlq",
        "lifecycle",
    }
)


@dataclass(frozen=True, slots=True)
class TenantErasure:
    """What ``erase_tenant`` removed: stream entries by stream kind, keys, and outcome
    fields (those of the removed entries and those that named the tenant)."""

    tenant: str
    ingest: int = 0
    changes: int = 0
    flush: int = 0
    dlq: int = 0
    lifecycle: int = 0
    keys: int = 0
    outcomes: int = 0
    #: Removed entries a processor still had when the erasure gave up waiting for it
    #: (this erasure's or an earlier one's): what it does with them may name the tenant
    #: again.
    unsettled: tuple[InFlight, ...] = ()

    @property
    def entries(self) -> int:
        return self.ingest + self.changes + self.flush + self.dlq + self.lifecycle

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "entries": {
                "ingest": self.ingest,
                "changes": self.changes,
                "flush": self.flush,
                "dlq": self.dlq,
                "lifecycle": self.lifecycle,
            },
            "keys": self.keys,
            "outcomes": self.outcomes,
            "unsettled": [
                {"stream": u.stream, "group": u.group, "worker": u.worker, "entries": [*u.entries]}
                for u in self.unsettled
            ],
        }


@dataclass(frozen=True, slots=True)
class TenantMatch:
    """Precise tests for one tenant under one namespace: ``acme`` never matches
    ``acme2`` (a memory id is ``<tenant>/...``, and a tenant never holds ``/`` or ``:``)."""

    tenant: str
    prefix: str
    owned: re.Pattern[str]
    mention: re.Pattern[str]
    token: re.Pattern[str]

    @classmethod
    def of(cls, keys: Keys, tenant: str) -> TenantMatch:
        """Raises InvalidReferenceError for a name that cannot be a tenant's."""
        t = re.escape(check_tenant(tenant))
        owned = (
            rf"(?:m|resource|wf):\{{\d+\}}:{t}/.+"
            rf"|(?:tenant|ended):\{{\d+\}}:{t}"
            rf"|lock(?:fence)?:\{{(?:[^{{}}:]*:)?{t}/[^{{}}]*\}}"
        )
        # A memory id in any text (Lua's cjson writes '/' as '\/'), or a JSON tenant, in
        # JSON text or in JSON nested in a JSON string.
        mention = rf'(?<![{_TENANT_CHARS}]){t}\\?/|\\?"tenant\\?"\s*:\s*\\?"{t}\\?"'
        token = rf"(?<![{_TENANT_CHARS}]){t}(?![{_TENANT_CHARS}])"
        return cls(
            tenant,
            f"{keys.namespace}:",
            re.compile(owned, re.DOTALL),
            re.compile(mention),
            re.compile(token),
        )

    def owns_key(self, name: str) -> bool:
        """The key is one of the tenant's: a memory's key, an index, a memory's lock."""
        if not name.startswith(self.prefix):
            return False
        return self.owned.fullmatch(name[len(self.prefix) :]) is not None

    def lock_name(self, key: str) -> str:
        """The lock name that goes with one of the tenant's keys: a lock's own name, the
        flush lock of a memory's key, else ``""``."""
        rest = key[len(self.prefix) :]
        kind, _, tail = rest.partition(":")
        if kind in ("lock", "lockfence"):
            return tail[1:-1]
        if kind == "m":
            return "flush:" + tail.partition(":")[2].rpartition(":")[0]
        return ""

    def names_key(self, name: str) -> bool:
        """The key is the tenant's, or (of a kind not known here) has it in its name."""
        if self.owns_key(name):
            return True
        rest = name[len(self.prefix) :] if name.startswith(self.prefix) else name
        kind, _, tail = rest.partition(":")
        return kind not in _SHARED_KINDS and self.token.search(tail) is not None

    def owns_memory(self, memory_id: str) -> bool:
        return memory_id.startswith(f"{self.tenant}/")

    def owns_event(self, text: str) -> bool:
        """An event (JSON envelope) of the tenant; text that is not a JSON object (a
        dead-lettered event may be anything) counts when it names the tenant."""
        if self.tenant not in text and "\\u" not in text:
            return False  # not even as a JSON escape: no need to parse it
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if isinstance(event, dict):
            return event.get("tenant") == self.tenant
        return self.mentions(text)

    def owns_letter(self, fields: Mapping[str, str]) -> bool:
        return self.owns_memory(fields.get("memory", "")) or self.owns_event(
            fields.get("event", "")
        )

    def mentions(self, text: str) -> bool:
        return self.tenant in text and self.mention.search(text) is not None


def _strings(fields: Mapping[Any, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (fields or {}).items()}


def _glob(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


async def erase_tenant(
    scripts: Scripts,
    keys: Keys,
    tenant: str,
    *,
    partitions: int,
    page: int = 500,
    wait: float = SETTLE_WAIT,
    waiting: Callable[[list[InFlight]], None] | None = None,
) -> TenantErasure:
    """Remove every stream entry, key and outcome of ``tenant`` (see the module doc).

    Each of the two waits for the processors lasts up to ``wait`` seconds; ``waiting`` is
    told what it waits for. Past that the erasure goes on, and names what was still in
    flight in ``unsettled``."""
    client = scripts.client
    match = TenantMatch.of(keys, tenant)
    lifecycle = await _erase_entries(
        client, keys.lifecycle, _selector(Topic.LIFECYCLE, match), page
    )
    unsettled = await wait_settled(client, keys, [(Group.CLEANUP, 0)], wait, waiting)
    # After the wait: the cleanup processor records its outcome when it settles.
    outcomes = await _hdel(client, _outcome_fields(keys, Topic.LIFECYCLE, 0, lifecycle))
    entries: dict[Topic, int] = dict.fromkeys(Topic, 0)
    for p in range(partitions):
        erased, recorded = await _erase_topic(scripts, keys, Topic.INGEST, p, match, page)
        entries[Topic.INGEST] += erased
        outcomes += recorded
    deleted, locks = await _erase_keys(client, keys, match)
    for topic in (Topic.CHANGES, Topic.FLUSH):
        for p in range(partitions):
            erased, recorded = await _erase_topic(scripts, keys, topic, p, match, page, locks)
            entries[topic] += erased
            outcomes += recorded
    summarizers = [(Group.SUMMARIZER, p) for p in range(partitions)]
    unsettled += await wait_settled(client, keys, summarizers, wait, waiting)
    # A flush in flight took its memory's lock again, with a new fence.
    deleted += await _delete(
        client, [k for name in sorted(locks) for k in (keys.lock(name), keys.lock_fence(name))]
    )
    letters = 0
    for p in range(partitions):
        letters += len(await _erase_entries(client, keys.dlq(p), match.owns_letter, page))
    outcomes += await _erase_outcomes(client, keys, match)
    return TenantErasure(
        tenant,
        ingest=entries[Topic.INGEST],
        changes=entries[Topic.CHANGES],
        flush=entries[Topic.FLUSH],
        dlq=letters,
        lifecycle=len(lifecycle),
        keys=deleted,
        outcomes=outcomes,
        unsettled=tuple(unsettled),
    )


def _selector(topic: Topic, match: TenantMatch) -> Callable[[Mapping[str, str]], bool]:
    if topic in (Topic.INGEST, Topic.LIFECYCLE):
        return lambda fields: match.owns_event(fields.get("event", ""))
    return lambda fields: match.owns_memory(fields.get("memory", ""))


async def _erase_topic(
    scripts: Scripts,
    keys: Keys,
    topic: Topic,
    p: int,
    match: TenantMatch,
    page: int,
    locks: set[str] | None = None,
) -> tuple[int, int]:
    """The tenant's entries of one stream, then the outcomes its groups recorded for them;
    ``locks`` gets the flush lock names of the memories the removed entries name."""

    async def remove_marked(ids: list[str]) -> None:
        # Removed and marked in one step, for the appender's batches in flight.
        await scripts("erase_entries", [keys.ingest(p), keys.counters(p)], ids)

    selected = _selector(topic, match)

    def select(fields: Mapping[str, str]) -> bool:
        if not selected(fields):
            return False
        if locks is not None and fields.get("memory"):
            locks.add(f"flush:{fields['memory']}")
        return True

    remove = remove_marked if topic is Topic.INGEST else None
    stream = keys.topic(topic, p)
    erased = await _erase_entries(scripts.client, stream, select, page, remove)
    return len(erased), await _hdel(scripts.client, _outcome_fields(keys, topic, p, erased))


def _outcome_fields(keys: Keys, topic: Topic, p: int, ids: list[str]) -> dict[str, list[str]]:
    """The outcome hash fields the groups of ``topic`` record for entries ``ids``."""
    buckets: dict[str, list[str]] = {}
    for entry_id in ids:
        for group in TOPIC_GROUPS[topic]:
            buckets.setdefault(keys.outcomes(p, entry_id, group.value), []).append(entry_id)
    return buckets


async def _erase_entries(
    client: RedisClient,
    stream: str,
    select: Callable[[Mapping[str, str]], bool],
    page: int,
    remove: Callable[[list[str]], Awaitable[None]] | None = None,
) -> list[str]:
    """XDEL (or ``remove``) the entries of ``stream`` that ``select`` picks, reading it
    page by page."""
    erased: list[str] = []
    start = "-"
    while True:
        entries = await client.xrange(stream, min=start, max="+", count=page) or []
        ids = [str(i) for i, fields in entries if select(_strings(fields))]
        if ids:
            if remove is not None:
                await remove(ids)
            else:
                await client.xdel(stream, *ids)
            erased += ids
        if len(entries) < page:
            return erased
        start = f"({entries[-1][0]!s}"


async def _hdel(client: RedisClient, fields: Mapping[str, list[str]]) -> int:
    if not fields:
        return 0
    pipe = client.pipeline(transaction=False)
    for key, names in fields.items():
        pipe.hdel(key, *names)
    return sum(int(n) for n in await pipe.execute())


async def _delete(client: RedisClient, names: list[str]) -> int:
    if not names:
        return 0
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.delete(name)
    return sum(int(n) for n in await pipe.execute())


async def _erase_keys(client: RedisClient, keys: Keys, match: TenantMatch) -> tuple[int, set[str]]:
    """The tenant's keys; and the lock names of its memories (``flush:<memory id>``)
    and of the locks among them."""
    deleted = 0
    locks: set[str] = set()
    batch: list[str] = []
    async for name in client.scan_iter(match=f"{_glob(keys.namespace)}:*", count=SCAN_COUNT):
        if match.owns_key(str(name)):
            batch.append(str(name))
            if lock := match.lock_name(str(name)):
                locks.add(lock)
        if len(batch) >= DELETE_BATCH:
            deleted += await _delete(client, batch)
            batch = []
    return deleted + await _delete(client, batch), locks


async def _erase_outcomes(client: RedisClient, keys: Keys, match: TenantMatch) -> int:
    """Outcome fields that name the tenant (their entry already trimmed or erased)."""
    deleted = 0
    pattern = f"{_glob(keys.namespace)}:out:*"
    async for name in client.scan_iter(match=pattern, count=SCAN_COUNT):
        found = [
            str(field)
            async for field, value in client.hscan_iter(str(name), count=SCAN_COUNT)
            if match.mentions(str(value))
        ]
        deleted += await _hdel(client, {str(name): found} if found else {})
    return deleted


async def tenant_remnants(client: RedisClient, keys: Keys, tenant: str) -> list[str]:
    """Every key of the namespace named for ``tenant`` and every value (of strings,
    hashes, sets, sorted sets, lists and streams) that mentions it, described."""
    match = TenantMatch.of(keys, tenant)
    found: list[str] = []
    async for raw in client.scan_iter(match=f"{_glob(keys.namespace)}:*", count=SCAN_COUNT):
        name = str(raw)
        if match.names_key(name):
            found.append(f"{name}: named for tenant {tenant}")
        kind = str(await client.type(name))
        async for where, text in _texts(client, name, kind):
            if match.mentions(text) or (text.startswith("{") and _json_tenant(text) == tenant):
                found.append(f"{name} ({kind}{where}): mentions tenant {tenant}")
    return found


def _json_tenant(text: str) -> object:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value.get("tenant") if isinstance(value, dict) else None


async def _texts(client: RedisClient, name: str, kind: str) -> AsyncIterator[tuple[str, str]]:
    """Every text a key holds, with where it sits: its value, its fields and members."""
    if kind == "string":
        yield "", str(await client.get(name))
    elif kind == "hash":
        async for field, value in client.hscan_iter(name, count=SCAN_COUNT):
            yield f" field {field!s}", f"{field!s}\n{value!s}"
    elif kind == "set":
        async for member in client.sscan_iter(name, count=SCAN_COUNT):
            yield " member", str(member)
    elif kind == "zset":
        async for member, _score in client.zscan_iter(name, count=SCAN_COUNT):
            yield " member", str(member)
    elif kind == "list":
        for start in range(0, int(await client.llen(name)), SCAN_COUNT):
            for i, item in enumerate(await client.lrange(name, start, start + SCAN_COUNT - 1)):
                yield f" item {start + i}", str(item)
    elif kind == "stream":
        async for entry_id, fields in _stream(client, name):
            for field, value in fields.items():
                yield f" entry {entry_id} field {field}", value


async def _stream(client: RedisClient, name: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    start = "-"
    while True:
        entries = await client.xrange(name, min=start, max="+", count=SCAN_COUNT) or []
        for entry_id, fields in entries:
            yield str(entry_id), _strings(fields)
        if len(entries) < SCAN_COUNT:
            return
        start = f"({entries[-1][0]!s}"
