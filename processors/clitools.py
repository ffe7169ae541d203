"""Helpers shared by the CLI's commands: settings from flags, and one-line errors."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from functools import wraps
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from events import EventError
from memory import DomainError
from processors.settings import Settings, unknown_environment
from store import TRANSIENT_ERRORS, StoreError

T = TypeVar("T")
EXIT_ERROR, EXIT_REFUSED = 1, 3


def settings_from(**overrides: Any) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    unknown = unknown_environment()
    if unknown:
        raise click.UsageError("; ".join(unknown))
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise click.UsageError(f"setting {field}: {first['msg']}") from e


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; our errors become one line on stderr and exit 1."""
    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        # The reader of our output went away (`memstream status | head`): not a Redis
        # error. Python's documented way out: no more output, and no traceback at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_ERROR)
    except (DomainError, EventError, StoreError) as e:
        message = f"error: {e}"
    except TRANSIENT_ERRORS as e:
        message = f"error: Redis: {e}"
    except ValueError as e:
        message = f"error: {e}"
    click.echo(message, err=True)
    sys.exit(EXIT_ERROR)


def command(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Turn an async click callback into a sync one run by ``run_async``."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run_async(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper
