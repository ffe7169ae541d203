"""A worked example: two agents share one conversation memory during a support workflow.

- The support agent (memories/support-agent.yaml) writes the conversation: its key is
  rendered from the workflow's input, so every agent of the workflow finds the same
  memory.
- The quality reviewer (memories/quality-reviewer.yaml) may only read it: its write is
  refused before anything is published.
- Readers take a context window that fits their token budget.
- The workflow engine reports the end of the workflow; the cleanup processor ends it
  in every partition, and later writes from it are refused.

Run it from the repository root: ``.venv/bin/python examples/multi_agent.py``. It runs
the processors in this process, on ``REDIS_URL`` or, when that is unset, on an embedded
Redis it starts and stops.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from events import Publisher, ReadOnlyError, WorkflowStatus  # noqa: E402
from memory import Message, ResolvedMemory, ResourceRegistry, Role, resolve_memories  # noqa: E402
from processors.app import App  # noqa: E402
from processors.settings import Settings  # noqa: E402
from processors.tokenizers import Tokenizers  # noqa: E402
from store import list_memories  # noqa: E402


async def main() -> None:
    settings = Settings(resources=str(ROOT / "memories"))
    registry = App(settings).registry()
    tenant = "acme"
    workflow: dict[str, Any] = {
        "id": f"wf-{uuid.uuid4().hex[:6]}",
        "input": {"conversationId": "c-1001", "userId": "u-42"},
    }
    async with App(settings, start_embedded=True) as app:
        tokenizers = Tokenizers()
        workers = [
            await app.appender(registry),
            await app.accountant(registry, tokenizers),
            await app.summarizer(registry, tokenizers),
            await app.cleanup(registry),
        ]
        stop = asyncio.Event()
        running = [asyncio.create_task(w.run(stop)) for w in workers]
        try:
            await conversation(app, registry, tenant, workflow, tokenizers)
        finally:
            stop.set()  # the workers stop (and release their leases) before Redis closes
            await asyncio.gather(*running)


async def conversation(
    app: App,
    registry: ResourceRegistry,
    tenant: str,
    workflow: dict[str, Any],
    tokenizers: Tokenizers,
) -> None:
    publisher = Publisher(app.client, keys=app.keys, scripts=app.scripts, registry=registry)
    reader = app.reader()

    def memories_of(agent_id: str) -> dict[str, ResolvedMemory]:
        agent = registry.agent(agent_id)
        assert agent is not None, agent_id
        resolved = resolve_memories(
            agent.references,
            {rid: registry[rid] for rid in registry},
            tenant=tenant,
            context={"workflow": workflow},
        )
        return {m.resource.id: m for m in resolved}

    support = memories_of("support-agent")["customer-support"]
    reviewer = memories_of("quality-reviewer")["customer-support"]
    print(f"support agent writes {support.ref}; reviewer reads {reviewer.ref}")

    turns = [
        (Role.USER, "My order 7731 has not arrived and I need it by Friday."),
        (Role.ASSISTANT, "I am sorry. Order 7731 left the warehouse on Monday."),
        (Role.USER, "Can you send it express instead?"),
        (Role.ASSISTANT, "Done: I upgraded order 7731 to express, arriving Thursday."),
    ]
    for role, text in turns:
        published = await publisher.append_to(
            support,
            Message(role=role, content=text),
            workflow_id=workflow["id"],
            agent_id="support-agent",
            wait=True,
        )
        assert published.outcome is not None and published.outcome.ok, published.outcome
    print(f"the support agent wrote {len(turns)} messages")

    try:
        await publisher.append_to(
            reviewer,
            Message(role=Role.ASSISTANT, content="score: 9/10"),
            agent_id="quality-reviewer",
        )
    except ReadOnlyError as e:
        print(f"the reviewer may not write: {e}")

    resource = registry["customer-support"]
    window = await reader.read_context(
        reviewer.ref,
        resource,
        tokenizers.for_resource(resource),
        budget=60,
    )
    print(f"the reviewer's context within 60 tokens ({window.tokens} tokens):")
    for m in window.messages:
        print(f"  [{m.seq}] {m.role.value}: {m.content}")

    ended = await publisher.workflow_terminated(
        tenant, workflow["id"], WorkflowStatus.COMPLETED, wait=True
    )
    assert ended.outcome is not None and ended.outcome.ok
    print(f"workflow {workflow['id']} ended: {ended.outcome.detail}")
    late = await publisher.append_to(
        support,
        Message(role=Role.USER, content="one more thing"),
        workflow_id=workflow["id"],
        agent_id="support-agent",
        wait=True,
    )
    assert late.outcome is not None
    print(
        f"a late write from the ended workflow: {late.outcome.status.value} ({late.outcome.reason})"
    )
    kept = [m.memory_id async for m in list_memories(app.client, app.keys, tenant)]
    print(f"memories of {tenant} now: {', '.join(sorted(kept))}")


if __name__ == "__main__":
    os.environ.setdefault("MEMSTREAM_LOG_LEVEL", "WARNING")
    asyncio.run(main())
