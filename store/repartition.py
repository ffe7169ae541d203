"""Changing the partition count: drain, move, reset watermarks.

A memory's watermark is an id of its partition's ingest stream, comparable only within
that stream, so the count changes only while nothing runs: no live worker of any group,
no lease held, and every stream drained (no entry pending in any group, none waiting to
be delivered). ``Repartitioner.run`` checks that, then, one idempotent step after the
other (a run that stops half way is finished by running it again):

1. marks the migration in the configuration hash (``repartition_to`` and
   ``repartition_from``): processors refuse to start while it is set;
2. creates the streams and consumer groups of every new partition;
3. raises every new partition's sequence and generation counters to the largest value
   of any partition, so no sequence number or generation is ever handed out twice
   (DESIGN rule 6);
4. moves every memory whose partition changes: its keys are copied into the new
   partition's hash tag, with their remaining time to live, and the tombstone's
   watermark set to the new ingest stream's last delivered id (every entry up to it was
   applied, or refused, before the move; every later one is new), then the old keys are
   deleted. A memory's keys share their partition's hash tag, so the copy is a few
   pipelines, each to one node (no command spans two partitions, so it works on a
   Cluster), with the commands a processor's ACL user has;
5. moves the entries of the tenant, resource and workflow indexes with their memories
   (same scores), and sends the union of every partition's ended workflows to every
   new partition (the end of a workflow is a fact every partition must know);
6. re-homes each dead letter of a moved memory to its new partition's dead letter
   stream (``moved_from`` names where it came from: a replay of either copy then uses
   the same idempotency key);
7. when shrinking, forwards what still waits in the ingest streams of the partitions
   that go (events a producer with the old count published meanwhile) to a partition
   that stays, where they are applied or dead-lettered ``misrouted`` (replay routes
   those by the new count), and deletes those partitions' streams;
8. stores the new count and removes the mark, in that order.

Leases, fences and outcomes stay where they are: fences only ever grow, and an outcome
is looked up by the partition its entry went to.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from memory import partition_for
from store.config import REPARTITION_TO
from store.connection import RedisClient
from store.erasure import SCAN_COUNT, _glob
from store.errors import (
    NotConfiguredError,
    RepartitionError,
    RepartitionInProgressError,
    RepartitionRefusedError,
)
from store.keys import GROUP_TOPIC, SINGLE_PARTITION_TOPICS, TOPIC_GROUPS, Group, Keys, Topic
from store.lock import DistributedLock, LockNotAcquiredError
from store.scripts import Scripts
from store.streams import ensure_groups, group_lag

#: Fields of the configuration hash that mark a migration in progress.
MARK_TO, MARK_FROM = REPARTITION_TO, "repartition_from"
LOCK_NAME = "repartition"
LOCK_TTL = 30.0
CHUNK = 500
#: Memories moved at the same time.
CONCURRENCY = 16
_INDEX_KINDS = ("tenant", "resource", "wf")
_TAGGED = re.compile(r"\{(\d+)\}(?::(.+))?", re.DOTALL)
_PARTITIONED = (Topic.INGEST, Topic.CHANGES, Topic.FLUSH)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Migration:
    """A repartition under way: from ``old`` to ``new`` partitions."""

    old: int
    new: int
    resumed: bool
    #: new partition -> the appender's last delivered id of its ingest stream
    watermarks: dict[int, str] = field(default_factory=dict)

    @property
    def span(self) -> int:
        return max(self.old, self.new)


@dataclass(frozen=True, slots=True)
class Repartitioned:
    """What a run did."""

    old: int
    new: int
    resumed: bool = False
    moved: int = 0  # memories whose keys went to another partition
    kept: int = 0  # memories already in their partition
    index_entries: int = 0
    ended: int = 0  # ended-workflow entries added to partitions that lacked them
    letters: int = 0  # dead letters re-homed
    forwarded: int = 0  # waiting entries of dropped partitions sent to one that stays
    streams_deleted: int = 0
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def repartition_target(client: RedisClient, keys: Keys) -> int | None:
    """The count a migration in progress moves to, or None."""
    value = await client.hget(keys.config, MARK_TO)
    return None if value is None else int(value)


async def refuse_while_repartitioning(
    client: RedisClient, keys: Keys, partitions: int | None = None
) -> None:
    """Raise RepartitionInProgressError while a migration is marked, or (given the count
    the caller uses) when the stored count is another one."""
    stored, target = _texts(await client.hmget(keys.config, ["partitions", MARK_TO]))
    if target is not None:
        raise RepartitionInProgressError(
            f"the partition count is changing to {target}: processors may start once "
            f"`memstream repartition {target} --yes` has finished (run it again if it "
            f"was interrupted)"
        )
    if partitions is not None and stored is not None and int(stored) != partitions:
        raise RepartitionInProgressError(
            f"the partition count is now {stored}, not the {partitions} this process "
            f"read when it started: start it again"
        )


def _texts(values: Sequence[Any]) -> list[str | None]:
    return [None if v is None else str(v) for v in values]


def _kv(flat: Any) -> dict[str, Any]:
    if isinstance(flat, dict):
        return {str(k): v for k, v in flat.items()}
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


@dataclass(slots=True)
class _Found:
    """The partitioned keys of the namespace, from one SCAN."""

    memories: dict[str, set[int]] = field(default_factory=dict)
    indexes: set[tuple[str, int, str]] = field(default_factory=set)
    ended: dict[str, set[int]] = field(default_factory=dict)
    ingest: set[int] = field(default_factory=set)


class Repartitioner:
    """Changes the partition count of one namespace (see the module doc)."""

    def __init__(
        self,
        client: RedisClient,
        scripts: Scripts,
        keys: Keys,
        *,
        member_ttl_ms: int,
        poll: float = 1.0,
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._keys = keys
        self._member_ttl_ms = member_ttl_ms
        self._poll = poll

    async def run(
        self,
        new: int,
        *,
        wait: float = 0.0,
        on_wait: Callable[[list[str]], None] | None = None,
    ) -> Repartitioned:
        """Change the count to ``new``, or finish the interrupted change to ``new``.
        With ``wait``, poll that many seconds for the preconditions to hold. When the
        count is ``new`` already, events waiting in the ingest streams of partitions
        past it (published by producers that still use an older count) are forwarded
        to a partition that stays, and those streams deleted; nothing else is done."""
        started = time.monotonic()
        lock = DistributedLock(self._scripts, self._keys)
        try:
            async with lock.hold(LOCK_NAME, LOCK_TTL):
                migration = await self.begin(new, wait=wait, on_wait=on_wait)
                if migration is None:
                    # The count is ``new`` already: only events that producers with an
                    # older count left in partitions past it are forwarded.
                    swept = await self._drop_partitions(
                        Migration(new, new, False), await self._scan()
                    )
                    done = Repartitioned(new, new, forwarded=swept[0], streams_deleted=swept[1])
                else:
                    done = await self.migrate(migration)
        except LockNotAcquiredError as e:
            raise RepartitionRefusedError(
                ["another `memstream repartition` is running: wait for it to finish"]
            ) from e
        return replace(done, seconds=round(time.monotonic() - started, 3))

    async def begin(
        self,
        new: int,
        *,
        wait: float = 0.0,
        on_wait: Callable[[list[str]], None] | None = None,
    ) -> Migration | None:
        """Check the preconditions and mark the migration; None when the count is
        ``new`` already. A mark from an interrupted run to ``new`` is taken over."""
        if new < 1:
            raise ValueError(f"partition count must be at least 1, got {new}")
        stored, target, origin = _texts(
            await self._client.hmget(self._keys.config, ["partitions", MARK_TO, MARK_FROM])
        )
        if stored is None:
            raise NotConfiguredError(
                f"no partition count in {self._keys.config}: nothing to repartition "
                f"(set MEMSTREAM_PARTITIONS before the first start instead)"
            )
        resumed = target is not None
        if target is not None and int(target) != new:
            raise RepartitionRefusedError(
                [
                    f"a change of the partition count to {target} was interrupted: finish "
                    f"it first with `memstream repartition {target} --yes`"
                ]
            )
        old = int(origin) if origin is not None and resumed else int(stored)
        if not resumed and old == new:
            return None
        deadline = time.monotonic() + wait
        while True:
            problems = await self.problems(old, new, resumed=resumed)
            if not problems:
                if not resumed:
                    await self._client.hset(
                        self._keys.config, mapping={MARK_TO: new, MARK_FROM: old}
                    )
                # From here no worker takes a lease of any partition (acquire_lease
                # checks the partition's count), not even one paused past its lease.
                await self._set_counts(max(old, new), "moving")
                # A worker that started before the mark was set is a member by now.
                problems = await self.problems(old, new, resumed=resumed)
                if not problems:
                    return Migration(old, new, resumed, await self._watermarks(new))
                if not resumed:
                    await self._set_counts(max(old, new), str(old))
                    await self._client.hdel(self._keys.config, MARK_TO, MARK_FROM)
            if time.monotonic() >= deadline:
                raise RepartitionRefusedError(problems)
            if on_wait is not None:
                on_wait(problems)
            await asyncio.sleep(min(self._poll, max(0.0, deadline - time.monotonic())))

    async def problems(self, old: int, new: int, *, resumed: bool = False) -> list[str]:
        """What stops a change from ``old`` to ``new`` partitions now (empty: nothing).
        Events waiting in an ingest stream that no worker reads (a partition past the
        current count), or published during an interrupted run, do not: they are
        applied or dead-lettered after the change."""
        found: list[str] = []
        span = max(old, new)
        for group in Group:
            members = await self._scripts(
                "heartbeat", [self._keys.members(group.value)], ["", self._member_ttl_ms, "0"]
            )
            if members:
                found.append(
                    f"{group.value}: {len(members)} live worker(s) ({', '.join(map(str, members))})"
                    f": stop every processor first"
                )
        held = await self._held_leases(span)
        if held:
            found.append(
                f"leases still held ({', '.join(held)}): stop the workers holding them, or "
                f"wait for the lease TTL after a crash"
            )
        for topic, p in [
            *((t, p) for t in _PARTITIONED for p in range(span)),
            (Topic.LIFECYCLE, 0),
        ]:
            stream = self._keys.topic(topic, p)
            try:
                infos = [
                    _kv(i) for i in await self._client.execute_command("XINFO", "GROUPS", stream)
                ]
            except ResponseError:
                continue  # no such stream
            for group in TOPIC_GROUPS[topic]:
                info = next((i for i in infos if str(i.get("name")) == group.value), None)
                if info is None:
                    if p < old and await self._client.xlen(stream):
                        found.append(
                            f"{stream} has no {group.value} group: its entries were never read"
                        )
                    continue
                pending = int(info.get("pending", 0))
                if pending:
                    found.append(
                        f"{stream}: {_entries(pending)} pending in group {group.value}: run the "
                        f"{group.value} until `memstream status` shows none, then stop it"
                    )
                if topic is Topic.INGEST and (p >= old or resumed):
                    continue
                lag = await group_lag(self._client, stream, info)
                if lag:
                    found.append(
                        f"{stream}: {_entries(lag)} not yet delivered to group {group.value}: stop "
                        f"the producers and let the processors drain (`memstream status` lag 0)"
                    )
        return found

    async def _held_leases(self, span: int) -> list[str]:
        names = [
            (group, p)
            for group in Group
            for p in range(1 if GROUP_TOPIC[group] in SINGLE_PARTITION_TOPICS else span)
        ]
        pipe = self._client.pipeline(transaction=False)
        for group, p in names:
            pipe.exists(self._keys.lease(p, group.value))
        held = await pipe.execute()
        return [f"{g.value} {p}" for (g, p), n in zip(names, held, strict=True) if int(n)]

    async def _appender_floor(self, p: int) -> str | None:
        """The appender's last delivered id of ingest:{p}; None without the group."""
        try:
            infos = await self._client.execute_command("XINFO", "GROUPS", self._keys.ingest(p))
        except ResponseError:
            return None
        for info in map(_kv, infos):
            if str(info.get("name")) == Group.APPENDER.value:
                return str(info.get("last-delivered-id", "0-0"))
        return None

    async def _watermarks(self, new: int) -> dict[int, str]:
        for q in range(new):
            await ensure_groups(self._scripts, self._keys, q)
        return {q: await self._appender_floor(q) or "0-0" for q in range(new)}

    async def migrate(self, m: Migration, *, only: Collection[int] | None = None) -> Repartitioned:
        """Every step after ``begin``; with ``only``, just the memories held in those
        partitions are moved and the run stops there (an interrupted run, for tests)."""
        await self.raise_counters(m)
        found = await self._scan()
        moved, kept = await self._move_memories(m, found, only)
        if only is not None:
            return Repartitioned(m.old, m.new, m.resumed, moved=moved, kept=kept)
        entries = sum([await self._move_index(m, *index) for index in sorted(found.indexes)])
        ended = await self._copy_ended(m, found)
        letters = await self._rehome_letters(m)
        forwarded, deleted = await self._drop_partitions(m, found)
        # Every partition, kept or dropped, now refuses a lease to a worker of another
        # count; then the count itself changes.
        await self._set_counts(m.span, str(m.new))
        await self._client.hset(self._keys.config, "partitions", m.new)
        await self._client.hdel(self._keys.config, MARK_TO, MARK_FROM)
        return Repartitioned(
            m.old, m.new, m.resumed, moved, kept, entries, ended, letters, forwarded, deleted
        )

    async def _set_counts(self, span: int, value: str) -> None:
        """Set the count partitions 0 .. span-1 belong to (checked by acquire_lease)."""
        pipe = self._client.pipeline(transaction=False)
        for p in range(span):
            pipe.set(self._keys.partition_count(p), value)
        await pipe.execute()

    async def raise_counters(self, m: Migration) -> None:
        pipe = self._client.pipeline(transaction=False)
        for p in range(m.span):
            pipe.hmget(self._keys.counters(p), ["seq", "gen"])
        values = await pipe.execute()
        top = [max(int(v[i] or 0) for v in values) for i in (0, 1)]
        for q in range(m.new):
            seq, gen = (int(x or 0) for x in values[q])
            if (seq, gen) != tuple(top):
                await self._client.hset(
                    self._keys.counters(q), mapping={"seq": top[0], "gen": top[1]}
                )

    async def _scan(self) -> _Found:
        """Memories, indexes, ended sets and ingest streams, by partition."""
        found = _Found()
        k = self._keys
        prefix = f"{k.namespace}:"
        async for raw in self._client.scan_iter(match=f"{_glob(k.namespace)}:*", count=SCAN_COUNT):
            name = str(raw)
            kind, _, rest = name[len(prefix) :].partition(":")
            tagged = _TAGGED.fullmatch(rest)
            if tagged is None:
                continue
            p, tail = int(tagged[1]), tagged[2] or ""
            if kind == "m":
                memory_id, _, suffix = tail.rpartition(":")
                if getattr(k.memory(p, memory_id), suffix, None) == name:
                    found.memories.setdefault(memory_id, set()).add(p)
            elif kind in _INDEX_KINDS and self._index(kind, p, tail) == name:
                found.indexes.add((kind, p, tail))
            elif kind == "ended" and k.ended(p, tail) == name:
                found.ended.setdefault(tail, set()).add(p)
            elif kind == Topic.INGEST.value and k.ingest(p) == name:
                found.ingest.add(p)
        return found

    def _index(self, kind: str, p: int, tail: str) -> str:
        if kind == "tenant":
            return self._keys.tenant_index(p, tail)
        first, _, second = tail.partition("/")
        if kind == "resource":
            return self._keys.resource_index(p, first, second)
        return self._keys.workflow_index(p, first, second)

    async def _move_memories(
        self, m: Migration, found: _Found, only: Collection[int] | None
    ) -> tuple[int, int]:
        kept = 0
        work: list[tuple[str, list[int], int]] = []
        for memory_id, held in sorted(found.memories.items()):
            target = partition_for(memory_id, m.new)
            # The copy in the old count's partition is the one every other comes from.
            sources = sorted(held - {target}, key=lambda p: p == partition_for(memory_id, m.old))
            if only is not None:
                sources = [p for p in sources if p in only]
            if sources:
                work.append((memory_id, sources, target))
            else:
                kept += target in held

        async def move(memory_id: str, sources: list[int], target: int) -> None:
            for p in sources:
                await self._move_memory(memory_id, p, target, m.watermarks[target])

        # Memories are independent: a few are moved at a time.
        for i in range(0, len(work), CONCURRENCY):
            await asyncio.gather(*(move(*w) for w in work[i : i + CONCURRENCY]))
        return len(work), kept

    async def _move_memory(self, memory_id: str, p: int, q: int, watermark: str) -> None:
        """Make the keys in ``q`` a copy of those in ``p`` (a key missing in ``p`` is
        removed in ``q``), reset the watermark, then delete the keys in ``p``.

        A memory's keys share a hash tag, so each step is one pipeline to one node: read
        the keys' types and TTLs, read their contents (a first page of each; a key
        larger than a page is read on, page by page), delete the copies' old state, write
        the copies, delete the originals. A step that stops half way is redone by
        running the move again."""
        c = self._client
        src, dst = self._keys.memory(p, memory_id), self._keys.memory(q, memory_id)
        pipe = c.pipeline(transaction=False)
        for key in src.all():
            pipe.type(key)
            pipe.pttl(key)
        found = await pipe.execute()
        kinds = {k: str(t) for k, t in zip(src.all(), found[0::2], strict=True)}
        ttls = {k: int(t) for k, t in zip(src.all(), found[1::2], strict=True)}
        live = [k for k in src.all() if kinds[k] != "none" and ttls[k] != -2]
        contents = await self._contents(live, kinds)
        # The copies' old state goes first, alone: a Cluster pipeline may send a
        # redirected command again after the others, which must not be this DEL.
        await c.delete(*dst.all())
        pipe = c.pipeline(transaction=False)
        for a, b in zip(src.all(), dst.all(), strict=True):
            if not contents.get(a):  # gone, or expired since its type was read
                continue
            if a == src.tomb:  # the watermark is written with the rest
                contents[a]["wm"] = watermark
            for part in _chunks(contents[a]):
                if kinds[a] == "zset":
                    pipe.zadd(b, part)
                else:
                    mapping: dict[Any, Any] = part
                    pipe.hset(b, mapping=mapping)
            if ttls[a] >= 0:  # 0: it expires within the millisecond
                pipe.pexpire(b, max(ttls[a], 1))
        if len(pipe):
            await pipe.execute()
        await c.delete(*src.all())

    async def _contents(
        self, live: list[str], kinds: Mapping[str, str]
    ) -> dict[str, dict[str, Any]]:
        """The members (with scores) or fields of each key, read in one pipeline of first
        pages; keys with more go on page by page."""
        c = self._client
        pipe = c.pipeline(transaction=False)
        for key in live:
            if kinds[key] == "zset":
                pipe.zscan(key, 0, count=SCAN_COUNT)
            elif kinds[key] == "hash":
                pipe.hscan(key, 0, count=SCAN_COUNT)
            else:
                raise RepartitionError(
                    f"{key} is a {kinds[key]}: a memory's keys are hashes and sorted sets"
                )
        pages = await pipe.execute() if live else []
        contents: dict[str, dict[str, Any]] = {}
        for key, (cursor, page) in zip(live, pages, strict=True):
            zset = kinds[key] == "zset"
            got: dict[str, Any] = _page(page, zset)
            while int(cursor):
                reply: Any = await (c.zscan if zset else c.hscan)(key, cursor, count=SCAN_COUNT)
                cursor, more = reply
                got.update(_page(more, zset))
            contents[key] = got
        return contents

    async def _move_index(self, m: Migration, kind: str, p: int, tail: str) -> int:
        """Entries of one index whose memory now lives in another partition go to that
        partition's index of the same name, with the same score."""
        c, src = self._client, self._index(kind, p, tail)
        moving: dict[int, dict[str, float]] = {}
        async for member, score in c.zscan_iter(src, count=SCAN_COUNT):
            q = partition_for(str(member), m.new)
            if q != p:
                moving.setdefault(q, {})[str(member)] = score
        if not moving:
            return 0
        ttl = int(await c.pttl(src))
        for q, entries in moving.items():
            dst = self._index(kind, q, tail)
            for part in _chunks(entries):
                await c.zadd(dst, part)
            if ttl > 0 and int(await c.pttl(dst)) < ttl:
                await c.pexpire(dst, ttl)
        gone = [member for entries in moving.values() for member in entries]
        for i in range(0, len(gone), CHUNK):
            await c.zrem(src, *gone[i : i + CHUNK])
        return len(gone)

    async def _copy_ended(self, m: Migration, found: _Found) -> int:
        """Every partition learns every ended workflow of every tenant."""
        c, added = self._client, 0
        for tenant, held in sorted(found.ended.items()):
            union: dict[str, float] = {}
            for p in held:
                async for workflow, until in c.zscan_iter(self._keys.ended(p, tenant)):
                    union[str(workflow)] = max(until, union.get(str(workflow), 0.0))
            if not union:
                continue
            last = int(max(union.values()))
            for q in range(m.new):
                key = self._keys.ended(q, tenant)
                for part in _chunks(union):
                    added += int(await c.zadd(key, part, gt=True) or 0)
                await c.pexpireat(key, max(last, await _deadline(c, key)))
            for p in held:
                if p >= m.new:
                    await c.delete(self._keys.ended(p, tenant))
        return added

    async def _rehome_letters(self, m: Migration) -> int:
        """Dead letters of a memory in another partition now go to its dead letters
        (those without a memory, in a partition that goes, to a partition that stays);
        lifecycle letters stay in partition 0."""
        c, k = self._client, self._keys
        # The letters each partition already holds a copy of (a run that stopped between
        # copying a letter and deleting it); a letter's own stream never counts as its
        # copy (it may carry ``moved_from`` from an earlier move).
        present: dict[int, set[str]] = {q: set() for q in range(m.new)}
        for q in range(m.new):
            async for _, fields in _stream(c, k.dlq(q)):
                if "moved_from" in fields:
                    present[q].add(fields["moved_from"])
        moved = 0
        for p in range(m.span):
            async for letter_id, fields in _stream(c, k.dlq(p)):
                if p == 0 and fields.get("source") == k.lifecycle:
                    continue
                memory_id = fields.get("memory")
                q = partition_for(memory_id, m.new) if memory_id else p % m.new
                if q == p:
                    continue
                origin = fields.get("moved_from") or f"{p}:{letter_id}"
                if origin not in present[q]:
                    letter: dict[Any, Any] = {**fields, "moved_from": origin}
                    await c.xadd(k.dlq(q), letter)
                    present[q].add(origin)
                await c.xdel(k.dlq(p), letter_id)
                moved += 1
        return moved

    async def _drop_partitions(self, m: Migration, found: _Found) -> tuple[int, int]:
        """Streams of partitions past the new count: what waits in an ingest stream is
        forwarded to a partition that stays (applied there, or dead-lettered
        ``misrouted``), then the streams are deleted."""
        c, k = self._client, self._keys
        forwarded = deleted = 0
        for p in sorted({*range(m.new, m.old), *(p for p in found.ingest if p >= m.new)}):
            floor = await self._appender_floor(p) or "0-0"
            start = "-" if floor == "0-0" else f"({floor}"
            while True:
                waiting = await c.xrange(k.ingest(p), min=start, max="+", count=CHUNK) or []
                for entry_id, fields in waiting:
                    event: dict[Any, Any] = dict(fields or {})
                    await c.xadd(k.ingest(p % m.new), event)
                    await c.xdel(k.ingest(p), str(entry_id))
                    forwarded += 1
                if len(waiting) < CHUNK:
                    break
            for topic in _PARTITIONED:
                deleted += int(await c.delete(k.topic(topic, p)))
            if not await c.xlen(k.dlq(p)):
                deleted += int(await c.delete(k.dlq(p)))
        return forwarded, deleted


def _page(page: Any, zset: bool) -> dict[str, Any]:
    """A page of ZSCAN (member, score pairs) or HSCAN (a dict) as member or field -> value."""
    if zset:
        return {str(member): score for member, score in page}
    return {str(f): str(v) for f, v in page.items()}


def _chunks(items: Mapping[str, V]) -> list[dict[str, V]]:
    pairs = list(items.items())
    return [dict(pairs[i : i + CHUNK]) for i in range(0, len(pairs), CHUNK)]


async def _deadline(client: RedisClient, key: str) -> int:
    """When ``key`` expires (ms since the epoch by the Redis clock), or 0."""
    ttl = int(await client.pttl(key))
    if ttl < 0:
        return 0
    seconds, micros = (int(x or 0) for x in await client.time())
    return int(seconds) * 1000 + int(micros) // 1000 + ttl


async def _stream(client: RedisClient, name: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    start = "-"
    while True:
        entries = await client.xrange(name, min=start, max="+", count=CHUNK) or []
        for entry_id, fields in entries:
            yield str(entry_id), {str(a): str(b) for a, b in (fields or {}).items()}
        if len(entries) < CHUNK:
            return
        start = f"({entries[-1][0]!s}"
