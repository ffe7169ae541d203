"""The HTTP gateway: memstream over REST for agents in any language.

Every request but ``/healthz``, ``/metrics`` and the OpenAPI document carries an API key
(``Authorization: Bearer msk_...`` or ``X-API-Key``), and the key alone decides the
tenant: no path or body names one, so a tenant can never reach another's memories.
Bodies are limited in size before they are read whole (413), and every change travels
as an event through its memory's partition, like the SDK's."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from events.errors import (
    BacklogFullError,
    NotDurableError,
    PartiallyPublishedError,
    PartitionsChangingError,
    PublishError,
    PublishOutcomeUnknownError,
    ReadOnlyError,
    RedisUnavailableError,
)
from memory import DomainError, UnknownResourceError
from processors.app import App
from processors.gatewayroutes import GatewayError, router
from processors.settings import Settings
from store import (
    TRANSIENT_ERRORS,
    GenerationChangedError,
    OutcomeMismatchError,
    RepartitionInProgressError,
    WaitTimeoutError,
)
from store.apikeys import ApiKeys

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)
UNREACHABLE = "Redis is unreachable; try again shortly"


class Authenticate:
    """Checks the API key of every ``/v1`` request before anything reads its body, so a
    request without a valid key costs one HGET and nothing more; the key's record goes
    to ``request.state.api_key``."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        bearer = headers.get("authorization", "")
        secret = bearer[7:].strip() if bearer[:7].lower() == "bearer " else ""
        secret = secret or headers.get("x-api-key", "").strip()
        app = self.api.state.app
        refusal = "send an API key: Authorization: Bearer msk_..."
        if secret:
            try:
                found = await ApiKeys(app.client, app.keys).authenticate(secret)
            except TRANSIENT_ERRORS as e:
                log.warning("API key check failed, Redis is unreachable: %s", e)
                await _send(send, _error(503, "unavailable", UNREACHABLE))
                return
            if found is not None:
                scope.setdefault("state", {})["api_key"] = found
                await self.app(scope, receive, send)
                return
            refusal = "this API key is unknown or revoked"
        app.metrics.gateway_requests.labels(scope["method"], "/v1/*", "401").inc()
        reply = _error(401, "unauthorized", refusal)
        reply.headers["WWW-Authenticate"] = "Bearer"
        await _send(send, reply)


async def _send(send: Send, response: Response) -> None:
    await response({"type": "http"}, _no_receive, send)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413: at once by its
    Content-Length, else (chunked) as soon as the bytes read pass the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:  # chunked: read it all (up to the limit), then hand it over
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message), send)
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)

    async def _refuse(self, send: Send) -> None:
        body = JSONResponse(
            {
                "error": "too_large",
                "detail": f"the request body is over the {self.limit}-byte limit "
                f"(MEMSTREAM_GATEWAY_MAX_BODY_BYTES); send fewer or smaller messages",
            },
            status_code=413,
        )
        await _send(send, body)


