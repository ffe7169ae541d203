"""The gateway's REST routes (``/v1``). The tenant of every route is its API key's."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, Field

from events import Publisher
from events.envelope import (
    AppendPayload,
    MemoryName,
    MessageAppended,
    WorkflowStatus,
)
from events.publisher import Published, Receipt
from memory import FlushStrategy, MemoryRef, Message, StoredMessage
from processors.health import health_of
from processors.opscli import memory_stats
from processors.tokenizers import Tokenizers
from store import TRANSIENT_ERRORS, Outcome, WaitTimeoutError, list_memories
from store.apikeys import ApiKey, ApiKeys

log = logging.getLogger(__name__)
MAX_WAIT = 60.0
#: Most messages of one request, checked before any is validated (the configured
#: MEMSTREAM_MAX_MESSAGES applies too, and is usually lower).
MAX_BATCH = 10_000
#: Most messages a whole read (no paging) returns; a context window or health reads
#: at most MAX_CONTEXT.
MAX_WHOLE = 1000
MAX_CONTEXT = 10_000
_bearer = HTTPBearer(auto_error=False, description="an API key: Bearer msk_...")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key: msk_...")


class GatewayError(Exception):
    """An error answered with ``status`` and a JSON body ``{"error", "detail"}``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


async def tenant_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> ApiKey:
    """The API key of the request (its tenant), or 401. The gateway's middleware has
    checked it before the body was read; this dependency documents it in OpenAPI."""
    checked = getattr(request.state, "api_key", None)
    if isinstance(checked, ApiKey):
        return checked
    secret = bearer.credentials if bearer is not None else header
    if not secret:
        raise GatewayError(401, "unauthorized", "send an API key: Authorization: Bearer msk_...")
    app = request.app.state.app
    found = await ApiKeys(app.client, app.keys).authenticate(secret)
    if found is None:
        raise GatewayError(401, "unauthorized", "this API key is unknown or revoked")
    return found


Tenant = Annotated[ApiKey, Depends(tenant_key)]
StoredKey = Annotated[
    bool, Query(description="KEY is the stored (sanitized) key, not the rendered one")
]
Wait = Annotated[
    bool, Query(description="wait for the outcome (applied, or refused and why) before answering")
]
Timeout = Annotated[float, Query(gt=0, le=MAX_WAIT, description="longest wait, in seconds")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="a repeat with the same key is applied once (each message of a batch "
        "gets a key derived from it that no header can spell)",
    ),
]

router = APIRouter(prefix="/v1", tags=["memories"])


class Writer(BaseModel):
    workflow_id: str | None = Field(default=None, max_length=200)
    agent_id: str | None = Field(default=None, max_length=200)


def _few(value: object) -> object:
    if isinstance(value, list) and len(value) > MAX_BATCH:
        raise ValueError(f"{len(value)} messages, over {MAX_BATCH} per request; send fewer")
    return value


class MessagesIn(Writer):
    messages: Annotated[list[Message], BeforeValidator(_few)] = Field(min_length=1)


class ReplaceIn(Writer):
    messages: Annotated[list[Message], BeforeValidator(_few)]


class ClearIn(Writer):
    backup: bool = False


class EraseIn(Writer):
    seq: int = Field(ge=1)


class FlushIn(Writer):
    strategy: FlushStrategy | None = None
    dry_run: bool = False


class TerminatedIn(BaseModel):
    status: WorkflowStatus = WorkflowStatus.COMPLETED


class ReceiptOut(BaseModel):
    partition: int
    entry_id: str
    event_id: str
    idempotency_key: str
    token: str = Field(description="read-your-writes token: <partition>/<entry id>")


class OutcomeOut(BaseModel):
    status: str
    reason: str | None = None
    detail: str | None = None
    seq: int | None = None
    gen: int | None = None
    dead_letter: str | None = None
    backup: str | None = None


class ResultOut(BaseModel):
    receipt: ReceiptOut | None = Field(description="None: the privacy policy kept it out")
    outcome: OutcomeOut | None = Field(description="None: not waited for, or not known yet")


class PublishedOut(BaseModel):
    """200: every event applied; 202: published, some outcomes not known (not waited
    for, or not within the timeout); 409: some refused (see their outcomes)."""

    results: list[ResultOut]
    applied: int
    refused: int
    pending: int


