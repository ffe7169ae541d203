"""Process settings from the environment (and CLI flags), built once in the CLI."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.limits import RequestLimits
from memory import parse_duration
from processors.partition import LoopConfig
from processors.runtime import WorkerConfig
from store import Retention


def _seconds(value: object) -> float:
    if not isinstance(value, str | int | float):
        raise ValueError("write a duration such as 10s, 5m or 24h")
    return parse_duration(value)


#: The longest deadline of a Redis command, and how much earlier a blocking read ends.
MAX_SOCKET_TIMEOUT = 15.0
BLOCK_MARGIN = 0.5


class Settings(BaseSettings):
    """Every setting of a memstream process. Environment variables are ``MEMSTREAM_<NAME>``
    (``REDIS_URL`` also works for the URL); durations accept ``30s``, ``5m``, ``24h``."""

    model_config = SettingsConfigDict(env_prefix="MEMSTREAM_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "MEMSTREAM_REDIS_URL"),
        description="Redis URL; unset: the embedded server",
    )
    cluster: bool = Field(default=False, description="treat REDIS_URL as a Redis Cluster")
    namespace: str = Field(
        default="ms", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="prefix of every key"
    )
    partitions: int = Field(
        default=16, ge=1, le=16384, description="partition count stored on first start"
    )
    resources: str = Field(
        default="memories", description="colon-separated folders or files of memory resources"
    )
    lease_ttl: float = Field(default=10.0, description="partition lease TTL (at least 5s)")
    heartbeat: float = Field(default=1.0, description="membership heartbeat and lease refresh")
    breaker_threshold: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="failures to reach Redis in a row that open a client's circuit breaker "
        "(calls then fail at once)",
    )
    breaker_reset: float = Field(
        default=5.0,
        description="how long a circuit breaker stays open before one trial call goes through "
        "(at most a quarter of the lease TTL)",
    )
    batch_size: int = Field(default=100, ge=1, le=1000, description="entries per batch")
    count_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="threads that encode the texts of one accountant batch at once (tiktoken "
        "runs on several cores); each thread but the first holds its own copy of the "
        "encoding, about 70 MB for o200k_base",
    )
    block: float = Field(default=1.0, description="longest wait for new entries")
    max_attempts: int = Field(
        default=10, ge=1, le=1000, description="failed attempts before an entry is dead-lettered"
    )
    idempotency_window: float = Field(
        default=86400.0, description="how long an idempotency key is remembered"
    )
    tombstone_ttl: float = Field(
        default=7 * 86400.0, description="how long a memory's tombstone outlives its data"
    )
    outcome_ttl: float = Field(default=600.0, description="how long outcomes are kept for waiters")
    max_event_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="largest event, in bytes"
    )
    max_message_bytes: int = Field(
        default=256 * 1024, ge=256, description="largest message (its JSON), in bytes"
    )
    max_messages: int = Field(
        default=1000, ge=1, le=100_000, description="messages per replace; events per publish call"
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="largest publish call, in bytes"
    )
    max_backlog: int = Field(
        default=100_000,
        ge=0,
        description="entries an ingest or the lifecycle stream may hold before publishing to "
        "it is refused (backpressure; 0: no bound)",
    )
    backlog_wait: float = Field(
        default=0.0,
        ge=0,
        description="how long a publish waits for a full stream to drain before it is refused",
    )
    durable_replicas: int = Field(
        default=0,
        ge=0,
        le=100,
        description="replicas every publish must reach (Redis WAIT) before it returns, and "
        "the appender waits for after each batch; 0: off (a publish returns once the "
        "master has it)",
    )
    durable_timeout: float = Field(
        default=1.0,
        description="how long a durable publish waits for its replicas before it raises "
        "NotDurableError (shorter than the socket timeout, a third of lease_ttl)",
    )
    trim_interval: float = Field(
        default=5.0, description="how often acknowledged entries are trimmed (and lag sampled)"
    )
    exact_trim: bool = Field(
        default=True,
        description="trim exactly what is acknowledged; false lets Redis trim whole nodes only "
        "(cheaper, but raw events can linger)",
    )
    strict_script_keys: bool = Field(
        default=False, description="fail any Lua script that touches an undeclared key"
    )
    summarizer_url: str | None = Field(
        default=None,
        description="an OpenAI-compatible API (its base URL, ending in /v1) for LLM summaries; "
        "unset: the extractive summarizer",
    )
    summarizer_model: str = Field(default="gpt-4o-mini", description="the LLM for summaries")
    summarizer_api_key_env: str | None = Field(
        default=None, description="the environment variable holding the LLM API key"
    )
    summary_timeout: float = Field(
        default=60.0, description="longest wait for an LLM summary before the extractive one"
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="serve Prometheus metrics on this port"
    )
    metrics_addr: str = Field(default="0.0.0.0", description="the metrics server's address")
    gateway_host: str = Field(default="127.0.0.1", description="the HTTP gateway's address")
    gateway_port: int = Field(default=8080, ge=1, le=65535, description="the HTTP gateway's port")
    gateway_max_body_bytes: int = Field(
        default=8 * 1024 * 1024 + 64 * 1024,
        ge=1024,
        description="largest request body the HTTP gateway reads (413 above it)",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = Field(default="text", description="text or json lines")

    @field_validator(
        "lease_ttl",
        "heartbeat",
        "block",
        "idempotency_window",
        "tombstone_ttl",
        "outcome_ttl",
        "trim_interval",
        "summary_timeout",
        "backlog_wait",
        "breaker_reset",
        "durable_timeout",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> float:
        return _seconds(value)

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat_floor(cls, value: float) -> float:
        if value < 0.1:
            raise ValueError("the heartbeat must be at least 0.1s")
        return value

    @field_validator("block")
    @classmethod
    def _block(cls, value: float) -> float:
        if not 0.01 <= value <= 10:
            raise ValueError("block must be between 0.01s and 10s")
        return value

    @field_validator("breaker_reset")
    @classmethod
    def _breaker_reset(cls, value: float) -> float:
        if not 0.1 <= value <= 3600:
            raise ValueError("breaker_reset must be between 0.1s and 1h")
        return value

    @field_validator("idempotency_window", "tombstone_ttl", "outcome_ttl")
    @classmethod
    def _bounded(cls, value: float) -> float:
        if not 1 <= value <= 10 * 365 * 86400:
            raise ValueError("must be between 1s and 3650d")
        return value

    @field_validator("lease_ttl")
    @classmethod
    def _lease(cls, value: float) -> float:
        if value < 5:
            raise ValueError("the lease TTL must be at least 5s, so busy workers keep their leases")
        return value

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("lease_ttl")
        if lease is not None and value * 3 > lease:
            raise ValueError(
                f"the heartbeat ({value:g}s) must be at most a third of lease_ttl ({lease:g}s), "
                f"so a lease is renewed several times before it can expire"
            )
        return value

    @model_validator(mode="after")
    def _block_within_timeout(self) -> Settings:
        if self.block + BLOCK_MARGIN > self.socket_timeout:
            raise ValueError(
                f"block ({self.block:g}s) must end at least {BLOCK_MARGIN:g}s within the "
                f"socket timeout ({self.socket_timeout:g}s, a third of lease_ttl): a blocking "
                f"read must answer before the timeout that bounds every command"
            )
        return self

    @property
    def socket_timeout(self) -> float:
        """The deadline of every Redis command: a third of the lease TTL (at most 15s),
        so a hung connection is noticed while the leases are still held."""
        return min(MAX_SOCKET_TIMEOUT, self.lease_ttl / 3)

    @model_validator(mode="after")
    def _durable_within_timeout(self) -> Settings:
        if not 0.01 <= self.durable_timeout <= self.socket_timeout - BLOCK_MARGIN:
            raise ValueError(
                f"durable_timeout ({self.durable_timeout:g}s) must be at least 0.01s and end "
                f"at least {BLOCK_MARGIN:g}s within the socket timeout "
                f"({self.socket_timeout:g}s, a third of lease_ttl): WAIT must answer before "
                f"the timeout that bounds every command"
            )
        return self

    @model_validator(mode="after")
    def _windows(self) -> Settings:
        if self.tombstone_ttl < self.idempotency_window:
            raise ValueError(
                f"tombstone_ttl ({self.tombstone_ttl:g}s) must not be shorter than "
                f"idempotency_window ({self.idempotency_window:g}s): a repeat after a delete "
                f"would be applied again"
            )
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return value.upper()

    def resource_paths(self) -> list[Path]:
        return [Path(p) for p in self.resources.split(":") if p]

    @property
    def effective_breaker_reset(self) -> float:
        """The breaker's open time, at most a quarter of the lease TTL: while it is open,
        lease refreshes fail at once too, and a short Redis stall must not cost every
        lease (socket timeout + open time + a heartbeat stay within the TTL)."""
        return min(self.breaker_reset, self.lease_ttl / 4)

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_event_bytes=self.max_event_bytes,
            max_message_bytes=self.max_message_bytes,
            max_messages=self.max_messages,
            max_request_bytes=self.max_request_bytes,
            max_backlog=self.max_backlog,
        )

    def retention(self) -> Retention:
        return Retention(
            idempotency_ms=int(self.idempotency_window * 1000),
            tombstone_ms=int(self.tombstone_ttl * 1000),
            outcome_ms=int(self.outcome_ttl * 1000),
        )

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            lease_ttl_ms=int(self.lease_ttl * 1000),
            heartbeat_ms=int(self.heartbeat * 1000),
            loop=LoopConfig(
                batch_size=self.batch_size,
                block_ms=int(self.block * 1000),
                max_attempts=self.max_attempts,
                outcome_ttl_ms=int(self.outcome_ttl * 1000),
                trim_interval=self.trim_interval,
                exact_trim=self.exact_trim,
            ),
        )


#: Environment variables with the prefix that are not settings of a process.
OTHER_VARIABLES = {"MEMSTREAM_STATE_DIR", "MEMSTREAM_REDIS_SERVER", "MEMSTREAM_TEST_REQUIRE"}


def unknown_environment(environ: dict[str, str] | None = None) -> list[str]:
    """``MEMSTREAM_*`` variables that name no setting, each with a suggestion: a typo
    must not be silently ignored."""
    names = {f"MEMSTREAM_{name.upper()}" for name in Settings.model_fields}
    problems = []
    for variable in sorted(environ if environ is not None else os.environ):
        if not variable.startswith("MEMSTREAM_") or variable in names | OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(variable, sorted(names | OTHER_VARIABLES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"unknown environment variable {variable}{hint}")
    return problems