def _replay(
    messages: list[Message], last: Message | None, receive: Receive | None = None
) -> Receive:
    """A receive that gives ``messages`` first, then ``last`` (or what ``receive``
    gives: the disconnect the application may wait for)."""
    queue = list(messages)

    async def replayed() -> Message:
        if queue:
            return queue.pop(0)
        if last is not None:
            return last
        assert receive is not None
        return await receive()

    return replayed


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _route(request: Request) -> str:
    """The request's route template (``/v1/workflows/{workflow_id}/...``): its path may
    name a workflow or a memory, which logs never do."""
    return str(getattr(request.scope.get("route"), "path", "unmatched"))


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _errors(api: FastAPI) -> None:
    """Map every expected error to a status and a JSON body that says what to do."""

    table: list[tuple[type[Exception], int, str]] = [
        (UnknownResourceError, 404, "unknown_resource"),
        (DomainError, 400, "invalid"),
        (GenerationChangedError, 409, "generation_changed"),
        (WaitTimeoutError, 504, "timeout"),
        (OutcomeMismatchError, 503, "lost"),
        (ReadOnlyError, 403, "read_only"),
        (NotDurableError, 503, "not_durable"),
        (PartitionsChangingError, 503, "repartitioning"),
        (RepartitionInProgressError, 503, "repartitioning"),
        (RedisUnavailableError, 503, "unavailable"),
        (PublishOutcomeUnknownError, 503, "outcome_unknown"),
        (PartiallyPublishedError, 503, "partially_published"),
        (PublishError, 422, "refused"),
    ]

    @api.exception_handler(GatewayError)
    async def gateway_error(request: Request, e: GatewayError) -> JSONResponse:
        return _error(e.status, e.error, e.detail)

    @api.exception_handler(BacklogFullError)
    async def backlog(request: Request, e: BacklogFullError) -> JSONResponse:
        reply = _error(429, "backlog_full", str(e))
        reply.headers["Retry-After"] = "1"
        return reply

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # Only where and what: never the input back (it may be megabytes, or bytes).
        errors = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
            for err in e.errors()
        ] or [{"loc": [], "msg": "invalid request"}]
        first = errors[0]
        hint = ""
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            hint = " (send the body as JSON with Content-Type: application/json)"
        return JSONResponse(
            {
                "error": "invalid",
                "detail": f"{'.'.join(first['loc'])}: {first['msg']}{hint}",
                "errors": errors,
            },
            status_code=422,
        )

    for kind, status, error in table:

        async def handler(
            request: Request, e: Exception, status: int = status, error: str = error
        ) -> JSONResponse:
            reply = _error(status, error, str(e))
            if status == 503:
                reply.headers["Retry-After"] = "1"
            return reply

        api.add_exception_handler(kind, handler)

    async def unreachable(request: Request, e: Exception) -> JSONResponse:
        log.warning("%s %s: Redis is unreachable: %s", request.method, _route(request), e)
        return _error(503, "unavailable", UNREACHABLE)

    async def http_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        reply = _error(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail))
        for name, value in (e.headers or {}).items():
            reply.headers[name] = value
        return reply

    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, _route(request))
        return _error(500, "internal", "the gateway failed on this request; see its log")

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(Exception, internal)

    for transient in TRANSIENT_ERRORS:
        api.add_exception_handler(transient, unreachable)


def create_gateway(settings: Settings, *, start_embedded: bool = True) -> ASGIApp:
    """The gateway as an ASGI application; it opens its Redis connection on startup."""

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        async with App(settings, start_embedded=start_embedded) as app:
            api.state.app = app
            api.state.registry = app.registry()
            api.state.publisher = app.publisher(api.state.registry)
            yield
            await api.state.publisher.reader.touches_done()

    api = FastAPI(
        title="memstream gateway",
        version="1",
        summary="Shared, token-budgeted conversation memory for LLM agents, over HTTP.",
        lifespan=lifespan,
    )
    _errors(api)

    @api.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        template = _route(request)
        metrics = request.app.state.app.metrics
        metrics.gateway_requests.labels(request.method, template, str(response.status_code)).inc()
        metrics.gateway_seconds.labels(request.method, template).observe(
            time.perf_counter() - started
        )
        return response

    @api.get("/healthz", tags=["service"], summary="Liveness: the gateway reaches Redis")
    async def healthz(request: Request) -> JSONResponse:
        try:
            await request.app.state.app.client.ping()
        except TRANSIENT_ERRORS as e:
            log.warning("health check: Redis is unreachable: %s", e)
            return _error(503, "unavailable", UNREACHABLE)
        return JSONResponse({"status": "ok"})

    @api.get("/metrics", tags=["service"], summary="Prometheus metrics of the gateway")
    async def metrics(request: Request) -> Response:
        registry = request.app.state.app.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api.include_router(router)
    return Authenticate(BodyLimit(api, settings.gateway_max_body_bytes), api)