class MemoryOut(BaseModel):
    memory: str
    partition: int
    exists: bool
    generation: int
    count: int
    tokens: int
    messages: list[StoredMessage]
    next_after: int | None = Field(description="pass as after= for the next page")
    budget: int | None = None
    window_tokens: int | None = None
    over_budget: bool | None = None


def ref_of(key: ApiKey, resource: str, memory_key: str, stored: bool) -> MemoryRef:
    if stored:
        return MemoryRef(key.tenant, resource, memory_key)
    return MemoryRef.from_raw(key.tenant, resource, memory_key)


def _receipt(r: Receipt) -> ReceiptOut:
    return ReceiptOut(
        partition=r.partition,
        entry_id=r.entry_id,
        event_id=r.event_id,
        idempotency_key=r.idempotency_key,
        token=r.token,
    )


def _outcome(o: Outcome) -> OutcomeOut:
    return OutcomeOut(
        status=o.status.value,
        reason=o.reason,
        detail=o.detail,
        seq=o.seq,
        gen=o.gen,
        dead_letter=o.dead_letter,
        backup=o.backup,
    )


async def _outcomes(
    publisher: Publisher, published: list[Published], timeout: float
) -> list[Outcome | None]:
    """Each published event's outcome: all of them, or on timeout the ones known."""
    receipts = [(i, p.receipt) for i, p in enumerate(published) if p.receipt is not None]
    found: list[Outcome | None] = [p.outcome for p in published]
    if not receipts:
        return found
    waited: Sequence[Outcome | None]
    try:
        waited = await publisher.reader.wait_applied_many(
            [(r.partition, r.entry_id, r.event_id) for _, r in receipts], timeout
        )
    except WaitTimeoutError:
        waited = [await publisher.reader.outcome(r.partition, r.entry_id) for _, r in receipts]
    except TRANSIENT_ERRORS as e:  # published; only the wait failed: outcomes unknown
        log.warning("waiting for outcomes: Redis is unreachable: %s", e)
        waited = [None] * len(receipts)
    for (i, _), outcome in zip(receipts, waited, strict=True):
        found[i] = outcome
    return found


async def respond(
    publisher: Publisher, published: list[Published], wait: bool, timeout: float
) -> JSONResponse:
    """The receipts, and (with ``wait``) the outcomes, of published events."""
    outcomes = (
        await _outcomes(publisher, published, timeout) if wait else [p.outcome for p in published]
    )
    results = [
        ResultOut(
            receipt=_receipt(p.receipt) if p.receipt else None,
            outcome=_outcome(o) if o else None,
        )
        for p, o in zip(published, outcomes, strict=True)
    ]
    refused = sum(1 for o in outcomes if o is not None and not o.ok)
    pending = sum(1 for o in outcomes if o is None)
    body = PublishedOut(
        results=results, applied=len(outcomes) - refused - pending, refused=refused, pending=pending
    )
    status = 409 if refused else 202 if pending else 200
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def _publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


Memory = "/memories/{resource}/{key}"


@dataclass(frozen=True, slots=True)
class Change:
    """What every change of one memory takes from its request: the memory (the tenant
    is the key's), the idempotency key, and whether and how long to wait."""

    request: Request
    ref: MemoryRef
    idempotency_key: str | None
    wait: bool
    timeout: float

    @property
    def publisher(self) -> Publisher:
        return _publisher(self.request)

    async def respond(self, published: list[Published]) -> JSONResponse:
        return await respond(self.publisher, published, self.wait, self.timeout)


async def change(
    request: Request,
    tenant: Tenant,
    resource: str,
    key: str,
    idempotency_key: IdempotencyKey = None,
    stored_key: StoredKey = False,
    wait: Wait = True,
    timeout: Timeout = 10.0,
) -> Change:
    return Change(
        request, ref_of(tenant, resource, key, stored_key), idempotency_key, wait, timeout
    )


Changing = Annotated[Change, Depends(change)]


def batch_key(key: str, i: int) -> str:
    """The idempotency key of message ``i`` of a batch sent with ``key``: the key's
    digest and the index, joined by a line break, which no HTTP header value holds, so
    no single request's key is ever one of them (and it stays within 200 characters)."""
    return f"{hashlib.sha256(key.encode('utf-8')).hexdigest()}\n{i}"


