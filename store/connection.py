"""Redis clients from a URL: standalone, Cluster, TLS and ACL users.

- ``redis://[user:password@]host:port/db`` and ``unix:///path/to.sock``: one server;
- ``rediss://...``: TLS (certificates through the URL's query, e.g. ``ssl_ca_certs=``);
- ``redis+cluster://host:port`` / ``rediss+cluster://``: a Redis Cluster, found from
  any of its nodes (``cluster=True`` does the same for a plain URL).

ACL users go in the URL's user part; every memstream command then runs as that user.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from store.errors import ConnectionSetupError

RedisClient: TypeAlias = Redis | RedisCluster

#: Failures of Redis or of the way to it: never the fault of an entry, always retried
#: (with backoff) and never counted as an attempt (DESIGN rule 5).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in _CLUSTER_SCHEMES


def connect(
    url: str,
    *,
    cluster: bool | None = None,
    socket_timeout: float = 15.0,
    connect_timeout: float = 3.0,
    max_connections: int | None = None,
) -> RedisClient:
    """A client for ``url``; responses are decoded as UTF-8 strings.

    ``socket_timeout`` bounds every command (blocking reads use shorter blocks than it).
    The client never re-sends a command by itself: a script that ran but whose reply was
    lost must not run twice behind the caller's back (MOVED and ASK redirections are
    still followed). Callers retry with backoff, and the scripts are idempotent.
    Bytes that are not UTF-8 (a producer in another language can write any) decode as
    lone surrogates instead of failing the read, so they can be dead-lettered.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConnectionSetupError(
            f"invalid Redis URL {url!r}: expected redis://host:port, rediss://..., "
            f"unix:///path or redis+cluster://host:port"
        )
    use_cluster = cluster if cluster is not None else scheme in _CLUSTER_SCHEMES
    plain_url = f"{_CLUSTER_SCHEMES.get(scheme, scheme)}://{rest}"
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": 30,
    }
    try:
        if use_cluster:
            if plain_url.startswith("unix://"):
                raise ConnectionSetupError("a Redis Cluster cannot be reached over a unix socket")
            if max_connections is not None:
                options["max_connections"] = max_connections
            return RedisCluster.from_url(plain_url, **options)
        if max_connections is not None:
            options["max_connections"] = max_connections
        return Redis.from_url(plain_url, **options)
    except ValueError as e:
        raise ConnectionSetupError(f"invalid Redis URL {url!r}: {e}") from e


def describe(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    auth, host = rest.rsplit("@", 1)
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in auth else user}@{host}"
