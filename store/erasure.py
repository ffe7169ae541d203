"""Erasing a tenant: every stream entry, key and outcome that holds its data.

``erase_tenant`` works in three sweeps, each cluster-safe (one key per command, or a
pipeline of single-key commands, which a Cluster client splits by node):

1. stream entries: every ``ingest``, ``changes``, ``flush`` and ``dlq`` stream of every
   partition and the ``lifecycle`` stream, read with XRANGE page by page; the tenant's
   entries are removed with XDEL, and the outcomes recorded for them with HDEL. Entries
   go first so that no event of the tenant still waiting in a stream can bring back a
   memory the next sweep removes. A deleted entry that was pending is settled by its
   next owner as ``erased`` (DESIGN rule 3). An ``ingest`` entry the appender had read
   before it was deleted is settled as ``erased`` too, however late its batch is
   applied: the same script step that deletes it raises the partition's sweep mark
   (``erase_entries.lua``), and the apply script checks every entry at or below the
   mark is still there (``apply_batch.lua``).
2. keys: SCAN over every primary (redis-py's Cluster ``scan_iter`` visits each one until
   its cursor returns to 0) for the keys named for the tenant: its memories' keys
   (``m:{p}:<tenant>/...``), its indexes (``tenant``, ``resource``, ``wf``, ``ended``)
   and its memories' locks (``lock`` and ``lockfence`` of ``flush:<tenant>/...``).
3. outcomes: the fields of the outcome hashes (``out:{p}:...``) whose value names one
   of the tenant's memories (``<tenant>/``) though their entry is already gone.

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
from store.keys import TOPIC_GROUPS, Keys, Topic
from store.scripts import Scripts

#: What a tenant name is made of (memory.ref's TENANT_PATTERN): an occurrence of the
#: tenant counts only where none of these comes right before it.
_TENANT_CHARS = "A-Za-z0-9_.-"
SCAN_COUNT = 1000
DELETE_BATCH = 500
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
    scripts: Scripts, keys: Keys, tenant: str, *, partitions: int, page: int = 500
) -> TenantErasure:
    """Remove every stream entry, key and outcome of ``tenant`` (see the module doc)."""
    client = scripts.client
    match = TenantMatch.of(keys, tenant)
    entries: dict[Topic, int] = dict.fromkeys(Topic, 0)
    outcomes = 0
    streams = [
        (t, p) for t in (Topic.INGEST, Topic.CHANGES, Topic.FLUSH) for p in range(partitions)
    ]
    for topic, p in [*streams, (Topic.LIFECYCLE, 0)]:
        erased, recorded = await _erase_topic(scripts, keys, topic, p, match, page)
        entries[topic] += erased
        outcomes += recorded
    letters = 0
    for p in range(partitions):
        letters += len(await _erase_entries(client, keys.dlq(p), match.owns_letter, page))
    deleted = await _erase_keys(client, keys, match)
    outcomes += await _erase_outcomes(client, keys, match)
    return TenantErasure(
        tenant,
        ingest=entries[Topic.INGEST],
        changes=entries[Topic.CHANGES],
        flush=entries[Topic.FLUSH],
        dlq=letters,
        lifecycle=entries[Topic.LIFECYCLE],
        keys=deleted,
        outcomes=outcomes,
    )


def _selector(topic: Topic, match: TenantMatch) -> Callable[[Mapping[str, str]], bool]:
    if topic in (Topic.INGEST, Topic.LIFECYCLE):
        return lambda fields: match.owns_event(fields.get("event", ""))
    return lambda fields: match.owns_memory(fields.get("memory", ""))


async def _erase_topic(
    scripts: Scripts, keys: Keys, topic: Topic, p: int, match: TenantMatch, page: int
) -> tuple[int, int]:
    """The tenant's entries of one stream, then the outcomes its groups recorded for them."""

    async def remove_marked(ids: list[str]) -> None:
        # Removed and marked in one step, for the appender's batches in flight.
        await scripts("erase_entries", [keys.ingest(p), keys.counters(p)], ids)

    remove = remove_marked if topic is Topic.INGEST else None
    stream = keys.topic(topic, p)
    erased = await _erase_entries(scripts.client, stream, _selector(topic, match), page, remove)
    buckets: dict[str, list[str]] = {}
    for entry_id in erased:
        for group in TOPIC_GROUPS[topic]:
            buckets.setdefault(keys.outcomes(p, entry_id, group.value), []).append(entry_id)
    return len(erased), await _hdel(scripts.client, buckets)


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


async def _erase_keys(client: RedisClient, keys: Keys, match: TenantMatch) -> int:
    deleted = 0
    batch: list[str] = []
    async for name in client.scan_iter(match=f"{_glob(keys.namespace)}:*", count=SCAN_COUNT):
        if match.owns_key(str(name)):
            batch.append(str(name))
        if len(batch) >= DELETE_BATCH:
            deleted += await _delete(client, batch)
            batch = []
    return deleted + await _delete(client, batch)


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
