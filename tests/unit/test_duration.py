"""Human durations: parsing ``30s``, ``15m``, ``1h30m`` ... into seconds and back."""

from __future__ import annotations

import pytest

from memory import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10),
        ("1.5s", 1.5),
        ("15m", 900),
        ("24h", 86400),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        ("1d12h", 129600),
        ("1m30s500ms", 90.5),
        ("0s", 0),
        (" 30S ", 30),
        ("1H", 3600),
    ],
)
def test_strings_with_units_are_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("value", "seconds"), [(0, 0.0), (30, 30.0), (2.5, 2.5)])
def test_numbers_are_seconds(value: float, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(("text", "seconds"), [("30", 30.0), ("2.5", 2.5), ("0", 0.0)])
def test_a_plain_number_written_as_text_is_seconds(text: str, seconds: float) -> None:
    """Environment variables and quoted YAML values arrive as text: ``MEMSTREAM_LEASE_TTL=30``
    means 30 seconds, as the number 30 does."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["5x", "s", "1m1", "1 h", "1h 30m", "-5s", "1.s", ".5s", "ten seconds", "1h-30m"]
)
def test_invalid_strings_are_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid duration .*write e\.g\. 30s, 15m, 24h"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_duration_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match=r"empty duration; write e\.g\. 30s"):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5])
def test_negative_numbers_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_durations(value: bool) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (30, "30s"),
        (60, "1m"),
        (90, "90s"),
        (900, "15m"),
        (3600, "1h"),
        (5400, "90m"),
        (86400, "1d"),
        (604800, "1w"),
        (1209600, "2w"),
        (0.5, "0.5s"),
        (1.5, "1.5s"),
        (0, "0s"),
    ],
)
def test_format_uses_the_largest_exact_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.5, 1, 45, 60, 61, 3600, 5400, 86400, 7 * 86400, 1.25])
def test_format_then_parse_gives_the_same_seconds(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
