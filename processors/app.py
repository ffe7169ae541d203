"""Wiring: settings -> Redis client (given URL or the embedded server), scripts, keys,
resources and workers. Everything is built here once and passed down."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import TracebackType

from events import Publisher
from memory import ResourceRegistry
from processors.accountant import Accountant
from processors.appender import Appender
from processors.cleanup import Cleanup
from processors.metrics import Metrics
from processors.port import Processor
from processors.runtime import Worker
from processors.settings import Settings
from processors.summaries import ChatCompletionsWriter, SummaryWriter
from processors.summarizer import Summarizer
from processors.tokenizers import Tokenizers
from store import (
    Accounts,
    ConnectionSetupError,
    EmbeddedRedis,
    Flushes,
    Group,
    Keys,
    MemoryReader,
    MemoryStore,
    PartitionStreams,
    RedisClient,
    Scripts,
    breaker_of,
    connect,
    describe,
    ensure_partitions,
    find_embedded,
)
from store.connection import MAX_CONNECTIONS
from store.lock import DistributedLock
from store.repartition import refuse_while_repartitioning

log = logging.getLogger(__name__)

NO_REDIS = (
    "no Redis to talk to: set REDIS_URL, or start `memstream run all` first "
    "(without REDIS_URL it starts an embedded Redis that other commands find)"
)


class App:
    """The Redis connection and what is built on it, for one process."""

    def __init__(self, settings: Settings, *, start_embedded: bool = False) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._start_embedded = start_embedded
        self.embedded: EmbeddedRedis | None = None
        self.url = ""
        self._client: RedisClient | None = None
        self._scripts: Scripts | None = None
        self.metrics = Metrics()  # one registry for every worker of the process

    @property
    def client(self) -> RedisClient:
        if self._client is None:
            raise RuntimeError("App is not started: use 'async with App(...)'")
        return self._client

    @property
    def scripts(self) -> Scripts:
        if self._scripts is None:
            raise RuntimeError("App is not started: use 'async with App(...)'")
        return self._scripts

    def _resolve_url(self) -> str:
        if self.settings.redis_url:
            return self.settings.redis_url
        running = find_embedded()
        if running is not None:
            return running.url
        if not self._start_embedded:
            raise ConnectionSetupError(NO_REDIS)
        self.embedded = EmbeddedRedis()
        info = self.embedded.start()
        log.info(
            "started embedded Redis %s at %s (data in %s)", info.version, info.url, info.data_dir
        )
        return info.url

    async def __aenter__(self) -> App:
        self.url = self._resolve_url()
        s = self.settings
        self._client = connect(
            self.url,
            cluster=s.cluster or None,
            socket_timeout=s.socket_timeout,
            connect_timeout=min(3.0, s.socket_timeout),
            # Each partition loop of each processor (`run all` has three partitioned
            # ones) may hold a connection in its blocking XREAD, beside the other calls.
            max_connections=max(MAX_CONNECTIONS, 4 * s.partitions),
            breaker_threshold=s.breaker_threshold,
            breaker_reset=s.effective_breaker_reset,
        )
        breaker = breaker_of(self._client)
        if breaker is not None:
            self.metrics.watch_circuit(breaker)
        self._scripts = Scripts(self._client, strict=self.settings.strict_script_keys)
        try:
            await self._scripts.load()
        except Exception:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.embedded is not None and self.embedded.owned:
            self.embedded.stop()
            log.info("stopped embedded Redis")

    def describe(self) -> str:
        return describe(self.url)

    def registry(self) -> ResourceRegistry:
        return ResourceRegistry.load(self.settings.resource_paths())

    def registry_if_present(self) -> ResourceRegistry | None:
        """The resources, for commands that can work without them (the SDK-side privacy
        checks of ``publish``): None when none of the resource paths exists."""
        paths = [p for p in self.settings.resource_paths() if p.exists()]
        return ResourceRegistry.load(paths) if paths else None

    def publisher(
        self,
        registry: ResourceRegistry | None = None,
        *,
        resources: bool = True,
        bounded: bool = True,
        durable: bool = True,
    ) -> Publisher:
        """A publisher with the settings' partition count and request limits; it applies
        the privacy policies of ``registry``, else (with ``resources``) of the resource
        files found, if any (see ``registry_if_present``). ``bounded``: refuse to publish
        to a stream over the backlog bound (the cleanup processor's workflow ends are
        not bounded: one small event per partition, which must get through).
        ``durable``: wait for ``MEMSTREAM_DURABLE_REPLICAS`` replicas after each publish
        (the cleanup processor does not wait, so a replica that is down never stalls
        the lifecycle stream)."""
        s = self.settings
        if registry is None and resources:
            registry = self.registry_if_present()
        return Publisher(
            self.client,
            keys=self.keys,
            scripts=self.scripts,
            default_partitions=s.partitions,
            limits=s.limits() if bounded else replace(s.limits(), max_backlog=0),
            registry=registry,
            backlog_wait=s.backlog_wait,
            durable=s.durable_replicas if durable else 0,
            durable_timeout=s.durable_timeout,
        )

    def reader(self) -> MemoryReader:
        return MemoryReader(self.client, self.scripts, self.keys)

    async def partitions(self) -> int:
        """The stored partition count; refused while the count is being changed."""
        await refuse_while_repartitioning(self.client, self.keys)
        return await ensure_partitions(self.client, self.keys, self.settings.partitions)

    async def accountant(
        self, registry: ResourceRegistry, tokenizers: Tokenizers, worker_id: str | None = None
    ) -> Worker:
        accounts = Accounts(self.client, self.scripts, self.keys)
        return await self._worker(
            Accountant(accounts, registry, tokenizers, self.metrics), worker_id
        )

    def summary_writer(self) -> SummaryWriter | None:
        """The LLM writer when ``MEMSTREAM_SUMMARIZER_URL`` is set, else None (extractive)."""
        s = self.settings
        if not s.summarizer_url:
            return None
        return ChatCompletionsWriter.from_env(
            s.summarizer_url, s.summarizer_model, s.summarizer_api_key_env
        )

    async def summarizer(
        self,
        registry: ResourceRegistry,
        tokenizers: Tokenizers,
        worker_id: str | None = None,
        *,
        writer: SummaryWriter | None = None,
    ) -> Worker:
        processor = Summarizer(
            Flushes(self.scripts, self.keys),
            registry,
            tokenizers,
            writer=writer or self.summary_writer(),
            lock=DistributedLock(self.scripts, self.keys, worker_id),
            summary_timeout=self.settings.summary_timeout,
            metrics=self.metrics,
        )
        return await self._worker(processor, worker_id)

    async def appender(self, registry: ResourceRegistry, worker_id: str | None = None) -> Worker:
        processor = Appender(
            MemoryStore(
                self.scripts,
                self.keys,
                self.settings.retention(),
                replicas=self.settings.durable_replicas,
                replica_timeout=self.settings.durable_timeout,
            ),
            self.keys,
            registry,
            await self.partitions(),
            limits=self.settings.limits(),
            metrics=self.metrics,
        )
        return await self._worker(processor, worker_id)

    async def cleanup(self, registry: ResourceRegistry, worker_id: str | None = None) -> Worker:
        """The lifecycle stream's worker: one partition, so one leaseholder at a time."""
        s = self.settings
        processor = Cleanup(
            self.publisher(resources=False, bounded=False, durable=False),
            PartitionStreams(self.client, self.scripts, self.keys, Group.CLEANUP),
            registry,
            outcome_ttl_ms=int(s.outcome_ttl * 1000),
            max_event_bytes=s.max_event_bytes,
            metrics=self.metrics,
        )
        await self.partitions()
        return Worker(
            self.client,
            self.scripts,
            self.keys,
            processor,
            1,
            s.worker_config(),
            worker_id,
            self.metrics,
        )

    async def _worker(self, processor: Processor, worker_id: str | None) -> Worker:
        return Worker(
            self.client,
            self.scripts,
            self.keys,
            processor,
            await self.partitions(),
            self.settings.worker_config(),
            worker_id,
            self.metrics,
        )
