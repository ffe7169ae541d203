"""The publisher SDK: publish memory events (one, or a batch in one round trip), get
entry ids back, and optionally wait for each entry's outcome (read-your-writes)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, ClusterDownError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.codec import DEFAULT_MAX_EVENT_BYTES, MAX_JSON_DEPTH, event_json, json_depth_over
from events.envelope import (
    AnyEvent,
    AppendPayload,
    ClearPayload,
    EndedPayload,
    ErasePayload,
    FlushPayload,
    FlushRequested,
    MemoryCleared,
    MemoryDeleted,
    MemoryEvent,
    MemoryName,
    MemoryPayload,
    MemoryReplaced,
    MemoryRestored,
    MessageAppended,
    MessageErased,
    ReplacePayload,
    RestorePayload,
    TerminatedPayload,
    WorkflowEnded,
    WorkflowPayload,
    WorkflowStarted,
    WorkflowStatus,
    WorkflowTerminated,
)
from events.errors import (
    BacklogFullError,
    NotDurableError,
    PartiallyPublishedError,
    PartitionsChangingError,
    PublishError,
    PublishOutcomeUnknownError,
    ReadOnlyError,
    RedisOutOfMemoryError,
    RedisUnavailableError,
    is_out_of_memory,
)
from events.limits import RequestLimits
from memory import (
    FlushStrategy,
    MemoryRef,
    Message,
    ResolvedMemory,
    ResourceRegistry,
    partition_for,
)
from memory.privacy import workflow_names
from store import (
    TRANSIENT_ERRORS,
    CircuitOpenError,
    ConnectionsBusyError,
    Group,
    Keys,
    MemoryReader,
    Outcome,
    OutcomeStatus,
    RedisClient,
    Scripts,
    Topic,
    WaitTimeoutError,
    ensure_groups,
    ensure_partitions,
)
from store.config import PARTITIONS_TTL, read_partitions
from store.replicas import run_then_wait

T = TypeVar("T")
#: A producer creates the consumer groups of the streams it writes, no others.
INGEST_ONLY = (Topic.INGEST,)
#: How the reason of an event starts when its partition's Redis node could not be
#: reached: nothing was sent to it, or it did not answer.
UNREACHED = (
    "not published, Redis unreachable",
    "outcome unknown, Redis failed",
    "not published, no connection free",
)
#: Errors of a call that sent nothing: the breaker was open, or every connection of the
#: client stayed busy.
NOT_SENT = (CircuitOpenError, ConnectionsBusyError)
UNKNOWN_OUTCOME = (
    "the events may or may not be published; publish them again with the same "
    "idempotency keys, they apply at most once"
)
#: Replies of a Cluster node that is changing hands (a failover, a resharding): the
#: script did not run there, so nothing was published to that partition.
MOVING = (ClusterDownError, AskError)
#: How many times a durable publish on a Cluster follows MOVED before it gives up.


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where a published event went: its partition and stream entry id."""

    partition: int
    entry_id: str
    event_id: str
    idempotency_key: str

    @property
    def token(self) -> str:
        """A read-your-writes token: ``<partition>/<entry id>``."""
        return f"{self.partition}/{self.entry_id}"


@dataclass(frozen=True, slots=True)
class Published:
    """A published event: its receipt, and its outcome when waited for. An event the
    memory's privacy policy never stores is not published at all: no receipt, and the
    outcome says so."""

    receipt: Receipt | None
    outcome: Outcome | None = None


