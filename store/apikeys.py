"""API keys of the HTTP gateway: each belongs to one tenant. Redis keeps only a key's
SHA-256 digest, never the key itself, in one hash (``ms:apikeys``: key id -> JSON).

A key reads ``msk_<id>_<secret>``: the id finds the record in one HGET, and the digest
of the whole key is compared in constant time. A revoked key stops working on the next
request (nothing is cached)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from memory.ref import check_tenant
from store.connection import RedisClient
from store.keys import Keys

PREFIX = "msk_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What is stored of a key: never the key itself."""

    key_id: str
    tenant: str
    name: str
    created_ms: int

    def as_json(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "name": self.name,
            "created_ms": self.created_ms,
        }


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def key_id_of(secret: str) -> str | None:
    """The id part of a key that has the right shape, else None."""
    if not secret.startswith(PREFIX):
        return None
    key_id, sep, rest = secret[len(PREFIX) :].partition("_")
    if not sep or not rest or len(key_id) != 12 or not key_id.isalnum():
        return None
    return key_id


class ApiKeys:
    """Creates, finds, lists and revokes the gateway's API keys."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self._client = client
        self._hash = f"{keys.namespace}:apikeys"

    async def create(self, tenant: str, name: str = "") -> tuple[str, ApiKey]:
        """A new key for ``tenant``: (the key, to hand over once; its record)."""
        check_tenant(tenant)
        key_id = secrets.token_hex(6)
        secret = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id, tenant, name, int(time.time() * 1000))
        stored = {**record.as_json(), "digest": _digest(secret)}
        if not await self._client.hsetnx(self._hash, key_id, json.dumps(stored)):
            raise RuntimeError("API key id collision; create the key again")
        return secret, record

    async def authenticate(self, secret: str) -> ApiKey | None:
        """The record of a valid, unrevoked key, else None."""
        key_id = key_id_of(secret)
        if key_id is None:
            return None
        text = await self._client.hget(self._hash, key_id)
        if text is None:
            return None
        stored = json.loads(text)
        if not hmac.compare_digest(str(stored["digest"]), _digest(secret)):
            return None
        return _record(stored)

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        records = [_record(json.loads(t)) for t in (await self._client.hvals(self._hash))]
        found = [r for r in records if tenant is None or r.tenant == tenant]
        return sorted(found, key=lambda r: (r.tenant, r.created_ms, r.key_id))

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key by its id; False when there is no such key."""
        return bool(await self._client.hdel(self._hash, key_id))


def _record(stored: dict[str, object]) -> ApiKey:
    return ApiKey(
        key_id=str(stored["key_id"]),
        tenant=str(stored["tenant"]),
        name=str(stored.get("name") or ""),
        created_ms=int(str(stored["created_ms"])),
    )
