"""JSON Schema of every event, and an OpenAPI 3.1 document with a ``webhooks`` section.

Generated from the pydantic models the receiver validates with, so the schema and the
receiver agree. Two corrections make the schema describe what the receiver *accepts* on the
wire rather than what a handler sees: ``event`` is required (the receiver chooses the model
by it), and ``run_id`` may be a string or an integer (handlers always get a string).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .events import RunCompleted, RunFailed, UnknownEvent
from .signature import SIGNATURE_HEADER

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "OTHER_EVENTS",
    "event_models",
    "event_schemas",
    "openapi_document",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: The key :func:`event_schemas` uses for any event name this version does not know.
OTHER_EVENTS = "*"


def event_models(output: type[Any] | None = None) -> dict[str, type[BaseModel]]:
    """The model for each event name; ``output`` types ``data.output`` of ``run.completed``."""
    completed: type[BaseModel] = RunCompleted if output is None else RunCompleted[output]  # type: ignore[valid-type]
    return {"run.completed": completed, "run.failed": RunFailed, OTHER_EVENTS: UnknownEvent}


def event_schemas(output: type[Any] | None = None) -> dict[str, dict[str, Any]]:
    """A self-contained JSON Schema (draft 2020-12) per event name; ``"*"`` is any other."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, model in event_models(output).items():
        schema = model.model_json_schema(mode="validation")
        _wire_rules(schema)
        for definition in schema.get("$defs", {}).values():
            _wire_rules(definition)
        schemas[name] = {"$schema": JSON_SCHEMA_DIALECT, **schema}
    return schemas


def openapi_document(
    output: type[Any] | None = None,
    *,
    title: str = "FlyMy.AI webhooks",
    version: str = "1",
) -> dict[str, Any]:
    """An OpenAPI 3.1 document describing the deliveries under ``webhooks``."""
    models = event_models(output)
    refs, top = models_json_schema(
        [(model, "validation") for model in models.values()],
        ref_template="#/components/schemas/{model}",
    )
    components: dict[str, Any] = copy.deepcopy(top.get("$defs", {}))
    for schema in components.values():
        _wire_rules(schema)
    webhooks: dict[str, Any] = {}
    for name, model in models.items():
        ref = refs[(model, "validation")]
        key = "other" if name == OTHER_EVENTS else name
        summary = (
            "Any event name this version does not know (acknowledged with 200)"
            if name == OTHER_EVENTS
            else f"The {name} event"
        )
        webhooks[key] = {"post": _operation(name, summary, ref)}
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": JSON_SCHEMA_DIALECT,
        "info": {
            "title": title,
            "version": version,
            "description": (
                f"Deliveries are signed: {SIGNATURE_HEADER} is the lowercase hex "
                "HMAC-SHA256 of the raw body under the webhook secret."
            ),
        },
        "webhooks": webhooks,
        "components": {"schemas": components},
    }


def _operation(name: str, summary: str, ref: dict[str, Any]) -> dict[str, Any]:
    def answer(description: str, example: dict[str, Any]) -> dict[str, Any]:
        return {
            "description": description,
            "content": {"application/json": {"schema": {"type": "object"}, "example": example}},
        }

    return {
        "operationId": "other_event" if name == OTHER_EVENTS else name.replace(".", "_"),
        "summary": summary,
        "parameters": [
            {
                "name": SIGNATURE_HEADER,
                "in": "header",
                "required": True,
                "description": "Lowercase hex HMAC-SHA256 of the raw body.",
                "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            }
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
        "responses": {
            "200": answer("Received (or a duplicate of a handled event)", {"received": True}),
            "400": answer("Malformed event, or outside the replay window", {"error": "..."}),
            "401": answer("Invalid signature", {"error": "Invalid signature"}),
            "409": answer("The same event is being handled; retry later", {"error": "..."}),
            "413": answer("Payload too large", {"error": "Payload too large"}),
            "500": answer("A handler failed; retry later", {"error": "Handler failed"}),
            "503": answer("The idempotency store is unavailable; retry later", {"error": "..."}),
        },
    }


def _wire_rules(schema: dict[str, Any]) -> None:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return
    if "event" in properties and "timestamp" in properties:
        required = schema.setdefault("required", [])
        if "event" not in required:
            required.insert(0, "event")
    run_id = properties.get("run_id")
    if isinstance(run_id, dict) and run_id.get("type") == "string":
        run_id.pop("type")
        run_id["anyOf"] = [{"type": "string"}, {"type": "integer"}]