@router.post(Memory + "/messages", response_model=PublishedOut, summary="Append messages")
async def append(target: Changing, body: MessagesIn) -> JSONResponse:
    """Append messages in order, in one round trip (one event each)."""
    ref, key = target.ref, target.idempotency_key
    name = MemoryName(resource=ref.resource, key=ref.key)
    n = len(body.messages)
    events = [
        MessageAppended(
            tenant=ref.tenant,
            idempotency_key=None if key is None else key if n == 1 else batch_key(key, i),
            payload=AppendPayload(
                memory=name, workflow_id=body.workflow_id, agent_id=body.agent_id, message=m
            ),
        )
        for i, m in enumerate(body.messages)
    ]
    return await target.respond(await target.publisher.publish_many(events))


@router.put(Memory, response_model=PublishedOut, summary="Replace the whole memory")
async def replace(target: Changing, body: ReplaceIn) -> JSONResponse:
    """Replace every message atomically (a new generation)."""
    published = await target.publisher.replace(
        target.ref,
        body.messages,
        agent_id=body.agent_id,
        workflow_id=body.workflow_id,
        idempotency_key=target.idempotency_key,
    )
    return await target.respond([published])


@router.delete(Memory, response_model=PublishedOut, summary="Delete the memory")
async def delete(target: Changing) -> JSONResponse:
    """Delete the memory (a tombstone keeps late events from bringing it back)."""
    published = await target.publisher.delete(target.ref, idempotency_key=target.idempotency_key)
    return await target.respond([published])


@router.post(Memory + "/clear", response_model=PublishedOut, summary="Remove every message")
async def clear(target: Changing, body: ClearIn) -> JSONResponse:
    """Remove every message (a new generation); with ``backup``, keep them as a backup
    first (its id is in the outcome)."""
    published = await target.publisher.clear(
        target.ref,
        agent_id=body.agent_id,
        workflow_id=body.workflow_id,
        backup=body.backup,
        idempotency_key=target.idempotency_key,
    )
    return await target.respond([published])


@router.post(Memory + "/erase", response_model=PublishedOut, summary="Erase one message")
async def erase(target: Changing, body: EraseIn) -> JSONResponse:
    """Erase the message ``seq`` for good, and any summary that covers it."""
    published = await target.publisher.erase(
        target.ref,
        body.seq,
        agent_id=body.agent_id,
        workflow_id=body.workflow_id,
        idempotency_key=target.idempotency_key,
    )
    return await target.respond([published])


@router.post(Memory + "/flush", response_model=PublishedOut, summary="Request a flush")
async def flush(target: Changing, body: FlushIn) -> JSONResponse:
    """Ask the summarizer to flush the memory (by its resource's strategy, or
    ``strategy``); the outcome says the request was applied, the summarizer runs it."""
    published = await target.publisher.request_flush(
        target.ref,
        strategy=body.strategy,
        dry_run=body.dry_run,
        agent_id=body.agent_id,
        workflow_id=body.workflow_id,
        idempotency_key=target.idempotency_key,
    )
    return await target.respond([published])


