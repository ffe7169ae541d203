"""Errors of the domain package: every one says what is wrong and how to fix it."""

from __future__ import annotations


class DomainError(Exception):
    """Root of the domain package's errors."""


class InvalidReferenceError(DomainError, ValueError):
    """A tenant, resource id or memory key that cannot name a memory (a ValueError, so
    pydantic validators report it as a validation error of the field)."""

    def __init__(self, message: str, *, value: str) -> None:
        super().__init__(message)
        self.value = value


class ResourceError(DomainError):
    """A resource file that does not load: every problem names the file, the field and
    the fix, one per line."""

    def __init__(
        self,
        message: str = "",
        *,
        path: str,
        field: str = "",
        problems: list[tuple[str, str]] | None = None,
    ) -> None:
        self.path = path
        self.problems = problems if problems is not None else [(field, message)]
        self.field = self.problems[0][0]
        super().__init__(
            "\n".join(f"{path}: {f}: {m}" if f else f"{path}: {m}" for f, m in self.problems)
        )


class UnknownResourceError(DomainError):
    """A memory names a resource id that no loaded file defines."""

    def __init__(self, resource_id: str, known: list[str]) -> None:
        hint = ", ".join(sorted(known)) or "none loaded"
        super().__init__(
            f"unknown memory resource {resource_id!r} (known: {hint}); add a file to "
            f"memories/ or point --resources / MEMSTREAM_RESOURCES at its folder"
        )
        self.resource_id = resource_id
