"""The chat message a memory holds: OpenAI-style, plus metadata and a priority."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Role(enum.StrEnum):
    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    arguments: str = Field(description="JSON-encoded arguments, as the model produced them")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(BaseModel):
    """One part of a multi-part content (text, or a reference such as an image URL)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1)
    text: str | None = None


class Message(BaseModel):
    """A chat message as stored in a memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(
        default=None, description="explicit priority; higher is kept longer"
    )

    @model_validator(mode="after")
    def _check_shape(self) -> Message:
        if self.role is Role.TOOL and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content or tool_calls")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """The message as stored: unset optional fields left out."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
            "role": self.role.value
        }


class StoredMessage(BaseModel):
    """A message read back from a memory, with the identity the store gave it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seq: int = Field(description="never-reused sequence number, increasing within a memory")
    gen: int = Field(description="generation of the memory the message belongs to")
    at: int = Field(description="apply time, milliseconds since the epoch (Redis clock)")
    entry: str = Field(description="stream entry id of the event that wrote it")
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = None
    workflow: str | None = None
    agent: str | None = None
    covers: list[int] | None = Field(
        default=None,
        description="a summary: the sequences of the messages it stands for, oldest first",
    )

    @property
    def is_summary(self) -> bool:
        return self.covers is not None

    def to_message(self) -> Message:
        return Message.model_validate(
            self.model_dump(
                include={
                    "role",
                    "content",
                    "name",
                    "tool_calls",
                    "tool_call_id",
                    "metadata",
                    "priority",
                }
            )
        )
