"""The JSON Schema of the event contract, generated from the models.

``events/schema.json`` is the committed copy (a test keeps it equal to the models);
``memstream schema events`` prints it.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from events.envelope import EVENT_ADAPTER, SCHEMA_VERSION


def event_schema() -> dict[str, Any]:
    schema = EVENT_ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"memstream event, schema version {SCHEMA_VERSION}"
    schema["description"] = (
        "One stream entry field, 'event', holds this JSON. Memory events go to "
        "ingest:{p} of their memory's partition, lifecycle events (workflow.started, "
        "workflow.terminated) to lifecycle:{0}; workflow.ended is the cleanup "
        "processor's command into each ingest:{p}."
    )
    return schema


def event_schema_text() -> str:
    return json.dumps(event_schema(), indent=2, sort_keys=True) + "\n"


def committed_schema_text() -> str:
    return (resources.files("events") / "schema.json").read_text(encoding="utf-8")
