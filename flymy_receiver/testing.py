"""Build realistic events and signed requests for testing handlers.

Framework-free, and signed with the same code the receiver verifies with::

    event = make_event("run.completed", output={"score": 3})
    req = signed_request(event, secret="whsec-test")
    response = receiver.handle(req.body, req.headers)
"""

from __future__ import annotations

import json
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from .events import BaseEvent, RunCompleted, validate_event
from .signature import SIGNATURE_HEADER, normalize_secrets, sign

__all__ = ["SignedRequest", "make_event", "serialize", "signed_request"]

_DEFAULT_OUTPUT: dict[str, Any] = {
    "background": "VP of Engineering at Acme Robotics, previously led platform teams.",
    "buying_triggers": ["Scaling team", "New product launch"],
    "outreach_angle": "Focus on engineering productivity tools for a growing team.",
}
_DEFAULT_INPUT: dict[str, Any] = {"name": "Dana Lee", "company": "Acme Robotics"}
_DEFAULT_ERROR: dict[str, Any] = {
    "type": "tool_error",
    "message": "web_search returned no results for query",
}
_ENVELOPE_FIELDS = ("timestamp",)


def make_event(name: str = "run.completed", **fields: Any) -> Any:
    """A valid typed event with fresh ids and the current time.

    Keyword arguments override ``data`` fields (``run_id``, ``agent_id``, ``agent_name``,
    ``status``, ``duration_ms``, ``input``, ``output``, ``error``, or any extra field), except
    ``timestamp``, which sets the envelope's. An ``output`` that is a pydantic model gives a
    ``RunCompleted[ThatModel]``. Any other event name gives an :class:`UnknownEvent`.
    """
    envelope: dict[str, Any] = {
        "event": name,
        "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    for key in _ENVELOPE_FIELDS:
        if key in fields:
            value = fields.pop(key)
            envelope[key] = value.isoformat() if isinstance(value, datetime) else value
    data: dict[str, Any] = {
        "run_id": f"run_{_secrets.token_hex(6)}",
        "agent_id": "agent_abc123",
        "agent_name": "Sales Lead Profiler",
    }
    if name == "run.completed":
        data.update(
            status="done", duration_ms=14200, input=dict(_DEFAULT_INPUT), output=_DEFAULT_OUTPUT
        )
    elif name == "run.failed":
        data.update(
            status="error", duration_ms=3100, input=dict(_DEFAULT_INPUT), error=_DEFAULT_ERROR
        )
    data.update(fields)
    output = data.get("output")
    if isinstance(output, BaseModel) and name == "run.completed":
        data["output"] = output.model_dump(mode="json")
        envelope["data"] = data
        return RunCompleted[type(output)].model_validate(envelope)  # type: ignore[misc]
    envelope["data"] = _jsonable(data)
    return validate_event(envelope)


@dataclass(frozen=True)
class SignedRequest:
    """A body and the headers the platform would send with it."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def signed_request(
    event: BaseEvent | Mapping[str, Any] | bytes | str,
    secret: str | bytes | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> SignedRequest:
    """Serialise ``event`` (a model, a dict, or exact bytes) and sign it like the platform.

    ``secret`` defaults to ``FLYMY_WEBHOOK_SECRET``; ``headers`` adds or overrides headers.
    """
    body = serialize(event)
    (key, *_) = normalize_secrets(secret)
    all_headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, key)}
    all_headers.update(headers or {})
    return SignedRequest(body, all_headers)


def serialize(event: BaseEvent | Mapping[str, Any] | bytes | str) -> bytes:
    """The bytes the platform would send for ``event``: compact JSON for models and dicts."""
    if isinstance(event, bytes):
        return event
    if isinstance(event, str):
        return event.encode()
    if isinstance(event, BaseModel):
        return event.model_dump_json().encode()
    return json.dumps(event, separators=(",", ":"), default=str).encode()


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
