"""Human durations (``30s``, ``15m``, ``24h``, ``7d``, ``1h30m``) as seconds."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number of seconds or a string like ``1h30m``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return float(value)
    text = value.strip().lower()
    if not text:
        raise ValueError("empty duration; write e.g. 30s, 15m, 24h or 7d")
    if _NUMBER.fullmatch(text):  # environment variables and quoted YAML: seconds
        return float(text)
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {value!r}; write e.g. 30s, 15m, 24h, 7d or 1h30m")
    return total


def format_duration(seconds: float) -> str:
    """The shortest of ``Nd``, ``Nh``, ``Nm``, ``Ns`` that is exact, else seconds."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNIT[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("write a duration such as 30s, 15m, 24h or 7d")
    return parse_duration(value)


#: A duration field of a YAML file: a number of seconds or a string like ``24h``.
Duration = Annotated[
    float,
    BeforeValidator(_seconds),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]+)?(ms|[smhdw])?)+\s*$"},
            ],
            "description": "seconds, or a duration such as 30s, 15m, 24h, 7d, 1h30m",
        }
    ),
]
