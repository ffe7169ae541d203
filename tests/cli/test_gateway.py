"""The HTTP gateway, end to end: ``memstream gateway`` in a subprocess beside
``memstream run all``, driven by a real HTTP client (httpx) over TCP."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.cli.test_cli import MEMSTREAM, Cli, make_cli, wait_for
from tests.cli.test_metrics_endpoint import free_port

RESOURCE = "customer-support"


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[str]
    cli: Cli

    def key(self, tenant: str) -> str:
        made = self.cli("apikey", "create", tenant, "--name", "tests")
        assert made.code == 0, made.err
        return made.out.strip()

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def start_gateway(cli: Cli, *args: str) -> tuple[str, subprocess.Popen[str]]:
    port = free_port()
    cli.logs.mkdir(parents=True, exist_ok=True)
    with (cli.logs / f"gateway{port}.err").open("w") as err:
        proc = subprocess.Popen(
            [MEMSTREAM, "gateway", "--port", str(port), *args],
            env=cli.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
    cli.running.append(proc)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (cli.logs / f"gateway{port}.err").read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for("the gateway to answer /healthz", up)
    return url, proc


@pytest.fixture(scope="module")
def gateway(service: Cli) -> Iterator[Gateway]:
    url, proc = start_gateway(service)
    yield Gateway(url, proc, service)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.fixture(scope="module")
def acme(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client(gateway.key("acme")) as client:
        yield client


@pytest.fixture(scope="module")
def globex(gateway: Gateway) -> Iterator[httpx.Client]:
    with gateway.client(gateway.key("globex")) as client:
        yield client


def fresh() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


def path(key: str, suffix: str = "") -> str:
    return f"/v1/memories/{RESOURCE}/{key}{suffix}"


def append(client: httpx.Client, key: str, *texts: str, **params: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": t} for t in texts]}
    return client.post(path(key, "/messages"), json=body, params=params)


def contents(client: httpx.Client, key: str, **params: object) -> list[str]:
    reply = client.get(path(key), params=params)
    assert reply.status_code == 200, reply.text
    return [m["content"] for m in reply.json()["messages"]]


# Service endpoints and the OpenAPI document.


def test_healthz_and_openapi_need_no_key_and_document_every_route(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    doc = httpx.get(f"{gateway.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    memory = "/v1/memories/{resource}/{key}"
    assert set(paths[memory]) == {"get", "put", "delete"}
    for suffix in ("/messages", "/clear", "/erase", "/flush"):
        assert "post" in paths[memory + suffix], suffix
    for suffix in ("/health", "/stats"):
        assert "get" in paths[memory + suffix], suffix
    assert "get" in paths["/v1/memories"]
    assert "post" in paths["/v1/workflows/{workflow_id}/terminated"]
    schemes = doc["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert paths[memory]["get"]["security"], "reads must require a key"
    assert "security" not in paths["/healthz"]["get"]


# Authentication and tenant isolation.


def test_a_request_without_a_key_or_with_a_wrong_one_is_401(gateway: Gateway) -> None:
    with gateway.client(None) as anonymous:
        reply = anonymous.get(path("x"))
    assert reply.status_code == 401
    assert reply.json()["error"] == "unauthorized"
    for wrong in ("nope", "msk_000000000000_forged", gateway.key("acme") + "x"):
        with gateway.client(wrong) as client:
            assert client.get(path("x")).status_code == 401, wrong


def test_the_key_is_checked_before_the_body_is_read(gateway: Gateway) -> None:
    big = b'{"messages": [' + b'{"role": "user"},' * 500_000 + b"]}"
    with gateway.client("msk_000000000000_forged") as client:
        reply = client.post(path("x", "/messages"), content=big)
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer"


def test_unknown_routes_and_methods_answer_json_errors(acme: httpx.Client) -> None:
    missing = acme.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong = acme.patch(path("x"))
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"


def test_a_revoked_key_stops_working_at_once(gateway: Gateway) -> None:
    key = gateway.key("acme")
    with gateway.client(key) as client:
        assert client.get(path("x")).status_code == 200
        key_id = key.split("_")[1]
        listed = gateway.cli("apikey", "list", "--tenant", "acme", "--json")
        assert key_id in listed.out and key not in listed.out  # the key itself is never kept
        assert gateway.cli("apikey", "revoke", key_id).code == 0
        assert client.get(path("x")).status_code == 401
    assert gateway.cli("apikey", "revoke", key_id).code == 3


def test_a_tenant_never_reads_or_changes_another_tenants_memory(
    acme: httpx.Client, globex: httpx.Client, gateway: Gateway
) -> None:
    key = fresh()
    assert append(acme, key, "acme's secret").status_code == 200
    # The same path under another key is another tenant's memory, not acme's.
    theirs = globex.get(path(key)).json()
    assert theirs["memory"] == f"globex/{RESOURCE}/{key}"
    assert theirs["exists"] is False and theirs["messages"] == []
    assert globex.delete(path(key)).status_code == 200
    assert globex.post(path(key, "/clear"), json={}).status_code == 200
    listed = globex.get("/v1/memories").json()["memories"]
    assert all(m["memory"].startswith("globex/") for m in listed)
    # acme's memory is untouched by all of it.
    assert contents(acme, key) == ["acme's secret"]
    mine = [m["memory"] for m in acme.get("/v1/memories").json()["memories"]]
    assert f"acme/{RESOURCE}/{key}" in mine


# Memory operations.


def test_append_waits_and_reads_back_in_order_with_pages(acme: httpx.Client) -> None:
    key = fresh()
    reply = append(acme, key, "one", "two", "three")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["applied"], body["refused"], body["pending"]) == (3, 0, 0)
    # Sequence numbers are per partition: they increase, but need not start at 1.
    seqs = [r["outcome"]["seq"] for r in body["results"]]
    assert seqs == sorted(set(seqs)) and len(seqs) == 3, seqs
    stored = acme.get(path(key)).json()["messages"]
    assert [m["seq"] for m in stored] == seqs
    assert all("/" in r["receipt"]["token"] for r in body["results"])
    assert contents(acme, key) == ["one", "two", "three"]
    assert contents(acme, key, last=1) == ["three"]
    page = acme.get(path(key), params={"after": 0, "limit": 2}).json()
    assert [m["content"] for m in page["messages"]] == ["one", "two"]
    rest = acme.get(path(key), params={"after": page["next_after"], "limit": 2}).json()
    assert [m["content"] for m in rest["messages"]] == ["three"]
    bad = acme.get(path(key), params={"last": 1, "after": 0})
    assert bad.status_code == 400


def test_a_repeated_idempotency_key_is_applied_once(acme: httpx.Client) -> None:
    key, idem = fresh(), uuid.uuid4().hex
    body = {"messages": [{"role": "user", "content": "once"}]}
    first = acme.post(path(key, "/messages"), json=body, headers={"Idempotency-Key": idem})
    again = acme.post(path(key, "/messages"), json=body, headers={"Idempotency-Key": idem})
    assert first.json()["results"][0]["outcome"]["status"] == "applied"
    assert again.status_code == 200
    assert again.json()["results"][0]["outcome"]["status"] == "duplicate"
    assert contents(acme, key) == ["once"]


def test_a_batch_key_never_collides_with_a_later_single_key(acme: httpx.Client) -> None:
    key, idem = fresh(), uuid.uuid4().hex
    batch = {"messages": [{"role": "user", "content": c} for c in ("one", "two")]}
    first = acme.post(path(key, "/messages"), json=batch, headers={"Idempotency-Key": idem})
    assert [r["outcome"]["status"] for r in first.json()["results"]] == ["applied"] * 2
    single = {"messages": [{"role": "user", "content": "three"}]}
    for literal in (f"{idem}:0", f"{idem}:1"):
        reply = acme.post(path(key, "/messages"), json=single, headers={"Idempotency-Key": literal})
        assert reply.json()["results"][0]["outcome"]["status"] == "applied", literal
    again = acme.post(path(key, "/messages"), json=batch, headers={"Idempotency-Key": idem})
    assert [r["outcome"]["status"] for r in again.json()["results"]] == ["duplicate"] * 2
    assert contents(acme, key) == ["one", "two", "three", "three"]


def test_a_batch_with_the_longest_key_is_accepted(acme: httpx.Client) -> None:
    key = fresh()
    batch = {"messages": [{"role": "user", "content": c} for c in ("one", "two")]}
    reply = acme.post(path(key, "/messages"), json=batch, headers={"Idempotency-Key": "k" * 200})
    assert reply.status_code == 200, reply.text
    assert contents(acme, key) == ["one", "two"]


def test_metadata_nested_past_the_contract_limit_is_refused_before_publishing(
    acme: httpx.Client,
) -> None:
    key = fresh()
    deep: object = "leaf"
    for _ in range(80):
        deep = [deep]
    body = {"messages": [{"role": "user", "content": "x", "metadata": {"m": deep}}]}
    reply = acme.post(path(key, "/messages"), json=body)
    assert reply.status_code == 422, reply.text
    assert "more than 64 deep" in reply.json()["detail"]
    assert contents(acme, key) == []


def test_without_wait_the_answer_is_202_with_receipts_and_the_append_lands(
    acme: httpx.Client,
) -> None:
    key = fresh()
    reply = append(acme, key, "later", wait="false")
    assert reply.status_code == 202
    assert reply.json()["pending"] == 1 and reply.json()["results"][0]["outcome"] is None
    wait_for("the append to be applied", lambda: contents(acme, key) == ["later"])


def test_replace_clear_with_backup_erase_flush_and_delete(acme: httpx.Client) -> None:
    key = fresh()
    append(acme, key, "a", "b")
    replaced = acme.put(path(key), json={"messages": [{"role": "system", "content": "fresh"}]})
    assert replaced.status_code == 200, replaced.text
    assert contents(acme, key) == ["fresh"]
    append(acme, key, "x", "y")
    seqs = [m["seq"] for m in acme.get(path(key)).json()["messages"]]
    erased = acme.post(path(key, "/erase"), json={"seq": seqs[1]})
    assert erased.status_code == 200, erased.text
    assert contents(acme, key) == ["fresh", "y"]
    flushed = acme.post(path(key, "/flush"), json={"strategy": "fifo", "dry_run": True})
    assert flushed.status_code == 200, flushed.text
    cleared = acme.post(path(key, "/clear"), json={"backup": True})
    assert cleared.status_code == 200
    assert cleared.json()["results"][0]["outcome"]["backup"]
    after = acme.get(path(key)).json()
    assert after["messages"] == [] and after["generation"] > 1
    assert acme.delete(path(key)).status_code == 200
    assert acme.get(path(key)).json()["exists"] is False


def test_health_stats_and_a_budgeted_read(acme: httpx.Client) -> None:
    key = fresh()
    append(acme, key, "hello there", "general kenobi")
    wait_for(
        "the accountant to count both",
        lambda: (
            acme.get(path(key, "/stats")).json()["uncounted"] == 0
            and acme.get(path(key, "/stats")).json()["tokens"] > 0
        ),
    )
    stats = acme.get(path(key, "/stats")).json()
    assert stats["messages"] == 2 and stats["roles"]["user"]["messages"] == 2
    health = acme.get(path(key, "/health")).json()
    assert health["messages"] == 2 and health["memory"] == f"acme/{RESOURCE}/{key}"
    small = acme.get(path(key), params={"budget": 1}).json()
    assert small["budget"] == 1 and small["window_tokens"] <= 1
    whole = acme.get(path(key), params={"budget": 10_000}).json()
    assert [m["content"] for m in whole["messages"]] == ["hello there", "general kenobi"]


def test_a_rendered_key_is_sanitized_and_the_stored_key_reaches_it(acme: httpx.Client) -> None:
    raw = f"ticket {uuid.uuid4().hex[:6]} ü"
    assert append(acme, raw, "hi").status_code == 200
    stored = acme.get(path(raw)).json()["memory"].split("/", 2)[2]
    assert stored != raw and "~" in stored
    assert contents(acme, stored, stored_key="true") == ["hi"]


def test_a_refused_event_answers_409_with_the_reason(acme: httpx.Client) -> None:
    key, workflow = fresh(), f"wf-{uuid.uuid4().hex[:8]}"
    body = {"messages": [{"role": "user", "content": "in"}], "workflow_id": workflow}
    assert acme.post(path(key, "/messages"), json=body).status_code == 200
    ended = acme.post(f"/v1/workflows/{workflow}/terminated", json={"status": "completed"})
    assert ended.status_code == 200, ended.text
    late = acme.post(path(key, "/messages"), json=body)
    assert late.status_code == 409
    assert late.json()["results"][0]["outcome"]["reason"] == "workflow_ended"


def test_a_read_only_agent_is_refused_with_403_and_nothing_is_written(
    acme: httpx.Client,
) -> None:
    key = fresh()
    body = {"messages": [{"role": "user", "content": "no"}], "agent_id": "quality-reviewer"}
    refused = acme.post(path(key, "/messages"), json=body)
    assert refused.status_code == 403 and refused.json()["error"] == "read_only"
    assert acme.get(path(key)).json()["exists"] is False


# Bad input: clear errors, nothing written.


def test_bad_requests_are_refused_with_what_is_wrong(acme: httpx.Client) -> None:
    key = fresh()
    invalid = acme.post(path(key, "/messages"), json={"messages": [{"role": "robot"}]})
    assert invalid.status_code == 422
    assert invalid.json()["detail"].startswith("body.messages.0.role")
    assert acme.post(path(key, "/messages"), json={"messages": []}).status_code == 422
    assert acme.get(f"/v1/memories/{RESOURCE.upper()}/{key}").status_code == 400
    unknown = acme.get(f"/v1/memories/no-such-resource/{key}/health")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_resource"
    too_long = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    over = acme.post(path(key, "/messages"), json=too_long)
    assert over.status_code == 422 and "MEMSTREAM_MAX_MESSAGE_BYTES" in over.json()["detail"]
    many = {"messages": [{"role": "user", "content": ""}] * 10_001}
    over = acme.post(path(key, "/messages"), json=many)
    assert over.status_code == 422 and "10001 messages, over 10000" in over.json()["detail"]
    untyped = acme.post(path(key, "/messages"), content=b'{"messages": []}')
    assert untyped.status_code == 422 and "Content-Type" in untyped.json()["detail"]
    assert acme.get(path(key)).json()["exists"] is False


def test_a_body_over_the_limit_is_413_by_length_and_when_chunked(
    gateway: Gateway, acme: httpx.Client
) -> None:
    key = fresh()
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * 9_000_000 + b'"}]}'
    by_length = acme.post(path(key, "/messages"), content=big)
    assert by_length.status_code == 413 and by_length.json()["error"] == "too_large"

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    chunked = acme.post(path(key, "/messages"), content=chunks())
    assert chunked.status_code == 413
    small = b'{"messages": [{"role": "user", "content": "fits"}]}'
    json_type = {"Content-Type": "application/json"}
    ok = acme.post(
        path(key, "/messages"), content=iter([small[:10], small[10:]]), headers=json_type
    )
    assert ok.status_code == 200, ok.text
    assert contents(acme, key) == ["fits"]


def test_a_full_backlog_answers_429_with_retry_after(
    default_redis_url: str, tmp_path: Path
) -> None:
    """No processors run here: the ingest stream fills up and stays full."""
    cli = make_cli(default_redis_url, f"t{uuid.uuid4().hex[:10]}", tmp_path)
    cli.env.update(MEMSTREAM_MAX_BACKLOG="2", MEMSTREAM_PARTITIONS="1")
    try:
        url, _ = start_gateway(cli)
        gateway = Gateway(url, cli.running[-1], cli)
        with gateway.client(gateway.key("acme")) as client:
            assert append(client, "k", "one", "two", wait="false").status_code == 202
            full = append(client, "k", "three", wait="false")
            assert full.status_code == 429
            assert full.headers["Retry-After"] == "1"
            assert full.json()["error"] == "backlog_full"
            assert "MEMSTREAM_MAX_BACKLOG" in full.json()["detail"]
    finally:
        cli.close()


def test_a_whole_read_of_a_long_memory_asks_for_pages(acme: httpx.Client) -> None:
    """System messages are protected: no flush makes this memory shorter."""
    key = fresh()
    first = {"messages": [{"role": "system", "content": f"m{i}"} for i in range(1000)]}
    assert acme.post(path(key, "/messages"), json=first).status_code == 200
    assert contents(acme, key)[-1] == "m999"  # 1000: still whole
    last = {"messages": [{"role": "system", "content": "m1000"}]}
    assert acme.post(path(key, "/messages"), json=last).status_code == 200
    whole = acme.get(path(key))
    assert whole.status_code == 400 and whole.json()["error"] == "too_many"
    assert "after=" in whole.json()["detail"]
    newest = acme.get(path(key), params={"last": 2}).json()["messages"]
    assert [m["content"] for m in newest] == ["m999", "m1000"]
    page = acme.get(path(key), params={"after": newest[0]["seq"], "limit": 5}).json()
    assert [m["content"] for m in page["messages"]] == ["m1000"]


# Metrics and shutdown.


def test_metrics_count_requests_by_route_template_never_by_memory_key(
    gateway: Gateway, acme: httpx.Client
) -> None:
    key = fresh()
    append(acme, key, "counted")
    acme.get(path(key))
    text = httpx.get(f"{gateway.url}/metrics").text
    assert key not in text
    samples = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "memstream_gateway_requests"
        for s in family.samples
        if s.name == "memstream_gateway_requests_total"
    }
    assert samples[("POST", "/v1/memories/{resource}/{key}/messages", "200")] >= 1
    assert samples[("GET", "/v1/memories/{resource}/{key}", "200")] >= 1


def test_the_gateway_stops_on_sigterm_with_exit_0(service: Cli, direct: redis.Redis) -> None:
    url, proc = start_gateway(service)
    assert httpx.get(f"{url}/healthz").status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