class Publisher:
    """Publishes memory events to their partitions' ingest streams."""

    def __init__(
        self,
        client: RedisClient,
        *,
        keys: Keys | None = None,
        scripts: Scripts | None = None,
        default_partitions: int = 16,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        registry: ResourceRegistry | None = None,
        limits: RequestLimits | None = None,
        backlog_wait: float = 0.0,
        durable: int = 0,
        durable_timeout: float = 1.0,
    ) -> None:
        """With ``registry`` (the memory resources and agents), messages are redacted by
        their resource's privacy policy before they are written, non-persistable ones
        are not written at all, and read-only agents are refused. Without it, the
        appender still applies the policy, but the raw event stays in ingest:{p} until
        retention trims it.

        A stream holding more than ``limits.max_backlog`` entries refuses new events;
        the publisher then tries again for up to ``backlog_wait`` seconds (backing off)
        before it raises BacklogFullError.

        With ``durable=N`` (N >= 1), a publish returns only once its events reached N
        replicas of the master that holds them (Redis ``WAIT``, for up to
        ``durable_timeout`` seconds, which must be shorter than the client's socket
        timeout); otherwise it raises NotDurableError: the events are published on the
        master, but a failover could lose them."""
        if durable < 0:
            raise ValueError("durable is a replica count: 0 (off) or more")
        if durable and durable_timeout <= 0:
            raise ValueError("durable_timeout must be above 0 (WAIT 0 would block forever)")
        self._client = client
        self._registry = registry
        self._keys = keys or Keys()
        self._scripts = scripts or Scripts(client)
        self._default_partitions = default_partitions
        self._limits = limits or RequestLimits(max_event_bytes=max_event_bytes)
        self._max_event_bytes = self._limits.max_event_bytes
        self._backlog_wait = backlog_wait
        self._durable = durable
        self._durable_ms = max(1, int(durable_timeout * 1000))
        self._partitions: int | None = None
        self._partitions_read = 0.0
        self._ready: set[int] = set()
        self._lifecycle_ready = False
        self.reader = MemoryReader(client, self._scripts, self._keys)

    async def partitions(self) -> int:
        """The partition count stored in Redis (stored first if none is set), read again
        every PARTITIONS_TTL seconds; raises PartitionsChangingError while
        ``memstream repartition`` runs."""
        now = time.monotonic()
        if self._partitions is not None and now - self._partitions_read < PARTITIONS_TTL:
            return self._partitions
        stored, target = await self._guard(read_partitions(self._client, self._keys))
        if target is not None:
            raise PartitionsChangingError(
                f"the partition count is changing to {target}: nothing was published; "
                f"publish again once `memstream repartition` has finished"
            )
        if stored is None:
            stored = await self._guard(
                ensure_partitions(self._client, self._keys, self._default_partitions)
            )
        self._partitions, self._partitions_read = stored, now
        return stored

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except TRANSIENT_ERRORS as e:
            if is_out_of_memory(e):
                raise RedisOutOfMemoryError(str(e)) from e
            if isinstance(e, ConnectionsBusyError):
                raise RedisUnavailableError(f"nothing was published: {e}") from e
            raise RedisUnavailableError(f"Redis is unreachable, nothing was published: {e}") from e

    async def publish(
        self, event: MemoryEvent, *, wait: bool = False, timeout: float = 10.0
    ) -> Published:
        """Publish one event; with ``wait``, return once its outcome is known."""
        return (await self.publish_many([event], wait=wait, timeout=timeout))[0]

    async def publish_many(
        self, events: Sequence[MemoryEvent], *, wait: bool = False, timeout: float = 10.0
    ) -> list[Published]:
        """Publish a batch in one round trip, in order; entry ids come back in order.

        Every event gets an idempotency key (its own, or its event id) and the partition
        count it was routed with.
        """
        if not events:
            return []
        limits = self._limits
        if len(events) > limits.max_messages:
            raise PublishError(
                f"a batch of {len(events)} events, over the limit of {limits.max_messages} "
                f"per call (MEMSTREAM_MAX_MESSAGES); publish it in parts"
            )
        kept = [self._apply_policy(event) for event in events]
        try:
            routed, replies = await self._route_and_send(kept)
        except PartitionsChangingError:
            if self._partitions is not None:
                raise  # a change in progress: the caller publishes again later
            # The count changed since it was read (and nothing was published): once
            # more, with the count read again.
            routed, replies = await self._route_and_send(kept)
        receipts = [
            Receipt(p, str(entry_id), e.event_id, str(e.idempotency_key))
            for (p, e, _), entry_id in zip(routed, replies, strict=True)
        ]
        outcomes: list[Outcome | None] = [None] * len(receipts)
        if wait and receipts:
            waited = await self.reader.wait_applied_many(
                [(r.partition, r.entry_id, r.event_id) for r in receipts], timeout
            )
            outcomes = list(waited)
        published = iter(zip(receipts, outcomes, strict=True))
        return [
            Published(None, item) if isinstance(item, Outcome) else Published(*next(published))
            for item in kept
        ]

    async def _route_and_send(
        self, kept: Sequence[MemoryEvent | Outcome]
    ) -> tuple[list[tuple[int, MemoryEvent, str]], list[str]]:
        """Route the events by the current count and publish them."""
        limits = self._limits
        n = await self.partitions()
        now = int(time.time() * 1000)
        routed: list[tuple[int, MemoryEvent, str]] = []
        total = 0
        for event in (e for e in kept if not isinstance(e, Outcome)):
            stamped = event.model_copy(
                update={
                    "idempotency_key": event.idempotency_key or event.event_id,
                    "partitions": n,
                    "published_at_ms": event.published_at_ms or now,
                }
            )
            text = event_json(stamped)
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
            total += size
            # (An event's text cannot hold a message over the limit when it is that short.)
            if 4 * len(text) > limits.max_message_bytes or len(_messages_of(event)) > 1:
                problem = limits.message_problem(_messages_of(event), event_chars=len(text))
                if problem:
                    raise PublishError(f"event {event.event_id}: {problem}")
            if size > self._max_event_bytes:
                raise PublishError(
                    f"event {event.event_id} is {size} bytes, over the "
                    f"{self._max_event_bytes}-byte limit; split the content or raise "
                    f"max_event_bytes on producers and workers"
                )
            if json_depth_over(text):
                raise PublishError(
                    f"event {event.event_id} nests arrays and objects more than "
                    f"{MAX_JSON_DEPTH} deep (the event contract's limit, which every reader "
                    f"can parse); flatten the message's metadata"
                )
            memory = stamped.payload.memory  # validated: no need to build a MemoryRef
            memory_id = f"{stamped.tenant}/{memory.resource}/{memory.key}"
            routed.append((partition_for(memory_id, n), stamped, text))
        if total > limits.max_request_bytes:
            raise PublishError(
                f"the batch is {total} bytes, over the {limits.max_request_bytes}-byte limit "
                f"of one call (MEMSTREAM_MAX_REQUEST_BYTES); publish it in parts"
            )
        for p in sorted({p for p, _, _ in routed} - self._ready):
            await self._guard(ensure_groups(self._scripts, self._keys, p, INGEST_ONLY))
            self._ready.add(p)
        per_partition = Counter(p for p, _, _ in routed)
        bound = limits.max_backlog
        if bound and per_partition and max(per_partition.values()) > bound:
            raise PublishError(
                f"{max(per_partition.values())} events for one partition in one call, more "
                f"than its stream may hold (MEMSTREAM_MAX_BACKLOG={bound}); publish them "
                f"in parts"
            )
        return routed, (await self._send(routed) if routed else [])

    def _apply_policy(self, event: MemoryEvent) -> MemoryEvent | Outcome:
        """The event as its resource's privacy policy lets it be written (or the outcome
        of not writing it); ReadOnlyError for an agent that may only read."""
        if self._registry is None:
            return event
        ref = event.ref
        agent_id = event.payload.agent_id
        if self._registry.read_only(agent_id, ref.resource):
            raise ReadOnlyError(
                f"agent {agent_id!r} may only read {ref.resource} memories; nothing was published"
            )
        workflow_id = event.payload.workflow_id
        if workflow_id and self._registry.workflow_name(workflow_id) != workflow_id:
            # Named as the appender names it: its id never reaches Redis.
            payload = event.payload.model_copy(
                update={"workflow_id": self._registry.workflow_name(workflow_id)}
            )
            event = event.model_copy(update={"payload": payload})
        resource = self._registry.find(ref.resource)
        if resource is None or not resource.privacy_policy.active:
            return event
        policy = resource.privacy_policy
        if policy.matches(ref.key):
            raise PublishError(
                f"the memory key matches a redaction pattern of {ref.resource}: render keys "
                f"from ids, never from personal data; nothing was published"
            )
        if isinstance(event, MessageAppended):
            message = event.payload.message
            if not policy.persists(message):
                return Outcome(
                    OutcomeStatus.REFUSED,
                    reason="non_persistable",
                    detail=f"{ref.resource} never stores these messages "
                    f"(privacy_policy.non_persistable_message_types); nothing was published",
                    event_id=event.event_id,
                )
            payload = event.payload.model_copy(update={"message": policy.redact(message)})
            return event.model_copy(update={"payload": payload})
        if isinstance(event, MemoryReplaced):
            messages = [policy.redact(m) for m in event.payload.messages if policy.persists(m)]
            replaced = event.payload.model_copy(update={"messages": messages})
            return event.model_copy(update={"payload": replaced})
        return event

    async def _send(
        self, routed: Sequence[tuple[int, AnyEvent, str]], *, lifecycle: bool = False
    ) -> list[str]:
        """Publish the events, one script per partition (each all or none, in order), all
        in one pipeline; the entry ids, in the order of ``routed`` (``lifecycle``: to the
        lifecycle stream, partition 0)."""
        by_partition: dict[int, list[int]] = {}
        for i, (p, _, _) in enumerate(routed):
            by_partition.setdefault(p, []).append(i)
        ids: list[str | None] = [None] * len(routed)
        failed: list[tuple[int, str]] = []
        full: dict[int, int] = {}  # partition -> entries its stream held when refused
        recounted: set[int] = set()  # partitions refused: routed with an old count
        deadline = time.monotonic() + self._backlog_wait
        delay, reloaded = 0.05, False
        moving = False  # a Cluster node refused a partition while changing hands
        confirmed: dict[int, int] = {}  # partition -> replicas that confirmed its events
        unsent: dict[int, BaseException] = {}  # partition -> why nothing was sent to it
        unknown: dict[int, BaseException] = {}  # partition -> why its outcome is unknown
        todo = list(by_partition)
        while todo:
            replies, replicas = await self._partly(
                self._pipeline(routed, by_partition, todo, lifecycle),
                routed,
                ids,
                confirmed,
                failed,
                unknown,
            )
            lost: list[int] = []
            full = {}
            for p, reply, count in zip(todo, replies, replicas, strict=True):
                if isinstance(reply, NoScriptError):
                    lost.append(p)
                elif isinstance(reply, TRANSIENT_ERRORS) and not isinstance(reply, ResponseError):
                    # A Cluster node not reached: its breaker open (nothing was sent to
                    # it) or no reply (the script may have run).
                    (unsent if isinstance(reply, NOT_SENT) else unknown)[p] = reply
                    failed.extend((i, unreached(reply)) for i in by_partition[p])
                elif isinstance(reply, BaseException):
                    moving = moving or isinstance(reply, MOVING)
                    failed.extend((i, str(reply)) for i in by_partition[p])
                elif reply and str(reply[0]) == "backlog":
                    full[p] = int(reply[1])
                elif reply and str(reply[0]) == "count":
                    # Routed with a count the partition no longer belongs to: the next
                    # publish reads the count again.
                    self._partitions = None
                    recounted.add(p)
                    failed.extend(
                        (i, f"count: partition {p} now belongs to count {reply[1]}")
                        for i in by_partition[p]
                    )
                else:
                    for i, entry_id in zip(by_partition[p], reply, strict=True):
                        ids[i] = str(entry_id)
                    confirmed[p] = count
            if lost and reloaded:  # NOSCRIPT again right after loading: give up on them
                failed.extend(
                    (i, "the publish script is missing") for p in lost for i in by_partition[p]
                )
                lost = []
            elif lost:  # Redis lost the scripts (a restart, a failover): load them again
                await self._partly(
                    self._guard(self._scripts.load()), routed, ids, confirmed, failed, unknown
                )
                reloaded = True
            if full and time.monotonic() < deadline:
                await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
                todo = lost + sorted(full)
                continue
            todo = lost

        if all(i is None for i in ids) and (unknown or unsent):
            self._raise_unreached(routed, unsent, unknown, len(by_partition))
        return self._result(
            routed, by_partition, ids, failed, full, recounted, moving, confirmed, lifecycle
        )

    def _raise_unreached(
        self,
        routed: Sequence[tuple[int, AnyEvent, str]],
        unsent: dict[int, BaseException],
        unknown: dict[int, BaseException],
        partitions: int,
    ) -> None:
        """Nothing was published and some partitions' nodes could not be reached: the
        outcome is unknown if any of them was sent, else nothing was published."""
        if unknown:
            _, error = min(unknown.items())
            raise PublishOutcomeUnknownError(
                f"Redis failed ({error}): {UNKNOWN_OUTCOME}",
                idempotency_keys=[str(e.idempotency_key) for _, e, _ in routed],
            ) from error
        if unsent:
            _, error = min(unsent.items())
            others = partitions - len(unsent)
            why = (
                "Redis is unreachable, nothing was published (fail-fast)"
                if isinstance(error, CircuitOpenError)
                else "nothing was published"
            )
            raise RedisUnavailableError(
                f"{why}: {error}"
                + (f"; the other {others} partition(s) were refused too" if others else "")
            ) from error

    async def _partly(
        self,
        step: Awaitable[T],
        routed: Sequence[tuple[int, AnyEvent, str]],
        ids: list[str | None],
        confirmed: dict[int, int],
        failed: list[tuple[int, str]],
        unknown: Mapping[int, BaseException],
    ) -> T:
        """Run a step of a publish. When it fails after an earlier round published some
        events (a backlog wait, scripts loaded again), raise PartiallyPublishedError with
        the receipts of those, never an error saying nothing was published; when an
        earlier round sent some to a node that did not answer, never say that nothing
        was published either."""
        try:
            return await step
        except PublishError as error:
            partly = error
        if all(i is None for i in ids):
            if unknown:
                raise PublishOutcomeUnknownError(
                    f"Redis failed ({min(unknown.items())[1]}): {UNKNOWN_OUTCOME}",
                    idempotency_keys=[str(e.idempotency_key) for _, e, _ in routed],
                ) from partly
            raise partly
        published = [
            Receipt(p, str(ids[i]), e.event_id, str(e.idempotency_key))
            for i, (p, e, _) in enumerate(routed)
            if ids[i] is not None
        ]
        unknown_now = isinstance(partly, PublishOutcomeUnknownError)
        why = f"{'outcome unknown' if unknown_now else 'not published'}: {partly}"
        decided = {i for i, _ in failed}  # failed in an earlier round, with their reason
        rest = [(i, why) for i in range(len(routed)) if ids[i] is None and i not in decided]
        raise PartiallyPublishedError(
            f"{len(published)} of {len(routed)} events were published; the others failed "
            f"({why}): publish those again with the same idempotency keys",
            published=published,
            failed=sorted([*failed, *rest]),
            unconfirmed=self._unconfirmed(published, confirmed),
            transient=isinstance(partly, RedisUnavailableError | PublishOutcomeUnknownError)
            and all(reason.startswith(UNREACHED) for _, reason in failed),
        ) from partly

    def _unconfirmed(self, published: list[Receipt], confirmed: dict[int, int]) -> list[Receipt]:
        """Of published events, those a durable publisher's replicas did not confirm."""
        if not self._durable:
            return []
        return [r for r in published if confirmed.get(r.partition, 0) < self._durable]

    def _result(
        self,
        routed: Sequence[tuple[int, AnyEvent, str]],
        by_partition: dict[int, list[int]],
        ids: list[str | None],
        failed: list[tuple[int, str]],
        full: dict[int, int],
        recounted: set[int],
        moving: bool,
        confirmed: dict[int, int],
        lifecycle: bool,
    ) -> list[str]:
        """The entry ids when every event was published, else the error that says what
        was and what was not."""

        def stream(p: int) -> str:
            return self._keys.lifecycle if lifecycle else self._keys.ingest(p)

        for p, held in full.items():
            failed.extend(
                (i, f"backlog: {stream(p)} holds {held} entries") for i in by_partition[p]
            )
        if not failed:
            self._check_durable(routed, by_partition, ids, confirmed)
            return [str(i) for i in ids]
        if all(i is None for i in ids):
            if recounted:
                raise PartitionsChangingError(
                    "the partition count changed since this publisher read it: nothing "
                    "was published; publish again (it reads the new count)"
                )
            raise self._nothing_published(failed, full, len(by_partition), moving, stream)
        published = [
            Receipt(p, str(ids[i]), e.event_id, str(e.idempotency_key))
            for i, (p, e, _) in enumerate(routed)
            if ids[i] is not None
        ]
        unconfirmed = self._unconfirmed(published, confirmed)
        raise PartiallyPublishedError(
            f"{len(failed)} of {len(routed)} events failed ({min(failed)[1]}); the "
            f"others were published (each partition's events all or none): publish the "
            f"failed ones again with the same idempotency keys"
            + (
                f"; {len(unconfirmed)} of the published ones are not confirmed by the "
                f"replicas (publish them again too, with the same idempotency keys)"
                if unconfirmed
                else ""
            ),
            published=published,
            failed=sorted(failed),
            unconfirmed=unconfirmed,
            transient=all(reason.startswith(UNREACHED) for _, reason in failed),
        )

    def _nothing_published(
        self,
        failed: list[tuple[int, str]],
        full: dict[int, int],
        partitions: int,
        moving: bool,
        stream: Callable[[int], str],
    ) -> PublishError:
        """The error of a publish of which nothing was published."""
        if moving:
            return RedisUnavailableError(
                f"the Redis Cluster is moving the partition to another node ({failed[0][1]}): "
                f"nothing was published; publish again"
            )
        if full and len(full) == partitions:
            p, held = min(full.items())
            return BacklogFullError(
                f"{stream(p)} already holds {held} entries, over "
                f"the backlog bound of {self._limits.max_backlog} "
                f"(MEMSTREAM_MAX_BACKLOG): its consumers are behind or stopped "
                f"(memstream status); nothing was published, publish again later",
                partition=p,
                held=held,
            )
        if is_out_of_memory(failed[0][1]):
            return RedisOutOfMemoryError(failed[0][1])
        return PublishError(f"Redis refused the events ({failed[0][1]}); nothing was published")

    def _check_durable(
        self,
        routed: Sequence[tuple[int, AnyEvent, str]],
        by_partition: dict[int, list[int]],
        ids: list[str | None],
        confirmed: dict[int, int],
    ) -> None:
        """Raise NotDurableError if fewer replicas than asked confirmed a partition's
        events (nothing to check when the publisher is not durable)."""
        short = {p: n for p, n in confirmed.items() if n < self._durable}
        if not self._durable or not short:
            return
        published = [
            Receipt(p, str(ids[i]), e.event_id, str(e.idempotency_key))
            for i, (p, e, _) in enumerate(routed)
        ]
        unconfirmed = [r for r in published if r.partition in short]
        fewest = min(short.values())
        raise NotDurableError(
            f"the events are published on the Redis master, but only {fewest} of the "
            f"{self._durable} replica(s) asked for confirmed {len(unconfirmed)} of them "
            f"within {self._durable_ms / 1000:g}s (partition(s) "
            f"{', '.join(map(str, sorted(short)))}): a failover now could lose them. "
            f"Publishing them again with the same idempotency keys is safe (each is "
            f"applied at most once); check the replicas (INFO replication)",
            published=published,
            unconfirmed=unconfirmed,
            replicas=fewest,
            required=self._durable,
        )

    async def _pipeline(
        self,
        routed: Sequence[tuple[int, AnyEvent, str]],
        by_partition: dict[int, list[int]],
        partitions: list[int],
        lifecycle: bool,
    ) -> tuple[list[Any], list[int]]:
        """Each partition's reply, and how many replicas confirmed it (durable
        publishers; -1 otherwise)."""
        keys = [str(routed[i][1].idempotency_key) for p in partitions for i in by_partition[p]]
        unknown = UNKNOWN_OUTCOME
        bound = str(self._limits.max_backlog)

        def count_of(p: int) -> str:  # the count the partition's events were routed with
            event = routed[by_partition[p][0]][1]
            return "0" if lifecycle else str(getattr(event, "partitions", None) or 0)

        calls = [
            (
                [
                    self._keys.lifecycle if lifecycle else self._keys.ingest(p),
                    self._keys.partition_count(p),
                ],
                [bound, count_of(p), *(routed[i][2] for i in by_partition[p])],
            )
            for p in partitions
        ]
        unmeasured = [-1] * len(calls)
        try:
            if isinstance(self._client, RedisCluster) and self._durable:
                # Each partition's script and its WAIT on one connection of the master
                # that owns the partition's slot, concurrently.
                pairs = await asyncio.gather(
                    *(
                        run_then_wait(
                            self._client,
                            self._scripts,
                            "publish_events",
                            k,
                            a,
                            self._durable,
                            self._durable_ms,
                        )
                        for k, a in calls
                    ),
                    return_exceptions=True,
                )
                opened = [r for r in pairs if isinstance(r, NOT_SENT)]
                if opened and len(opened) == len(pairs):
                    raise opened[0]
                replies = [r[0] if isinstance(r, tuple) else r for r in pairs]
                counts = [r[1] if isinstance(r, tuple) else 0 for r in pairs]
                return replies, counts
            if isinstance(self._client, RedisCluster):
                # No scripts in cluster pipelines: one call per partition, concurrently
                # (each goes to the node that owns the partition's slot).
                replies = await asyncio.gather(
                    *(self._scripts("publish_events", k, a) for k, a in calls),
                    return_exceptions=True,
                )
                opened = [r for r in replies if isinstance(r, NOT_SENT)]
                if opened and len(opened) == len(replies):
                    raise opened[0]
                return list(replies), unmeasured
            # A pipeline that is not a transaction still uses one connection, so its
            # WAIT counts the replicas that received the scripts' writes before it.
            pipe = self._client.pipeline(transaction=False)
            for k, a in calls:
                self._scripts.queue(pipe, "publish_events", k, a)
            if self._durable:
                pipe.wait(self._durable, self._durable_ms)
            replies = list(await pipe.execute(raise_on_error=False))
            if not self._durable:
                return replies, unmeasured
            waited = replies.pop()
            count = waited if isinstance(waited, int) else 0
            return replies, [count] * len(calls)
        except CircuitOpenError as e:  # failing fast: nothing was sent
            raise RedisUnavailableError(
                f"Redis is unreachable, nothing was published (fail-fast): {e}"
            ) from e
        except ConnectionsBusyError as e:  # nothing was sent
            raise RedisUnavailableError(f"nothing was published: {e}") from e
        except RedisTimeoutError as e:
            raise PublishOutcomeUnknownError(
                f"no reply from Redis ({e}): {unknown}", idempotency_keys=keys
            ) from e
        except RedisConnectionError as e:
            # The client never re-sends, so failing to connect to a single server means
            # nothing was sent; a cluster may have reached some of its nodes.
            if "connecting" in str(e).lower() and not isinstance(self._client, RedisCluster):
                raise RedisUnavailableError(
                    f"Redis is unreachable, nothing was published: {e}"
                ) from e
            raise PublishOutcomeUnknownError(
                f"the connection to Redis broke ({e}): {unknown}", idempotency_keys=keys
            ) from e
        except TRANSIENT_ERRORS as e:
            raise PublishOutcomeUnknownError(
                f"Redis failed ({e}): {unknown}", idempotency_keys=keys
            ) from e

    async def workflow_started(
        self,
        tenant: str,
        workflow_id: str,
        *,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Publish that a workflow started, to the lifecycle stream (it never undoes an
        end: a workflow that ended stays ended)."""
        event = WorkflowStarted(
            tenant=tenant,
            idempotency_key=idempotency_key,
            payload=WorkflowPayload(workflow_id=workflow_id),
        )
        return await self._lifecycle(event, wait, timeout)

    async def workflow_terminated(
        self,
        tenant: str,
        workflow_id: str,
        status: WorkflowStatus | str = WorkflowStatus.COMPLETED,
        *,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Publish that a workflow terminated: the cleanup processor ends it in every
        partition (its later writes are refused; each memory it wrote runs its resource's
        ``cleanup.on_workflow_end`` policy once no live workflow writes it). With
        ``wait``, return once every partition applied the end (or the cleanup processor
        refused the event: the outcome says why)."""
        event = WorkflowTerminated(
            tenant=tenant,
            idempotency_key=idempotency_key,
            payload=TerminatedPayload(workflow_id=workflow_id, status=WorkflowStatus(status)),
        )
        started = time.monotonic()
        published = await self._lifecycle(event, wait, timeout)
        if published.outcome is not None and published.outcome.ok:
            left = max(0.0, timeout - (time.monotonic() - started))
            await self.wait_ended(tenant, workflow_id, left)
        return published

    async def wait_ended(self, tenant: str, workflow_id: str, timeout: float = 10.0) -> None:
        """Wait until every partition has applied the end of the workflow; raises
        WaitTimeoutError naming the partitions that have not."""
        n = await self.partitions()
        deadline = time.monotonic() + timeout
        delay = 0.001
        # Kept under its id or, when a redaction pattern matches it, its pseudonym.
        names = workflow_names(workflow_id)
        while True:
            pipe = self._client.pipeline(transaction=False)
            for p in range(n):
                for name in names:
                    pipe.zscore(self._keys.ended(p, tenant), name)
            scores = await pipe.execute()
            k = len(names)
            missing = [p for p in range(n) if all(x is None for x in scores[p * k : (p + 1) * k])]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"workflow {workflow_id} has not ended in partition(s) "
                    f"{', '.join(map(str, missing))} within {timeout:g}s; its end stays "
                    f"queued and may still be applied (see memstream status)",
                    partition=missing[0],
                    entry_id="",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _lifecycle(
        self, event: WorkflowStarted | WorkflowTerminated, wait: bool, timeout: float
    ) -> Published:
        stamped = event.model_copy(
            update={
                "idempotency_key": event.idempotency_key or event.event_id,
                "published_at_ms": int(time.time() * 1000),
            }
        )
        if not self._lifecycle_ready:
            await self._guard(
                self._scripts("create_groups", [self._keys.lifecycle], [Group.CLEANUP.value])
            )
            self._lifecycle_ready = True
        (entry_id,) = await self._send([(0, stamped, event_json(stamped))], lifecycle=True)
        receipt = Receipt(0, entry_id, stamped.event_id, str(stamped.idempotency_key))
        if not wait:
            return Published(receipt)
        (outcome,) = await self.reader.wait_applied_many(
            [(0, entry_id, stamped.event_id)], timeout, group=Group.CLEANUP
        )
        return Published(receipt, outcome)

    async def end_workflow(self, terminated: WorkflowTerminated) -> list[Receipt]:
        """Send a terminated workflow's end into every partition's ingest stream (the
        cleanup processor's step; idempotent, so sending it again is harmless)."""
        n = await self.partitions()
        now = int(time.time() * 1000)
        routed: list[tuple[int, AnyEvent, str]] = []
        for p in range(n):
            ended = WorkflowEnded(
                tenant=terminated.tenant,
                idempotency_key=f"wf-end:{terminated.payload.workflow_id}"[:200],
                partitions=n,
                published_at_ms=now,
                payload=EndedPayload(
                    workflow_id=terminated.payload.workflow_id,
                    status=terminated.payload.status,
                    partition=p,
                ),
            )
            routed.append((p, ended, event_json(ended)))
        for p in sorted(set(range(n)) - self._ready):
            await self._guard(ensure_groups(self._scripts, self._keys, p, INGEST_ONLY))
            self._ready.add(p)
        ids = await self._send(routed)
        return [
            Receipt(p, entry_id, e.event_id, str(e.idempotency_key))
            for (p, e, _), entry_id in zip(routed, ids, strict=True)
        ]

    async def append_to(
        self,
        memory: ResolvedMemory,
        message: Message,
        *,
        workflow_id: str | None = None,
        agent_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Append to a memory an agent resolved from its configuration; ReadOnlyError if
        the agent may only read it."""
        if not memory.writable:
            raise ReadOnlyError(
                f"{memory.ref} is read-only for this agent ({memory.mode.value}); "
                f"nothing was published"
            )
        return await self.append(
            memory.ref,
            message,
            workflow_id=workflow_id,
            agent_id=agent_id,
            idempotency_key=idempotency_key,
            wait=wait,
            timeout=timeout,
        )

    async def wait_applied(self, receipt: Receipt, timeout: float = 10.0) -> Outcome:
        """The receipt's outcome as soon as it is known (see MemoryReader.wait_applied)."""
        return await self.reader.wait_applied(
            receipt.partition, receipt.entry_id, timeout, event_id=receipt.event_id
        )

    # Conveniences that build the event.

    async def append(
        self,
        ref: MemoryRef,
        message: Message,
        *,
        workflow_id: str | None = None,
        agent_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        event = MessageAppended(
            tenant=ref.tenant,
            idempotency_key=idempotency_key,
            payload=AppendPayload(
                memory=_name(ref), workflow_id=workflow_id, agent_id=agent_id, message=message
            ),
        )
        return await self.publish(event, wait=wait, timeout=timeout)

    async def replace(
        self,
        ref: MemoryRef,
        messages: Sequence[Message],
        *,
        agent_id: str | None = None,
        workflow_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Replace the whole memory with ``messages`` (a new generation)."""
        payload = ReplacePayload(
            memory=_name(ref), agent_id=agent_id, workflow_id=workflow_id, messages=list(messages)
        )
        event = MemoryReplaced(tenant=ref.tenant, idempotency_key=idempotency_key, payload=payload)
        return await self.publish(event, wait=wait, timeout=timeout)

    async def clear(
        self,
        ref: MemoryRef,
        *,
        agent_id: str | None = None,
        workflow_id: str | None = None,
        backup: bool = False,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Remove every message (a new generation); with ``backup``, the messages are
        kept as a backup first (its id is in the outcome: ``Outcome.backup``)."""
        payload = ClearPayload(
            memory=_name(ref), agent_id=agent_id, workflow_id=workflow_id, backup=backup
        )
        event = MemoryCleared(tenant=ref.tenant, idempotency_key=idempotency_key, payload=payload)
        return await self.publish(event, wait=wait, timeout=timeout)

    async def delete(
        self,
        ref: MemoryRef,
        *,
        agent_id: str | None = None,
        workflow_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        payload = MemoryPayload(memory=_name(ref), agent_id=agent_id, workflow_id=workflow_id)
        event = MemoryDeleted(tenant=ref.tenant, idempotency_key=idempotency_key, payload=payload)
        return await self.publish(event, wait=wait, timeout=timeout)

    async def erase(
        self,
        ref: MemoryRef,
        seq: int,
        *,
        agent_id: str | None = None,
        workflow_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Erase the message ``seq`` (and any summary that covers it), in order with the
        memory's other events."""
        payload = ErasePayload(
            memory=_name(ref), seq=seq, agent_id=agent_id, workflow_id=workflow_id
        )
        event = MessageErased(tenant=ref.tenant, idempotency_key=idempotency_key, payload=payload)
        return await self.publish(event, wait=wait, timeout=timeout)

    async def restore(
        self,
        ref: MemoryRef,
        backup_id: str,
        *,
        agent_id: str | None = None,
        workflow_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        """Replace the memory with its backup ``backup_id`` (the ``Outcome.backup`` of a
        clear with ``backup``), in order with the memory's other events: an erase
        published before it stays erased. Refused (``backup_not_latest``,
        ``backup_gone``) unless it is the memory's latest backup and still kept."""
        payload = RestorePayload(
            memory=_name(ref), backup_id=backup_id, agent_id=agent_id, workflow_id=workflow_id
        )
        event = MemoryRestored(tenant=ref.tenant, idempotency_key=idempotency_key, payload=payload)
        return await self.publish(event, wait=wait, timeout=timeout)

    async def request_flush(
        self,
        ref: MemoryRef,
        *,
        strategy: FlushStrategy | None = None,
        dry_run: bool = False,
        agent_id: str | None = None,
        workflow_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> Published:
        payload = FlushPayload(
            memory=_name(ref),
            strategy=strategy,
            dry_run=dry_run,
            agent_id=agent_id,
            workflow_id=workflow_id,
        )
        event = FlushRequested(tenant=ref.tenant, idempotency_key=idempotency_key, payload=payload)
        return await self.publish(event, wait=wait, timeout=timeout)


def _messages_of(event: MemoryEvent) -> list[Message]:
    if isinstance(event, MessageAppended):
        return [event.payload.message]
    if isinstance(event, MemoryReplaced):
        return list(event.payload.messages)
    return []


def _name(ref: MemoryRef) -> MemoryName:
    return MemoryName(resource=ref.resource, key=ref.key)


def unreached(error: BaseException) -> str:
    """Why a partition's events failed when its Cluster node could not be reached (the
    reason starts with one of UNREACHED)."""
    if isinstance(error, CircuitOpenError):
        return f"{UNREACHED[0]} (fail-fast): {error}"
    if isinstance(error, ConnectionsBusyError):
        return f"{UNREACHED[2]}: {error}"
    return f"{UNREACHED[1]}: {error}"
