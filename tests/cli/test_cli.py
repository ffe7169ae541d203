"""The ``memstream`` command line, end to end: real subprocesses against the default test
Redis (each run in a fresh namespace), and once against the embedded default."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import psutil
import pytest
import redis

from store import RedisServerProcess, find_server_binary

ROOT = Path(__file__).resolve().parents[2]
MEMSTREAM = str(Path(sys.executable).with_name("memstream"))
PARTITIONS = 16
#: `run all` runs the appender, the accountant and the summarizer (one lease per
#: partition each) and the cleanup processor (one lease: the lifecycle stream).
LEASES = PARTITIONS * 3 + 1
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float = 30.0) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def clean_env(**values: str) -> dict[str, str]:
    """The test process's environment without any memstream setting, plus ``values``."""
    env = {
        k: v for k, v in os.environ.items() if not (k.startswith("MEMSTREAM_") or k == "REDIS_URL")
    }
    env.update(values)
    return env


@dataclass
class Cli:
    """Runs ``memstream`` in subprocesses with one environment."""

    env: dict[str, str]
    logs: Path
    running: list[subprocess.Popen[str]] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 60.0, **env: str) -> Result:
        done = subprocess.run(
            [MEMSTREAM, *args],
            check=False,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """``memstream run all`` in the background, its output in files."""
        self.logs.mkdir(parents=True, exist_ok=True)
        n = len(self.running)
        with (
            (self.logs / f"run{n}.out").open("w") as out,
            (self.logs / f"run{n}.err").open("w") as err,
        ):
            proc = subprocess.Popen(
                [MEMSTREAM, "run", "all", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
            )
        self.running.append(proc)
        return proc

    def stderr_of(self, proc: subprocess.Popen[str]) -> str:
        return (self.logs / f"run{self.running.index(proc)}.err").read_text()

    def stop(self, proc: subprocess.Popen[str], timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code (killed if it does not stop within ``timeout``)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"memstream run all did not stop within {timeout:g}s") from None

    def close(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def json(self) -> Any:
        return json.loads(self.out)


def lease_keys(client: redis.Redis, namespace: str) -> list[str]:
    return sorted(client.scan_iter(match=f"{namespace}:lease:*", count=1000))


def fresh_key() -> str:
    return f"k-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def direct(default_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(default_redis_url, decode_responses=True)
    yield client
    client.close()


def make_cli(url: str, namespace: str, tmp: Path) -> Cli:
    env = clean_env(
        REDIS_URL=url,
        MEMSTREAM_NAMESPACE=namespace,
        MEMSTREAM_STRICT_SCRIPT_KEYS="1",
        MEMSTREAM_RESOURCES=str(ROOT / "memories"),
        MEMSTREAM_STATE_DIR=str(tmp / "state"),
    )
    return Cli(env, tmp / "logs")


@pytest.fixture(scope="module")
def service(
    default_redis_url: str, direct: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cli]:
    """``memstream run all`` on the default server, in a namespace of its own, with every
    partition leased; stopped at the end of the module."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    cli = make_cli(default_redis_url, namespace, tmp_path_factory.mktemp("cli"))
    proc = cli.start()
    wait_for(
        "run all to lease every partition",
        lambda: proc.poll() is None and len(lease_keys(direct, namespace)) == LEASES,
    )
    yield cli
    try:
        assert cli.stop(proc) == 0, cli.stderr_of(proc)
    finally:
        cli.close()


@pytest.fixture
def cli(default_redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Cli]:
    """A CLI on the default server in a fresh namespace, nothing running yet."""
    c = make_cli(default_redis_url, namespace, tmp_path)
    yield c
    c.close()


# run all: start, serve, stop.


def test_run_all_stops_on_sigterm_with_exit_0_and_releases_its_leases(
    cli: Cli, direct: redis.Redis, namespace: str
) -> None:
    proc = cli.start()
    wait_for(
        "every partition leased",
        lambda: proc.poll() is None and len(lease_keys(direct, namespace)) == LEASES,
    )
    assert cli("publish", "acme/customer-support/s1", "--content", "hi", "--wait").code == 0
    members = direct.zrange(f"{namespace}:members:appender", 0, -1)
    assert len(members) == 1

    assert cli.stop(proc) == 0, cli.stderr_of(proc)

    assert lease_keys(direct, namespace) == []
    assert direct.zrange(f"{namespace}:members:appender", 0, -1) == []
    # The fencing counters stay: the leases were really held, and are never reused.
    assert all(direct.get(f"{namespace}:fence:{{{p}}}:appender") == "1" for p in range(PARTITIONS))
    assert "Traceback" not in cli.stderr_of(proc)


def test_run_all_with_a_heartbeat_too_slow_for_the_lease_is_a_usage_error(cli: Cli) -> None:
    result = cli("run", "all", timeout=30, MEMSTREAM_HEARTBEAT="5s")
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert errors[0].startswith("Error: setting heartbeat: ")


def test_a_misspelt_setting_variable_is_refused_with_a_suggestion(cli: Cli) -> None:
    result = cli("status", MEMSTREAM_LEASE_TLL="10s")
    assert result.code == 2, result.err
    assert "unknown environment variable MEMSTREAM_LEASE_TLL" in result.err
    assert "did you mean MEMSTREAM_LEASE_TTL?" in result.err


def test_a_tombstone_shorter_than_the_idempotency_window_is_refused(cli: Cli) -> None:
    result = cli("status", MEMSTREAM_TOMBSTONE_TTL="1h", MEMSTREAM_IDEMPOTENCY_WINDOW="2h")
    assert result.code == 2, result.err
    assert "tombstone_ttl (3600s) must not be shorter than idempotency_window" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("args", [("--last", "0"), ("--after", "-1"), ("--limit", "0")])
def test_read_refuses_out_of_range_numbers_as_usage_errors(cli: Cli, args: tuple[str, ...]) -> None:
    result = cli("read", "acme/customer-support/k", *args)
    assert result.code == 2, result.err
    assert "Traceback" not in result.err


def test_run_all_with_a_missing_resources_folder_fails_with_one_line(
    cli: Cli, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere"
    result = cli("run", "all", "--resources", str(missing))
    assert result.code == 1
    assert result.err.strip() == (
        f"error: {missing}: no such file or folder; pass an existing path to --resources"
    )


# publish and read.


def test_publish_wait_prints_the_entry_and_applied_with_seq(service: Cli) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    result = service("publish", ref, "--content", "hello", "--wait")
    assert result.code == 0, result.err
    published, applied = result.lines
    match = re.fullmatch(
        r"published (\d+)/(\d+-\d+) \(partition (\d+), entry (\d+-\d+)\)", published
    )
    assert match
    assert match[1] == match[3] and match[2] == match[4]
    assert int(match[1]) < PARTITIONS
    outcome = re.fullmatch(r"applied: seq (\d+), generation (\d+)", applied)
    assert outcome
    # Sequences and generations come from per-partition counters: the ones printed are
    # the stored message's.
    stored = service("read", ref, "--json").json()
    assert stored["partition"] == int(match[1])
    assert [(m["seq"], m["gen"], m["entry"]) for m in stored["messages"]] == [
        (int(outcome[1]), int(outcome[2]), match[2])
    ]


def test_publish_json_output_parses_with_the_outcome(service: Cli) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    result = service(
        "publish", ref, "--content", "hi", "--wait", "--json", "--idempotency-key", "idem-1"
    )
    assert result.code == 0, result.err
    data = result.json()
    assert data["token"] == f"{data['partition']}/{data['entry_id']}"
    assert data["idempotency_key"] == "idem-1"
    assert data["outcome"]["status"] == "applied"
    assert data["outcome"]["event_id"] == data["event_id"]
    stored = service("read", ref, "--json").json()["messages"]
    assert [m["seq"] for m in stored] == [data["outcome"]["seq"]]


def test_a_repeated_idempotency_key_is_applied_once(service: Cli) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    first = service("publish", ref, "--content", "once", "--wait", "--idempotency-key", "k")
    again = service("publish", ref, "--content", "once", "--wait", "--idempotency-key", "k")
    assert (first.code, again.code) == (0, 0), again.err
    assert again.lines[1].startswith("duplicate")
    view = service("read", ref, "--json").json()
    assert [m["content"] for m in view["messages"]] == ["once"]


def test_publish_without_wait_returns_the_entry_and_the_worker_applies_it(
    service: Cli,
) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    result = service("publish", ref, "--content", "later")
    assert result.code == 0
    assert len(result.lines) == 1 and result.lines[0].startswith("published ")
    wait_for(
        "the message to be applied",
        lambda: service("read", ref, "--json").json()["count"] == 1,
    )


@dataclass(frozen=True)
class Conversation:
    ref: str
    seqs: list[int]
    generation: int


@pytest.fixture(scope="module")
def conversation(service: Cli) -> Conversation:
    """A memory with three messages, published in order, each after the previous one."""
    ref = f"acme/customer-support/{fresh_key()}"
    outcomes = []
    for role, content, name in [
        ("system", "be brief", None),
        ("user", "where is my order?", "ann"),
        ("assistant", "on its way", None),
    ]:
        extra = ["--name", name] if name else []
        result = service(
            "publish", ref, "--role", role, "--content", content, *extra, "--wait", "--json"
        )
        assert result.code == 0, result.err
        outcomes.append(result.json()["outcome"])
    seqs = [o["seq"] for o in outcomes]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert len({o["gen"] for o in outcomes}) == 1
    return Conversation(ref, seqs, outcomes[0]["gen"])


def test_read_shows_the_messages_in_order(service: Cli, conversation: Conversation) -> None:
    c = conversation
    result = service("read", c.ref)
    assert result.code == 0, result.err
    assert result.lines == [
        f"# {c.ref}: generation {c.generation}, 3 message(s), showing 3",
        f"[{c.seqs[0]}] system: be brief",
        f"[{c.seqs[1]}] user(ann): where is my order?",
        f"[{c.seqs[2]}] assistant: on its way",
    ]


def test_read_last_shows_only_the_newest(service: Cli, conversation: Conversation) -> None:
    c = conversation
    assert service("read", c.ref, "--last", "1").lines == [
        f"# {c.ref}: generation {c.generation}, 3 message(s), showing 1",
        f"[{c.seqs[2]}] assistant: on its way",
    ]
    assert [
        m["seq"] for m in service("read", c.ref, "--last", "2", "--json").json()["messages"]
    ] == c.seqs[1:]


def test_read_after_pages_through_the_memory(service: Cli, conversation: Conversation) -> None:
    c = conversation
    assert service("read", c.ref, "--after", str(c.seqs[0])).lines[1:] == [
        f"[{c.seqs[1]}] user(ann): where is my order?",
        f"[{c.seqs[2]}] assistant: on its way",
    ]
    page = service("read", c.ref, "--after", str(c.seqs[0]), "--limit", "1", "--json").json()
    assert [m["seq"] for m in page["messages"]] == [c.seqs[1]]
    rest = service("read", c.ref, "--after", str(page["next_after"]), "--json").json()
    assert [m["seq"] for m in rest["messages"]] == [c.seqs[2]]


def test_read_json_parses_with_the_messages_in_order(
    service: Cli, conversation: Conversation
) -> None:
    c = conversation
    data = service("read", c.ref, "--json").json()
    assert data["memory"] == c.ref
    assert data["exists"] is True
    assert (data["generation"], data["count"]) == (c.generation, 3)
    assert [(m["seq"], m["role"], m["content"]) for m in data["messages"]] == [
        (c.seqs[0], "system", "be brief"),
        (c.seqs[1], "user", "where is my order?"),
        (c.seqs[2], "assistant", "on its way"),
    ]
    assert data["messages"][1]["name"] == "ann"
    assert data["watermark"] == data["messages"][-1]["entry"]


def test_read_refuses_last_and_after_together(service: Cli, conversation: Conversation) -> None:
    result = service("read", conversation.ref, "--last", "1", "--after", "1")
    assert result.code == 2
    assert "pass one of --last, --after and --budget" in result.err


def test_read_of_a_memory_never_written_says_so(service: Cli) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    result = service("read", ref)
    assert result.code == 0
    assert result.lines == [f"# {ref}: no such memory (generation 0)"]


def test_a_key_with_spaces_and_unicode_is_sanitized_end_to_end(service: Cli) -> None:
    raw = f"café {fresh_key()}/😀"
    result = service("publish", f"acme/customer-support/{raw}", "--content", "ok", "--wait")
    assert result.code == 0, result.err
    data = service("read", f"acme/customer-support/{raw}", "--json").json()
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:32]
    readable = raw.replace("é", "_").replace(" ", "_").replace("/", "_").replace("😀", "_")
    assert data["memory"] == f"acme/customer-support/{readable}~{digest}"
    assert [m["content"] for m in data["messages"]] == ["ok"]


# Refusals and dead letters.


def test_unknown_resource_is_refused_listed_and_replayed(service: Cli) -> None:
    ref = f"acme/no-such-resource/{fresh_key()}"
    result = service("publish", ref, "--content", "lost", "--wait", "--json")
    assert result.code == 3
    published = result.json()
    assert published["outcome"]["status"] == "refused"
    assert published["outcome"]["reason"] == "unknown_resource"
    p, entry = published["partition"], published["entry_id"]

    text = service("publish", ref, "--content", "lost too", "--wait")
    assert text.code == 3
    assert text.lines[1].startswith("refused: unknown_resource: ")

    listed = service("dlq", "list", "--partition", str(p))
    assert listed.code == 0
    lines = [line for line in listed.lines if f"(entry {entry})" in line]
    assert len(lines) == 1
    assert re.match(rf"{p}/\d+-\d+  unknown_resource: .*'no-such-resource'", lines[0])

    letters = [json.loads(line) for line in service("dlq", "list", "--json").lines]
    letter = next(x for x in letters if x["entry"] == entry)
    assert letter["partition"] == p
    assert letter["memory"] == ref
    assert letter["reason"] == "unknown_resource"

    shown = service("dlq", "show", str(p), letter["id"], "--json")
    assert shown.code == 0, shown.err
    whole = shown.json()
    assert (whole["reason"], whole["entry"]) == ("unknown_resource", entry)
    assert whole["event"]["payload"]["message"]["content"] == "lost"
    text_form = service("dlq", "show", str(p), letter["id"])
    assert f"memstream dlq replay {p} {letter['id']}" in text_form.out
    assert '"content": "lost"' in text_form.out
    assert service("dlq", "show", str(p), "1-1").code == 1

    replayed = service("dlq", "replay", str(p), letter["id"])
    assert replayed.code == 0, replayed.err
    match = re.fullmatch(rf"replayed as {p}/(\d+-\d+)", replayed.out.strip())
    assert match
    new_entry = match[1]

    def letters_now() -> list[dict[str, Any]]:
        out = service("dlq", "list", "--partition", str(p), "--json").lines
        return [json.loads(line) for line in out]

    # The replayed event went through the appender again (still unknown): a new letter
    # for the new entry, and the old letter is gone.
    again = wait_for(
        "the replayed entry to be dead-lettered",
        lambda: [x for x in letters_now() if x["entry"] == new_entry],
    )
    assert again[0]["reason"] == "unknown_resource"
    assert letter["id"] not in {x["id"] for x in letters_now()}


def test_replaying_a_missing_dead_letter_fails(service: Cli) -> None:
    result = service("dlq", "replay", "0", "1-1")
    assert result.code == 1
    assert result.err.strip() == "error: no dead letter 0/1-1"


# status and schema.


def test_status_shows_owner_and_fence_of_every_partition(service: Cli) -> None:
    data = service("status", "--json").json()
    assert data["group"] == "appender"
    assert len(data["members"]) == 1
    worker = data["members"][0]
    assert [row["partition"] for row in data["partitions"]] == list(range(PARTITIONS))
    for row in data["partitions"]:
        assert row["owner"] == worker
        assert isinstance(row["fence"], int) and row["fence"] >= 1
        assert row["lease_ttl_ms"] > 0

    text = service("status")
    assert text.code == 0
    assert re.match(rf"redis: .* \(version [\d.]+\), {PARTITIONS} partitions$", text.lines[0])
    assert text.lines[1] == f"appender: 1 live worker(s): {worker}"
    rows = [line.split() for line in text.lines[3 : 3 + PARTITIONS]]
    by_partition = {int(r[0]): r for r in rows}
    assert sorted(by_partition) == list(range(PARTITIONS))
    for row in data["partitions"]:
        shown = by_partition[row["partition"]]
        assert shown[1] == worker
        assert shown[2] == str(row["fence"])
    assert text.lines[-1].startswith("total: lag ")


def test_schema_events_prints_the_committed_schema(cli: Cli) -> None:
    result = cli("schema", "events")
    assert result.code == 0
    assert result.out == (ROOT / "events" / "schema.json").read_text("utf-8")
    assert cli("schema").out == result.out


def test_schema_resource_prints_a_json_schema_of_resource_files(cli: Cli) -> None:
    result = cli("schema", "resource")
    assert result.code == 0
    schema = result.json()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"id", "type", "max_tokens", "persistence"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    assert not jsonschema.Draft202012Validator(schema).is_valid({"id": "x", "colour": "red"})


# Errors are one line, with the right exit code.


@pytest.mark.parametrize(
    "args",
    [
        ("publish", "acme/customer-support", "--content", "x"),
        ("publish", "ac me/customer-support/k", "--content", "x"),
        ("read", "acme"),
        ("read", "acme/Support/k"),
    ],
)
def test_an_invalid_ref_exits_2_with_one_error_line(cli: Cli, args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.code == 2
    assert result.out == ""
    errors = [line for line in result.err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "REF" in errors[0]
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    "args",
    [
        ("read", "acme/customer-support/k"),
        ("publish", "acme/customer-support/k", "--content", "x"),
        ("status",),
        ("dlq", "list"),
    ],
)
def test_no_redis_reachable_is_one_error_line_and_exit_1(cli: Cli, args: tuple[str, ...]) -> None:
    closed = f"redis://127.0.0.1:{closed_port()}"
    result = cli(*args, REDIS_URL=closed)
    assert result.code == 1
    assert result.out == ""
    assert len(result.err.splitlines()) == 1
    assert result.err.startswith("error: ")
    assert "Traceback" not in result.err


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return


def test_without_redis_url_or_embedded_server_read_says_what_to_do(
    tmp_path: Path,
) -> None:
    state = tmp_path / "empty-state"
    state.mkdir()
    cli = Cli(clean_env(MEMSTREAM_STATE_DIR=str(state)), tmp_path / "logs")
    result = cli("read", "acme/customer-support/k")
    assert result.code == 1
    assert len(result.err.splitlines()) == 1
    assert result.err.startswith("error: no Redis to talk to")
    assert "set REDIS_URL" in result.err
    assert "memstream run all" in result.err
    url = cli("url")
    assert url.code == 1 and url.out == ""
    assert url.err.startswith("error: no REDIS_URL and no embedded Redis running")
    assert list(state.iterdir()) == []  # nothing started, nothing written
    given = Cli(clean_env(MEMSTREAM_STATE_DIR=str(state), REDIS_URL="redis://h:1/2"), tmp_path)
    assert given("url").lines == ["redis://h:1/2"]


# The embedded default.


def pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_run_all_without_redis_url_starts_and_stops_its_own_redis(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli = Cli(
        clean_env(
            MEMSTREAM_STATE_DIR=str(state),
            MEMSTREAM_STRICT_SCRIPT_KEYS="1",
            MEMSTREAM_RESOURCES=str(ROOT / "memories"),
        ),
        tmp_path / "logs",
    )
    info: dict[str, Any] = {}
    try:
        proc = cli.start()
        info_file = state / "redis.json"
        info = wait_for(
            "the embedded server's redis.json",
            lambda: (
                proc.poll() is None and info_file.exists() and json.loads(info_file.read_text())
            ),
        )
        assert pid_running(info["pid"])
        embedded = redis.Redis(port=info["port"], decode_responses=True)
        try:
            wait_for(
                "every partition leased",
                lambda: len(list(embedded.scan_iter(match="ms:lease:*"))) == LEASES,
            )
            ref = f"acme/customer-support/{fresh_key()}"
            result = cli("publish", ref, "--content", "embedded", "--wait")
            assert result.code == 0, result.err
            assert result.lines[1].startswith("applied: seq ")
            assert cli("read", ref).lines[1].endswith("] user: embedded")
            # Other programs find the server the same way.
            assert cli("url").lines == [f"redis://127.0.0.1:{info['port']}"]
            record = json.loads((state / "data" / "memstream-server.json").read_text())
            assert record["version"] == info["version"] and record["binary"] == info["binary"]
        finally:
            embedded.close()

        assert cli.stop(proc) == 0, cli.stderr_of(proc)
        assert not pid_running(info["pid"])
        assert not info_file.exists()
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=info["port"], retry=None, socket_connect_timeout=1).ping()
    finally:
        cli.close()
        if info and pid_running(info["pid"]):  # run all died without stopping its server
            os.kill(info["pid"], signal.SIGKILL)


def test_the_embedded_server_stops_at_once(tmp_path: Path) -> None:
    """``run all`` stops its embedded server with RedisServerProcess.stop(): SHUTDOWN never
    gets a reply (the server closes the connection), so retrying it only waits. Two
    servers, so a lucky short backoff cannot hide a retrying client."""
    for n in range(2):
        server = RedisServerProcess(find_server_binary(), tmp_path / f"s{n}", appendonly=True)
        server.start()
        try:
            started = time.monotonic()
            server.stop()
            took = time.monotonic() - started
        finally:
            server.kill()
        assert server.process is not None and server.process.poll() is not None
        assert took < 1.0, f"stopping the embedded server took {took:.1f}s"


# Resource files.


def test_sighup_reloads_the_resource_files(cli: Cli, direct: redis.Redis, tmp_path: Path) -> None:
    folder = tmp_path / "resources"
    folder.mkdir()
    shutil.copy(ROOT / "memories" / "customer-support.yaml", folder)
    cli.env["MEMSTREAM_RESOURCES"] = str(folder)
    proc = cli.start()
    wait_for(
        "every partition leased",
        lambda: len(lease_keys(direct, cli.env["MEMSTREAM_NAMESPACE"])) == LEASES,
    )
    ref = f"acme/user-preferences/{fresh_key()}"
    before = cli("publish", ref, "--content", "prefers email", "--wait")
    assert before.code == 3 and "unknown_resource" in before.out
    # A broken file is refused and the loaded resources stay in use.
    (folder / "broken.yaml").write_text("resource: memory\nid: broken\nflushing_strategy: {}\n")
    proc.send_signal(signal.SIGHUP)
    wait_for("the refused reload logged", lambda: "not reloaded" in cli.stderr_of(proc))
    (folder / "broken.yaml").unlink()
    shutil.copy(ROOT / "memories" / "user-preferences.yaml", folder)
    proc.send_signal(signal.SIGHUP)
    wait_for("the reload logged", lambda: "resources reloaded" in cli.stderr_of(proc))
    after = cli("publish", ref, "--content", "prefers email", "--wait")
    assert after.code == 0, after.out + after.err
    assert cli.stop(proc) == 0


def test_resources_validate_reports_every_problem_and_exits_1(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text("resource: memory\nid: good\nmax_tokens: 100\n")
    (tmp_path / "bad.yaml").write_text(
        "resource: memory\nid: bad\nmax_tokens: 100\n"
        "flushing_strategy: {type: fifo}\nmax_token: 5\n"
    )
    result = cli("resources", "validate", str(tmp_path))
    assert result.code == 1
    bad = tmp_path / "bad.yaml"
    assert (
        f"{bad}: flushing_strategy: unknown field (from the origin system?): did you mean flushing?"
        in result.err
    )
    assert f"{bad}: max_token: unknown field: did you mean max_tokens?" in result.err
    assert f"ok: {tmp_path / 'good.yaml'}: memory good" in result.out
    assert "1 file(s) valid, 1 with errors" in result.out


def test_resources_validate_passes_on_the_shipped_files(cli: Cli) -> None:
    result = cli("resources", "validate")
    assert result.code == 0, result.err
    assert "0 with errors" in result.out


def test_schema_agent_prints_the_agent_file_format(cli: Cli) -> None:
    result = cli("schema", "agent")
    assert result.code == 0
    assert set(json.loads(result.out)["properties"]) >= {"id", "memory", "memories", "memory_key"}


def test_a_hashed_key_can_be_read_back_by_its_stored_form(service: Cli) -> None:
    raw = f"order #{fresh_key()}"
    assert service("publish", f"acme/customer-support/{raw}", "--content", "x", "--wait").code == 0
    stored = service("read", f"acme/customer-support/{raw}", "--json").json()["memory"]
    assert "~" in stored
    again = service("read", stored, "--stored-key", "--json").json()
    assert [m["content"] for m in again["messages"]] == ["x"]
    # Without the flag the stored key is taken as a rendered key: another memory.
    assert service("read", stored, "--json").json()["exists"] is False


def test_recount_agrees_with_the_accountant(service: Cli) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    for text in ("one", "two words", "three more words"):
        assert service("publish", ref, "--content", text, "--wait").code == 0
    deadline = time.monotonic() + 30
    while True:
        result = service("recount", ref)
        if "not counted yet" not in result.out or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.code == 0, result.out + result.err
    total = re.search(r"total (\d+)", result.out)
    recomputed = re.search(r"recomputed (\d+)", result.out)
    assert total and recomputed and total.group(1) == recomputed.group(1) != "0"


def test_flush_dry_run_then_flush_then_health(service: Cli) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    words = " ".join(f"word{i}" for i in range(300))  # about 600 tokens a message
    for i in range(4):  # about 2,450 tokens: under the 3,200 threshold, over the target
        assert service("publish", ref, "--content", f"m{i}. {words}", "--wait").code == 0
    health = wait_for(
        "the accountant",
        lambda: (h := service("health", ref, "--json").json())["uncounted"] == 0 and h,
    )
    assert health["messages"] == 4 and health["token_limit"] == 4000
    assert health["by_role"]["user"]["messages"] == 4 and not health["flush_pending"]
    # A dry run shows the plan and changes nothing.
    dry = service("flush", ref, "--strategy", "fifo", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    plan = dry.json()
    assert plan["outcome"] == "planned" and len(plan["remove"]) == 1
    assert service("health", ref, "--json").json()["messages"] == 4
    # A flush through the partition, waited for.
    done = service("flush", ref, "--strategy", "fifo", "--wait")
    assert done.code == 0, done.err
    assert "applied (fifo, 1 removed)" in done.out
    after = service("health", ref, "--json").json()
    assert after["messages"] == 3 and after["tokens"] <= 2400
    assert after["per_strategy"]["fifo"] == {
        "flushes": 1,
        "removed": 1,
        "saved": health["tokens"] - after["tokens"],
    }
    assert service("health", ref).out.startswith(f"{ref}: generation")
    assert service("flush", ref, "--strategy", "nope").code == 2


def test_write_append_stats_clear_and_delete(service: Cli, tmp_path: Path) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    first = tmp_path / "first.json"
    first.write_text(
        json.dumps([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}])
    )
    more = tmp_path / "more.json"
    more.write_text(json.dumps([{"role": "assistant", "content": f"a{i}"} for i in range(3)]))
    written = service("write", ref, "--file", str(first))
    assert written.code == 0 and written.out.strip() == "write: 1 applied", written.err
    appended = service("append", ref, "--file", str(more), "--json")
    assert appended.code == 0, appended.err
    seqs = [o["seq"] for o in appended.json()["outcomes"]]
    assert len(seqs) == 3 and seqs == sorted(seqs)
    contents = [m["content"] for m in service("read", ref, "--json").json()["messages"]]
    assert contents == ["Be kind.", "hi", "a0", "a1", "a2"]
    stats = service("stats", ref, "--json").json()
    assert stats["messages"] == 5 and stats["pages"] == 1
    assert {r: v["messages"] for r, v in stats["roles"].items()} == {
        "assistant": 3,
        "system": 1,
        "user": 1,
    }
    # A second write replaces everything, atomically.
    assert service("write", ref, "--file", str(more)).code == 0
    contents = [m["content"] for m in service("read", ref, "--json").json()["messages"]]
    assert contents == ["a0", "a1", "a2"]
    # clear needs --yes (usage error, exit 2), then empties the memory.
    refused = service("clear", ref)
    assert refused.code == 2 and "--yes" in refused.err
    assert service("read", ref, "--json").json()["count"] == 3
    assert service("clear", ref, "--yes").code == 0
    assert service("read", ref, "--json").json()["count"] == 0
    assert service("delete", ref).code == 0
    assert service("stats", ref, "--json").json()["exists"] is False
    # Bad files name the file and the fault; refused events exit 3.
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "nope"}]')
    invalid = service("append", ref, "--file", str(bad))
    assert invalid.code == 2 and "bad.json: 0.role" in invalid.err
    unknown = service("append", "acme/no-such-resource/x", "--file", str(first))
    assert unknown.code == 3 and "unknown_resource" in unknown.err


def test_read_within_a_token_budget(service: Cli, tmp_path: Path) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    messages = tmp_path / "m.json"
    messages.write_text(
        json.dumps(
            [
                {"role": "system", "content": "Be kind."},
                *({"role": "user", "content": f"question {i}: " + "word " * 40} for i in range(5)),
            ]
        )
    )
    assert service("write", ref, "--file", str(messages)).code == 0
    everything = service("read", ref, "--budget", "4000", "--json").json()
    assert len(everything["messages"]) == 6 and not everything["over_budget"]
    budget = everything["tokens"] * 2 // 5  # the system message and one or two questions
    fit = service("read", ref, "--budget", str(budget), "--json").json()
    assert fit["tokens"] <= budget
    kept = [m["content"] for m in fit["messages"]]
    assert kept[0] == "Be kind." and kept[-1].startswith("question 4")
    assert 2 <= len(kept) <= 3
    tiny = service("read", ref, "--budget", "2", "--json").json()
    assert tiny["over_budget"] and tiny["messages"] == []
    both = service("read", ref, "--budget", "10", "--last", "2")
    assert both.code == 2


def test_clear_with_a_backup_and_restore(service: Cli, tmp_path: Path) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    messages = tmp_path / "m.json"
    messages.write_text(
        json.dumps([{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}])
    )
    assert service("write", ref, "--file", str(messages)).code == 0
    cleared = service("clear", ref, "--yes", "--backup", "--json")
    assert cleared.code == 0, cleared.err
    backup = cleared.json()["outcomes"][0]["backup"]
    assert service("read", ref, "--json").json()["count"] == 0
    restored = service("restore", ref, backup)
    assert restored.code == 0 and "restore: 1 applied" in restored.out, restored.err
    contents = [m["content"] for m in service("read", ref, "--json").json()["messages"]]
    assert contents == ["one", "two"]
    # Decided in the memory's partition: only its latest backup comes back.
    stale = service("restore", ref, "1-0")
    assert stale.code == 3 and "refused: backup_not_latest" in stale.err, stale.err
    assert f"backup 1-0 of {ref} is not its latest ({backup})" in stale.err
    invalid = service("restore", ref, "latest")
    assert invalid.code == 2 and "not a backup id" in invalid.err


def test_erase_one_message(service: Cli, tmp_path: Path) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": t} for t in ("a", "b", "c")]))
    assert service("write", ref, "--file", str(messages)).code == 0
    seqs = [m["seq"] for m in service("read", ref, "--json").json()["messages"]]
    erased = service("erase", ref, str(seqs[1]))
    assert erased.code == 0 and "erased 1 message(s)" in erased.out, erased.err
    contents = [m["content"] for m in service("read", ref, "--json").json()["messages"]]
    assert contents == ["a", "c"]
    assert service("erase", ref, "0").code == 2


def test_workflow_termination_and_the_inventory(service: Cli, tmp_path: Path) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    refs = [f"{tenant}/customer-support/{fresh_key()}" for _ in range(3)]
    for ref in refs:
        done = service("publish", ref, "--content", "hi", "--workflow", "wf-1", "--wait")
        assert done.code == 0, done.err
    extra = f"{tenant}/user-preferences/{fresh_key()}"
    assert service("publish", extra, "--content", "dark mode", "--wait").code == 0

    listed = service("ls", tenant, "--json")
    assert listed.code == 0, listed.err
    assert {json.loads(line)["memory"] for line in listed.lines} == {*refs, extra}
    by_resource = service("ls", tenant, "--resource", "user-preferences")
    assert [line.split()[0] for line in by_resource.lines] == [extra]
    assert "1 memory" in by_resource.err
    by_workflow = service("ls", tenant, "--workflow", "wf-1", "--json")
    assert {json.loads(line)["memory"] for line in by_workflow.lines} == set(refs)
    limited = service("ls", tenant, "--limit", "2")
    assert len(limited.lines) == 2 and "raise --limit" in limited.err
    assert service("ls", tenant, "--resource", "x", "--workflow", "y").code == 2

    started = service("workflow", "started", "wf-2", "--tenant", tenant, "--wait")
    assert started.code == 0 and "applied" in started.out, started.err
    ended = service(
        "workflow",
        "terminated",
        "wf-1",
        "--tenant",
        tenant,
        "--status",
        "failed",
        "--wait",
        "--json",
    )
    assert ended.code == 0, ended.err
    assert ended.json()["outcome"]["status"] == "applied"
    assert "sent to 16 partitions" in ended.json()["outcome"]["detail"]
    # customer-support keeps its memories (on_workflow_end: keep); the workflow is gone
    # from the inventory, its late writes are refused (exit 3).
    assert service("ls", tenant, "--workflow", "wf-1").lines == []
    assert len(service("ls", tenant).lines) == 4
    late = service("publish", refs[0], "--content", "late", "--workflow", "wf-1", "--wait")
    assert late.code == 3 and "workflow_ended" in late.out
    assert service("workflow", "terminated", "wf-1", "--tenant", "no/such").code == 2
    status = service("status", "--json").json()
    assert status["cleanup"]["group"] == "cleanup"
    assert [row["partition"] for row in status["cleanup"]["partitions"]] == [0]


def test_paginated_read_pinned_to_a_generation(service: Cli, tmp_path: Path) -> None:
    ref = f"acme/customer-support/{fresh_key()}"
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": t} for t in "abcd"]))
    assert service("write", ref, "--file", str(messages)).code == 0
    first = service("read", ref, "--after", "0", "--limit", "2", "--json").json()
    gen, after = str(first["generation"]), str(first["next_after"])
    page = service("read", ref, "--after", after, "--generation", gen, "--json")
    assert page.code == 0 and [m["content"] for m in page.json()["messages"]] == ["c", "d"]
    assert service("write", ref, "--file", str(messages)).code == 0
    stale = service("read", ref, "--after", after, "--generation", gen)
    assert stale.code == 3 and "read it again from the start" in stale.err


def test_a_reader_that_goes_away_is_not_a_redis_error(service: Cli) -> None:
    # `memstream status | head -1`: the pipe closes before the output is written.
    proc = subprocess.Popen(
        [MEMSTREAM, "status"],
        env=service.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    proc.wait(60)
    assert "Redis" not in err and "Traceback" not in err, err
