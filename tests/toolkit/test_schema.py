"""The JSON Schema and OpenAPI documents agree with the models and with make_event."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from flymy_receiver.schema import event_schemas, openapi_document
from flymy_receiver.testing import make_event, serialize
from tests.conftest import require

# The examples from the wire protocol, as the platform documents them.
DOCUMENTED = {
    "run.completed": {
        "event": "run.completed",
        "timestamp": "2025-01-15T10:00:15Z",
        "data": {
            "run_id": "run_xyz789",
            "agent_id": "agent_abc123",
            "agent_name": "Sales Lead Profiler",
            "status": "done",
            "duration_ms": 14200,
            "input": {"name": "Dana Lee", "company": "Acme Robotics"},
            "output": {
                "background": "VP of Engineering at Acme Robotics...",
                "buying_triggers": ["Scaling team", "New product launch"],
                "outreach_angle": "Focus on engineering productivity tools...",
            },
        },
    },
    "run.failed": {
        "event": "run.failed",
        "timestamp": "2025-01-15T10:00:15Z",
        "data": {
            "run_id": "run_xyz790",
            "agent_id": "agent_abc123",
            "status": "error",
            "error": {"type": "tool_error", "message": "web_search returned no results for query"},
        },
    },
}


class LeadProfile(BaseModel):
    background: str
    buying_triggers: list[str]
    outreach_angle: str


def _validator(schema: dict[str, Any]) -> Any:
    require("jsonschema")
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_every_event_schema_is_valid_and_accepts_make_event_output() -> None:
    schemas = event_schemas()
    assert set(schemas) == {"run.completed", "run.failed", "*"}
    for name, event_name in [
        ("run.completed", "run.completed"),
        ("run.failed", "run.failed"),
        ("*", "run.cancelled"),
    ]:
        validator = _validator(schemas[name])
        for fields in ({}, {"run_id": 12345}, {"agent_name": None}):
            instance = json.loads(serialize(make_event(event_name, **fields)))
            errors = [e.message for e in validator.iter_errors(instance)]
            assert errors == [], (name, fields, errors)


@pytest.mark.parametrize("name", ["run.completed", "run.failed"])
def test_schema_accepts_the_documented_payloads_and_their_tolerated_variants(name: str) -> None:
    validator = _validator(event_schemas()[name])
    payload = DOCUMENTED[name]
    assert validator.is_valid(payload)
    minimal = json.loads(json.dumps(payload))
    for optional in ("agent_name", "duration_ms", "input"):
        minimal["data"].pop(optional, None)
    minimal["data"]["run_id"] = 790
    minimal["data"]["added_later"] = {"x": 1}  # extra fields are accepted
    assert validator.is_valid(minimal)


@pytest.mark.parametrize(
    ("name", "break_it"),
    [
        ("run.completed", lambda p: p.pop("event")),
        ("run.completed", lambda p: p.update(event="run.failed")),
        ("run.completed", lambda p: p["data"].pop("run_id")),
        ("run.completed", lambda p: p["data"].update(run_id=["x"])),
        ("run.completed", lambda p: p.update(timestamp="yesterday")),
        ("run.failed", lambda p: p["data"].pop("error")),
        ("run.failed", lambda p: p["data"].update(error={"message": "no type"})),
    ],
)
def test_schema_refuses_what_the_receiver_refuses(name: str, break_it: Any) -> None:
    from flymy_receiver import MalformedEvent
    from flymy_receiver.events import validate_event

    payload = json.loads(json.dumps(DOCUMENTED[name]))
    break_it(payload)
    assert not _validator(event_schemas()[name]).is_valid(payload)
    if payload.get("event") == name:  # same name: the receiver picks this model and refuses
        with pytest.raises(MalformedEvent):
            validate_event(payload)


def test_typed_output_schema_checks_the_output() -> None:
    validator = _validator(event_schemas(LeadProfile)["run.completed"])
    assert validator.is_valid(DOCUMENTED["run.completed"])
    wrong = json.loads(json.dumps(DOCUMENTED["run.completed"]))
    wrong["data"]["output"]["buying_triggers"] = "not a list"
    assert not validator.is_valid(wrong)
    profile = LeadProfile(background="b", buying_triggers=["t"], outreach_angle="o")
    assert validator.is_valid(json.loads(serialize(make_event(output=profile))))


def _operation_validator(document: dict[str, Any], name: str) -> Any:
    require("jsonschema")
    import jsonschema
    import referencing
    import referencing.jsonschema

    resource = referencing.Resource(document, referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource("urn:flymy-openapi", resource)
    content = document["webhooks"][name]["post"]["requestBody"]["content"]
    ref = content["application/json"]["schema"]["$ref"]
    return jsonschema.Draft202012Validator({"$ref": "urn:flymy-openapi" + ref}, registry=registry)


def test_openapi_document_has_a_webhook_per_event_and_resolvable_refs() -> None:
    document = openapi_document(LeadProfile)
    assert document["openapi"].startswith("3.1")
    assert set(document["webhooks"]) == {"run.completed", "run.failed", "other"}
    for name in ("run.completed", "run.failed"):
        operation = document["webhooks"][name]["post"]
        assert operation["parameters"][0]["name"] == "X-FlyMyAI-Signature"
        assert {"200", "400", "401", "413", "500", "503"} <= set(operation["responses"])
        validator = _operation_validator(document, name)
        assert validator.is_valid(DOCUMENTED[name])
        assert validator.is_valid(json.loads(serialize(make_event(name))))
        assert not validator.is_valid({"event": name, "timestamp": "2025-01-15T10:00:15Z"})
    bad_output = json.loads(json.dumps(DOCUMENTED["run.completed"]))
    bad_output["data"]["output"] = {"background": 1}
    assert not _operation_validator(document, "run.completed").is_valid(bad_output)
    other = _operation_validator(document, "other")
    assert other.is_valid(json.loads(serialize(make_event("run.cancelled"))))
