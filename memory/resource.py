"""Memory resources: the YAML files in ``memories/`` that define a kind of memory.

This module holds the models and their rules; ``memory.registry`` loads files into
them and turns validation errors into messages that name the file, the field and the
fix.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from memory.duration import Duration
from memory.message import Role
from memory.models import context_size
from memory.privacy import PrivacyPolicy, compile_pattern
from memory.ref import check_resource_id
from memory.template import KeyTemplate, TemplateKeyError

DEFAULT_TTL_SECONDS = 7 * 86400
MAX_TTL_SECONDS = 3650 * 86400
ALLOCATION_TOLERANCE = 0.001


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryType(enum.StrEnum):
    TOKEN_BASED = "token_based"
    MESSAGE_COUNT_BASED = "message_count_based"
    BUFFER = "buffer"


class FlushStrategy(enum.StrEnum):
    HYBRID_SUMMARY = "hybrid_summary"
    FIFO = "fifo"
    SIMPLE_FIFO = "simple_fifo"  # the origin system's name for fifo
    LRU = "lru"
    LFU = "lfu"
    TOKEN_AWARE_LRU = "token_aware_lru"
    PRIORITY = "priority"


class CleanupPolicy(enum.StrEnum):
    KEEP = "keep"
    DELETE = "delete"
    EXPIRE = "expire"


def _fraction(value: object) -> object:
    """Fractions in (0, 1]; a whole percentage such as 30 is refused with the fraction."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        raise ValueError(f"write a fraction of 1: did you mean {value / 100:g}?")
    return value


Fraction = Annotated[float, BeforeValidator(_fraction), Field(gt=0, le=1)]


class Flushing(_Model):
    """When and how a memory is brought back under its budget."""

    type: FlushStrategy = Field(
        default=FlushStrategy.FIFO, description="how a flush chooses what to remove or summarize"
    )
    summarize_threshold: Fraction = Field(
        default=0.8, description="flush when the memory reaches this share of its limit"
    )
    target: Fraction = Field(
        default=0.6, description="a flush brings the memory down to this share of its limit"
    )
    summary_tokens: int = Field(default=500, gt=0, description="longest summary, in tokens")
    summarize_oldest_percent: Fraction = Field(
        default=0.3, description="hybrid_summary: the oldest share of messages summarized"
    )

    @model_validator(mode="after")
    def _target(self) -> Flushing:
        if self.target >= self.summarize_threshold:
            raise ValueError(
                f"target ({self.target:g}) must be below summarize_threshold "
                f"({self.summarize_threshold:g}), or a flush would trip again at once"
            )
        return self


class TokenProvider(_Model):
    """Which tokenizer counts this memory's tokens."""

    provider: Literal["openai", "anthropic", "google", "cohere", "deepseek", "mistral"] = Field(
        default="openai", description="whose tokenizer counts (others than openai: estimates)"
    )
    model: str | None = Field(default=None, description="the provider's model (default: model)")
    api_key_env: str | None = Field(
        default=None, description="the environment variable holding the API key (never inline)"
    )
    endpoint: str | None = Field(default=None, description="the provider's API endpoint")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "api_key: never write a secret in a resource file; set api_key_env to the "
                "name of the environment variable that holds it"
            )
        return data


class TokenAllocation(_Model):
    """How the token budget is shared; the shares must add up to 1."""

    system: float = Field(default=0.1, ge=0, le=1, description="share of protected messages")
    short_term: float = Field(
        default=0.6, ge=0, le=1, description="share of the newest messages after a flush"
    )
    long_term: float = Field(
        default=0.3, ge=0, le=1, description="share of older messages and summaries"
    )
    user_defined: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="further named shares (all shares add up to 1)"
    )

    @model_validator(mode="after")
    def _sum(self) -> TokenAllocation:
        total = self.system + self.short_term + self.long_term + sum(self.user_defined.values())
        if not math.isclose(total, 1.0, abs_tol=ALLOCATION_TOLERANCE):
            raise ValueError(f"the shares add up to {total:g}; make them add up to 1.0")
        return self


class KeywordPriority(_Model):
    pattern: str = Field(description="an RE2 pattern matched against the message text")
    priority: int = Field(description="the priority of a message that matches")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        compile_pattern(value)
        return value


class Priority(_Model):
    """A message's priority: its explicit ``priority``, else the highest of its role's
    and its matching keywords'. Messages at or above ``protected`` are never evicted."""

    roles: dict[Role, int] = Field(
        default_factory=lambda: {
            Role.SYSTEM: 100,
            Role.DEVELOPER: 100,
            Role.USER: 50,
            Role.ASSISTANT: 50,
            Role.TOOL: 20,
        },
        description="the priority of each role's messages",
    )
    keywords: list[KeywordPriority] = Field(
        default_factory=list, description="patterns that raise a message's priority"
    )
    protected: int = Field(default=100, description="messages at or above it are never evicted")


