"""Process settings from the environment (``MEMSTREAM_*``, ``REDIS_URL``) and CLI flags."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from pydantic import ValidationError

from processors.clitools import settings_from
from processors.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings see only what a test sets (the test session may export REDIS_URL)."""
    for name in list(os.environ):
        if name.startswith("MEMSTREAM_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def test_defaults_without_environment() -> None:
    s = Settings()
    assert s.redis_url is None
    assert s.namespace == "ms"
    assert s.partitions == 16
    assert s.lease_ttl == 10.0
    assert s.heartbeat == 1.0
    assert s.strict_script_keys is False
    assert s.resource_paths() == [Path("memories")]


def test_memstream_variables_set_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "MEMSTREAM_NAMESPACE": "t1",
        "MEMSTREAM_PARTITIONS": "64",
        "MEMSTREAM_LEASE_TTL": "30s",
        "MEMSTREAM_HEARTBEAT": "500ms",
        "MEMSTREAM_BLOCK": "2s",
        "MEMSTREAM_IDEMPOTENCY_WINDOW": "24h",
        "MEMSTREAM_TOMBSTONE_TTL": "7d",
        "MEMSTREAM_STRICT_SCRIPT_KEYS": "1",
        "MEMSTREAM_RESOURCES": "/a:/b/c.yaml",
        "MEMSTREAM_LOG_LEVEL": "debug",
        "MEMSTREAM_LOG_FORMAT": "json",
    }.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.namespace, s.partitions) == ("t1", 64)
    assert (s.lease_ttl, s.heartbeat, s.block) == (30.0, 0.5, 2.0)
    assert (s.idempotency_window, s.tombstone_ttl) == (86400.0, 7 * 86400.0)
    assert s.strict_script_keys is True
    assert s.resource_paths() == [Path("/a"), Path("/b/c.yaml")]
    assert (s.log_level, s.log_format) == ("DEBUG", "json")


@pytest.mark.parametrize("name", ["REDIS_URL", "MEMSTREAM_REDIS_URL"])
def test_the_redis_url_comes_from_either_variable(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "redis://db.example:6380/2")
    assert Settings().redis_url == "redis://db.example:6380/2"


def test_other_memstream_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSTREAM_TEST_REQUIRE", "6.2,7")
    monkeypatch.setenv("MEMSTREAM_STATE_DIR", "/tmp/x")
    assert Settings().namespace == "ms"


@pytest.mark.parametrize(("value", "seconds"), [("10s", 10.0), ("1m", 60.0), ("5s", 5.0)])
def test_lease_ttl_accepts_durations(
    monkeypatch: pytest.MonkeyPatch, value: str, seconds: float
) -> None:
    monkeypatch.setenv("MEMSTREAM_LEASE_TTL", value)
    assert Settings().lease_ttl == seconds


def test_a_plain_number_of_seconds_in_the_environment_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMSTREAM_LEASE_TTL", "30")
    monkeypatch.setenv("MEMSTREAM_OUTCOME_TTL", "600")
    s = Settings()
    assert (s.lease_ttl, s.outcome_ttl) == (30.0, 600.0)


@pytest.mark.parametrize("value", ["4s", "4999ms", "1s", 4])
def test_a_lease_ttl_under_5s_is_refused_with_the_reason(value: str | int) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(lease_ttl=value)
    message = str(info.value)
    assert "lease_ttl" in message
    assert "at least 5s" in message
    assert "busy workers keep their leases" in message


def test_the_cli_reports_a_short_lease_ttl_as_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMSTREAM_LEASE_TTL", "2s")
    with pytest.raises(click.UsageError) as info:
        settings_from()
    assert info.value.message.startswith("setting lease_ttl: ")
    assert "at least 5s" in info.value.message


def test_an_invalid_duration_shows_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSTREAM_BLOCK", "soon")
    with pytest.raises(click.UsageError, match=r"setting block: .*write e\.g\. 30s"):
        settings_from()


def test_a_heartbeat_too_slow_for_the_lease_is_refused_when_settings_are_built() -> None:
    """A lease must be renewed several times before it can expire; the CLI turns a
    ValidationError into a usage error, anything later is a traceback."""
    with pytest.raises(ValidationError, match="heartbeat"):
        Settings(lease_ttl="10s", heartbeat="5s")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MEMSTREAM_NAMESPACE", "has space"),
        ("MEMSTREAM_NAMESPACE", "x" * 33),
        ("MEMSTREAM_PARTITIONS", "0"),
        ("MEMSTREAM_PARTITIONS", "16385"),
        ("MEMSTREAM_LOG_LEVEL", "chatty"),
        ("MEMSTREAM_LOG_FORMAT", "xml"),
        ("MEMSTREAM_BATCH_SIZE", "0"),
    ],
)
def test_invalid_values_are_usage_errors_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("MEMSTREAM_").lower()
    with pytest.raises(click.UsageError, match=f"^setting {field}: "):
        settings_from()


def test_flags_override_the_environment_and_unset_flags_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMSTREAM_PARTITIONS", "64")
    monkeypatch.setenv("MEMSTREAM_RESOURCES", "/env")
    s = settings_from(partitions=8, resources=None)
    assert s.partitions == 8
    assert s.resources == "/env"


def test_worker_and_retention_settings_are_in_milliseconds() -> None:
    s = Settings(lease_ttl="12s", heartbeat="2s", block="250ms", outcome_ttl="1m",
                 idempotency_window="1h", tombstone_ttl="2h", batch_size=7)  # fmt: skip
    config = s.worker_config()
    assert (config.lease_ttl_ms, config.heartbeat_ms) == (12_000, 2_000)
    assert (config.loop.block_ms, config.loop.batch_size, config.loop.outcome_ttl_ms) == (
        250,
        7,
        60_000,
    )
    r = s.retention()
    assert (r.idempotency_ms, r.tombstone_ms, r.outcome_ms) == (3_600_000, 7_200_000, 60_000)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"heartbeat": "0"}, "at least 0.1s"),
        ({"block": "30s"}, "between 0.01s and 10s"),
        ({"max_attempts": 5000}, "less than or equal to 1000"),
        ({"idempotency_window": "100000d"}, "between 1s and 3650d"),
    ],
)
def test_settings_out_of_their_bounds_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]
