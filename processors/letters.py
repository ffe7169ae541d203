"""What a dead letter keeps of an entry: its event text and the error that may quote
it, redacted by the privacy policy of the event's resource, or, when no loaded resource
can be read from it (text that is not an event, an unknown resource, a lifecycle event),
by the patterns of every loaded resource. Nothing here raises: the letter of an entry
nobody can read is still written."""

from __future__ import annotations

import json

from events.codec import printable
from memory import PrivacyPolicy, ResourceRegistry
from store import StreamEntry


def resource_of(raw: str) -> str | None:
    """The resource id an event's JSON names, if it can be read at all (never raises)."""
    try:
        data = json.loads(raw)
    except Exception:  # not JSON, nested too deeply: no resource to read
        return None
    payload = data.get("payload") if isinstance(data, dict) else None
    if not isinstance(payload, dict):
        return None
    memory = payload.get("memory")
    if isinstance(memory, dict) and isinstance(memory.get("resource"), str):
        return str(memory["resource"])
    memory_id = payload.get("memory_id")
    if isinstance(memory_id, str) and memory_id.count("/") >= 2:
        return memory_id.split("/")[1]
    return None


def policy_for(registry: ResourceRegistry, raw: str) -> PrivacyPolicy:
    """The policy a letter of this event text is redacted by."""
    resource_id = resource_of(raw)
    resource = registry.find(resource_id) if resource_id else None
    return resource.privacy_policy if resource is not None else registry.privacy_policy


def letter_of(registry: ResourceRegistry, entry: StreamEntry, detail: str) -> tuple[str, str]:
    """The event text and the detail a dead letter of ``entry`` keeps."""
    raw = printable((entry.fields or {}).get("event", ""))
    policy = policy_for(registry, raw)
    return policy.redact_event(raw, registry.workflow_name), policy.redact_text(detail)