class Persistence(_Model):
    type: Literal["redis"] = Field(default="redis", description="memstream keeps memories in Redis")
    ttl: Duration = Field(
        default=DEFAULT_TTL_SECONDS,
        description="how long a memory lives after its last write (e.g. 24h, 7d)",
    )

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if not 1 <= value <= MAX_TTL_SECONDS:
            raise ValueError("ttl must be between 1s and 3650d")
        return value


class Locking(_Model):
    """The summarizer's per-memory lock. Appends and clears are ordered by partition and
    need no lock: ``append_ttl`` and ``clear_ttl`` from origin files load with a warning."""

    flush_ttl: Duration = Field(default=300.0, description="the flush lock's TTL")
    append_ttl: Duration | None = Field(default=None, description="no effect (see above)")
    clear_ttl: Duration | None = Field(default=None, description="no effect (see above)")


class Cleanup(_Model):
    """What happens to a memory when the last workflow writing it ends."""

    on_workflow_end: CleanupPolicy = Field(
        default=CleanupPolicy.KEEP,
        description="when the last workflow writing a memory ends: delete, expire or keep it",
    )
    grace: Duration = Field(default=3600.0, description="expire: how long it stays after")


class MemoryResource(_Model):
    """One memory resource definition."""

    resource: Literal["memory"] = Field(default="memory", description="the kind of file")
    id: str = Field(description="the resource id (lower-case letters, digits, - _ .)")
    description: str = ""
    version: str = "1"
    type: MemoryType = Field(
        default=MemoryType.TOKEN_BASED,
        description="what the budget limits: tokens, messages or both",
    )
    model: str = Field(default="gpt-4o-mini", description="the model whose tokenizer counts tokens")
    model_context_size: int | None = Field(
        default=None, gt=0, description="the model's context window, for max_context_ratio"
    )
    max_tokens: int | None = Field(default=None, gt=0, description="token_based, buffer: the limit")
    max_messages: int | None = Field(
        default=None, gt=0, description="message_count_based, buffer: the limit"
    )
    max_context_ratio: Fraction | None = Field(
        default=None, description="instead of max_tokens: this share of the model's context"
    )
    token_provider: TokenProvider | None = None
    token_allocation: TokenAllocation | None = None
    flushing: Flushing = Field(default_factory=Flushing)
    priority: Priority = Field(default_factory=Priority)
    persistence: Persistence = Field(default_factory=Persistence)
    privacy_policy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    locking: Locking = Field(default_factory=Locking)
    default_key_template: str | None = Field(
        default=None, description="a Jinja2 template of the key, e.g. support-{{ workflow.id }}"
    )
    cleanup: Cleanup = Field(default_factory=Cleanup)
    _template: KeyTemplate | None = PrivateAttr(default=None)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_resource_id(value)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        return str(value) if isinstance(value, int | float) else value

    @field_validator("default_key_template")
    @classmethod
    def _template_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                KeyTemplate(value)
            except TemplateKeyError as e:
                raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _budget(self) -> MemoryResource:
        tokens = self.max_tokens is not None or self.max_context_ratio is not None
        if self.max_context_ratio is not None and self.context_size is None:
            raise ValueError(
                f"max_context_ratio needs the model's context size, and {self.model!r} is "
                f"not a model memstream knows: set model_context_size"
            )
        if self.type is MemoryType.TOKEN_BASED and not tokens:
            raise ValueError("a token_based memory needs max_tokens or max_context_ratio")
        if self.type is MemoryType.MESSAGE_COUNT_BASED and self.max_messages is None:
            raise ValueError("a message_count_based memory needs max_messages")
        if self.type is MemoryType.BUFFER and (not tokens or self.max_messages is None):
            raise ValueError(
                "a buffer memory needs both a token limit (max_tokens or max_context_ratio) "
                "and max_messages"
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        if self.default_key_template is not None:
            self._template = KeyTemplate(self.default_key_template)

    @property
    def ttl_ms(self) -> int:
        return int(self.persistence.ttl * 1000)

    @property
    def context_size(self) -> int | None:
        return self.model_context_size or context_size(self.model)

    @property
    def token_limit(self) -> int | None:
        """The token budget: ``max_tokens``, else ``max_context_ratio`` x the context."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.max_context_ratio is not None and self.context_size is not None:
            return math.floor(self.max_context_ratio * self.context_size)
        return None

    @property
    def key_template(self) -> KeyTemplate | None:
        return self._template

    @property
    def warnings(self) -> list[str]:
        """Fields that load but have no effect here, and likely mistakes."""
        found = []
        roles = {r.value for r in Role}
        for kind in self.privacy_policy.non_persistable_message_types:
            if kind not in roles and kind.lower() in roles:
                found.append(
                    f"privacy_policy.non_persistable_message_types: {kind!r} matches no role "
                    f"(roles are lower-case: {kind.lower()!r})"
                )
        for name in ("append_ttl", "clear_ttl"):
            if getattr(self.locking, name) is not None:
                found.append(
                    f"locking.{name} has no effect: appends and clears are ordered by "
                    f"partition and take no lock; remove it"
                )
        return found