@router.get(Memory, response_model=MemoryOut, summary="Read the memory")
async def read(
    request: Request,
    tenant: Tenant,
    resource: str,
    key: str,
    stored_key: StoredKey = False,
    last: Annotated[int | None, Query(ge=1, le=10_000, description="the newest N")] = None,
    after: Annotated[int | None, Query(ge=0, description="messages after this seq")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size with after")] = 100,
    generation: Annotated[
        int | None, Query(ge=0, description="409 if the memory is of another generation")
    ] = None,
    budget: Annotated[
        int | None, Query(ge=1, description="what fits a context of this many tokens")
    ] = None,
) -> MemoryOut:
    """The memory, oldest message first: whole, the newest ``last``, a page ``after``
    a sequence number, or what fits a token ``budget`` (protected messages first, then
    the newest)."""
    if sum(x is not None for x in (last, after, budget)) > 1:
        raise GatewayError(400, "invalid", "pass one of last, after and budget")
    ref = ref_of(tenant, resource, key, stored_key)
    publisher = _publisher(request)
    extra: dict[str, Any] = {}
    if last is None and after is None:
        await _not_too_many(publisher, ref, MAX_CONTEXT if budget is not None else MAX_WHOLE)
    if budget is not None:
        found = request.app.state.registry.get_resource(ref.resource)
        window = await publisher.reader.read_context(
            ref, found, Tokenizers().for_resource(found), budget=budget
        )
        view, messages = window.view, window.messages
        extra = {
            "budget": budget,
            "window_tokens": window.tokens,
            "over_budget": window.over_budget,
        }
    else:
        view = await publisher.reader.read(
            ref, last=last, after=after, limit=limit, generation=generation
        )
        messages = view.messages
    return MemoryOut(
        memory=ref.memory_id,
        partition=view.partition,
        exists=view.exists,
        generation=view.generation,
        count=view.count,
        tokens=view.tokens,
        messages=messages,
        next_after=view.next_after if budget is None else None,
        **extra,
    )


async def _not_too_many(publisher: Publisher, ref: MemoryRef, most: int) -> None:
    """400 when the memory holds more messages than one read returns."""
    head = await publisher.reader.read(ref, last=1)
    if head.count > most:
        raise GatewayError(
            400,
            "too_many",
            f"{ref.memory_id} holds {head.count} messages, more than {most} in one read: "
            f"read it in pages with after= and limit=, or the newest with last=",
        )


@router.get(Memory + "/health", summary="Budget use, priorities, roles and flushes")
async def health(
    request: Request, tenant: Tenant, resource: str, key: str, stored_key: StoredKey = False
) -> dict[str, Any]:
    ref = ref_of(tenant, resource, key, stored_key)
    found = request.app.state.registry.get_resource(ref.resource)
    await _not_too_many(_publisher(request), ref, MAX_CONTEXT)
    view = await _publisher(request).reader.read(ref)
    return health_of(view, found, Tokenizers().for_resource(found)).as_json()


@router.get(Memory + "/stats", summary="Counts, tokens and roles, read page by page")
async def stats(
    request: Request, tenant: Tenant, resource: str, key: str, stored_key: StoredKey = False
) -> dict[str, Any]:
    ref = ref_of(tenant, resource, key, stored_key)
    found = request.app.state.registry.get_resource(ref.resource)
    data = await memory_stats(_publisher(request).reader, ref, Tokenizers().for_resource(found))
    limit = found.token_limit
    data["budget_use"] = round(data["tokens"] / limit, 4) if limit else None
    return data


@router.get("/memories", summary="The tenant's live memories")
async def memories(
    request: Request,
    tenant: Tenant,
    resource: Annotated[str | None, Query(description="only this resource's")] = None,
    workflow: Annotated[str | None, Query(description="only those a live workflow wrote")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    if resource is not None and workflow is not None:
        raise GatewayError(400, "invalid", "list by resource or by workflow, not both")
    app = request.app.state.app
    if workflow is not None:  # named as the appender names it (a pseudonym, maybe)
        workflow = request.app.state.registry.workflow_name(workflow)
    listed: list[dict[str, Any]] = []
    more = False
    async for m in list_memories(
        app.client, app.keys, tenant.tenant, resource=resource, workflow=workflow
    ):
        if len(listed) == limit:
            more = True
            break
        listed.append(
            {"memory": m.memory_id, "partition": m.partition, "expires_at_ms": m.expires_at_ms}
        )
    return {"memories": listed, "more": more}


@router.post(
    "/workflows/{workflow_id}/started",
    response_model=PublishedOut,
    tags=["workflows"],
    summary="A workflow started",
)
async def started(
    request: Request,
    tenant: Tenant,
    workflow_id: Annotated[str, Path(max_length=200)],
    idempotency_key: IdempotencyKey = None,
    wait: Wait = True,
    timeout: Timeout = 10.0,
) -> JSONResponse:
    publisher = _publisher(request)
    published = await publisher.workflow_started(
        tenant.tenant, workflow_id, idempotency_key=idempotency_key, wait=wait, timeout=timeout
    )
    return await respond(publisher, [published], False, timeout)


@router.post(
    "/workflows/{workflow_id}/terminated",
    response_model=PublishedOut,
    tags=["workflows"],
    summary="A workflow terminated: its memories run their cleanup policy",
)
async def terminated(
    request: Request,
    tenant: Tenant,
    workflow_id: Annotated[str, Path(max_length=200)],
    body: TerminatedIn,
    idempotency_key: IdempotencyKey = None,
    wait: Wait = True,
    timeout: Timeout = 10.0,
) -> JSONResponse:
    """With ``wait``, answers once every partition applied the end (or it was refused)."""
    publisher = _publisher(request)
    published = await publisher.workflow_terminated(
        tenant.tenant,
        workflow_id,
        body.status,
        idempotency_key=idempotency_key,
        wait=wait,
        timeout=timeout,
    )
    return await respond(publisher, [published], False, timeout)
