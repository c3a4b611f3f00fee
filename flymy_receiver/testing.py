"""Build realistic events and signed requests for testing handlers.

Framework-free, and signed with the same code the receiver verifies with::

    event = make_event("run.completed", output={"score": 3})
    req = signed_request(event, secret="whsec-test")
    response = receiver.handle(req.body, req.headers)

Negative builders (:func:`tampered_request`, :func:`wrong_secret_request`,
:func:`rotated_out_request`, :func:`stale_request`, :func:`reserialized_request`,
:func:`unsigned_request`) make the requests a receiver must refuse. :func:`post_flask`,
:func:`post_starlette` and :func:`post_django` send a signed event through a framework's own
test client (duck-typed: this module imports no framework). :func:`dispatch` runs the
handlers of a router on an event with no HTTP and no signing, for plain unit tests.
"""

from __future__ import annotations

import copy
import json
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from .events import BaseEvent, RunCompleted, validate_event
from .routing import Router
from .signature import SIGNATURE_HEADER, normalize_secrets, sign

__all__ = [
    "DEFAULT_PATH",
    "SignedRequest",
    "adispatch",
    "data_fields",
    "dispatch",
    "make_event",
    "post_django",
    "post_flask",
    "post_starlette",
    "reserialized_request",
    "rotated_out_request",
    "serialize",
    "signed_request",
    "stale_request",
    "tampered_request",
    "unsigned_request",
    "wrong_secret_request",
]

#: The path the adapters mount the receiver on unless told otherwise.
DEFAULT_PATH = "/webhooks/flymy"

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

EventLike = BaseEvent | Mapping[str, Any] | bytes | str


def data_fields(name: str, data: Any) -> dict[str, Any]:
    """The ``make_event`` fields that one JSON value means for event ``name``: the output of
    ``run.completed``, the error of ``run.failed``, the data fields (an object) of another
    event. Raises :class:`ValueError` for a non-object with another event. The command
    line's ``send --data`` and the inspector's test-event form read their data so."""
    if name == "run.completed":
        return {"output": data}
    if name == "run.failed":
        return {"error": data}
    if isinstance(data, dict):
        return dict(data)
    raise ValueError(f"the data of a {name[:100]} event must be a JSON object")


def make_event(name: str = "run.completed", **fields: Any) -> Any:
    """A valid typed event with fresh ids and the current time.

    Keyword arguments override ``data`` fields (``run_id``, ``agent_id``, ``agent_name``,
    ``status``, ``duration_ms``, ``input``, ``output``, ``error``, or any extra field), except
    ``timestamp``, which sets the envelope's. A field set to ``None`` is sent as ``null``.
    An ``output`` that is a pydantic model gives a ``RunCompleted[ThatModel]``. Any other
    event name gives an :class:`~flymy_receiver.events.UnknownEvent`.
    """
    envelope: dict[str, Any] = {"event": name, "timestamp": _utc_iso(datetime.now(timezone.utc))}
    for key in _ENVELOPE_FIELDS:
        if key in fields:
            value = fields.pop(key)
            envelope[key] = _utc_iso(value) if isinstance(value, datetime) else value
    data: dict[str, Any] = {
        "run_id": f"run_{_secrets.token_hex(6)}",
        "agent_id": "agent_abc123",
        "agent_name": "Sales Lead Profiler",
    }
    # Deep copies: a handler that mutates its event must not change the next test's defaults.
    if name == "run.completed":
        data.update(
            status="done",
            duration_ms=14200,
            input=copy.deepcopy(_DEFAULT_INPUT),
            output=copy.deepcopy(_DEFAULT_OUTPUT),
        )
    elif name == "run.failed":
        data.update(
            status="error",
            duration_ms=3100,
            input=copy.deepcopy(_DEFAULT_INPUT),
            error=copy.deepcopy(_DEFAULT_ERROR),
        )
    data.update(fields)
    output = data.get("output")
    if isinstance(output, BaseModel) and name == "run.completed":
        data["output"] = output.model_dump(mode="json")
        envelope["data"] = data
        return RunCompleted[type(output)].model_validate(envelope)  # type: ignore[misc]
    envelope["data"] = {key: _jsonable(value) for key, value in data.items()}
    return validate_event(envelope)


@dataclass(frozen=True)
class SignedRequest:
    """A body and the headers the platform would send with it."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def signed_request(
    event: EventLike,
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


def serialize(event: EventLike) -> bytes:
    """The bytes the platform would send for ``event``: compact JSON for models and dicts."""
    if isinstance(event, bytes):
        return event
    if isinstance(event, str):
        return event.encode()
    if isinstance(event, BaseModel):
        try:
            return event.model_dump_json().encode()
        except PydanticSerializationError:
            # pydantic serialises at most ~254 levels of nesting: the standard encoder goes
            # as deep as the Python stack allows, so a test can build what the receiver refuses.
            event = event.model_dump()
    return json.dumps(event, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    return _utc_iso(value) if isinstance(value, datetime) else str(value)


# -- requests a receiver must refuse ------------------------------------------------------


def tampered_request(event: EventLike, secret: str | bytes | None = None) -> SignedRequest:
    """Correctly signed, then one byte of the body changed: the receiver answers 401."""
    req = signed_request(event, secret)
    if not req.body:
        return replace(req, body=b" ")
    body = bytearray(req.body)
    # Flip a bit in the middle; for JSON this changes a value, not only the framing.
    body[len(body) // 2] ^= 0x01
    return replace(req, body=bytes(body))


def wrong_secret_request(event: EventLike, secret: str | bytes | None = None) -> SignedRequest:
    """Signed with a random secret (or ``secret``) the receiver does not know: 401."""
    return signed_request(event, secret or f"whsec-wrong-{_secrets.token_hex(8)}")


def rotated_out_request(
    event: EventLike,
    removed_secret: str | bytes,
    *,
    current: str | bytes | list[str | bytes],
) -> SignedRequest:
    """Signed with a secret that was rotated out of ``current``: 401.

    Raises ``ValueError`` if ``removed_secret`` is still one of the ``current`` secrets, which
    would make the test prove nothing.
    """
    (removed,) = normalize_secrets(removed_secret)
    if removed in normalize_secrets(current):
        raise ValueError("removed_secret is still one of the current secrets")
    return signed_request(event, removed)


def stale_request(
    event: str | BaseEvent = "run.completed",
    secret: str | bytes | None = None,
    *,
    age: timedelta = timedelta(days=4),
) -> SignedRequest:
    """Authentic, but with a ``timestamp`` ``age`` in the past (default: outside the
    default three-day replay window): 400 when the window is on.

    ``event`` is an event name or a model whose timestamp is replaced.
    """
    timestamp = datetime.now(timezone.utc) - age
    if isinstance(event, str):
        model: BaseEvent = make_event(event, timestamp=timestamp)
    else:
        model = event.model_copy(update={"timestamp": timestamp})
    return signed_request(model, secret)


def reserialized_request(event: EventLike, secret: str | bytes | None = None) -> SignedRequest:
    """Signed over the compact bytes, sent pretty-printed with the original signature: 401.

    What happens when a proxy or a framework re-encodes the JSON before verification.
    """
    req = signed_request(event, secret)
    body = json.dumps(json.loads(req.body), indent=2, sort_keys=True).encode()
    if body == req.body:  # pragma: no cover - a JSON object always gains whitespace
        body += b"\n"
    return replace(req, body=body)


def unsigned_request(event: EventLike) -> SignedRequest:
    """The body with no signature header at all: 401."""
    return SignedRequest(serialize(event), {"Content-Type": "application/json"})


# -- posting through a framework's own test client ----------------------------------------


def _prepare(
    event: EventLike | SignedRequest, secret: str | bytes | None, headers: Mapping[str, str] | None
) -> SignedRequest:
    req = event if isinstance(event, SignedRequest) else signed_request(event, secret)
    if headers:
        req = replace(req, headers={**req.headers, **headers})
    return req


def post_flask(
    client: Any,
    event: EventLike | SignedRequest,
    secret: str | bytes | None = None,
    *,
    path: str = DEFAULT_PATH,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """POST ``event`` (signed with ``secret``, or an already built request) through a Flask
    test client (``app.test_client()``); returns its response."""
    req = _prepare(event, secret, headers)
    return client.post(path, data=req.body, headers=req.headers)


def post_starlette(
    client: Any,
    event: EventLike | SignedRequest,
    secret: str | bytes | None = None,
    *,
    path: str = DEFAULT_PATH,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """POST ``event`` through a Starlette or FastAPI ``TestClient``; returns its response."""
    req = _prepare(event, secret, headers)
    return client.post(path, content=req.body, headers=req.headers)


def post_django(
    client: Any,
    event: EventLike | SignedRequest,
    secret: str | bytes | None = None,
    *,
    path: str = DEFAULT_PATH,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """POST ``event`` through a Django test ``Client``; returns its response.

    Awaits nothing: pass an ``AsyncClient`` and await the result yourself.
    """
    req = _prepare(event, secret, headers)
    rest = {k: v for k, v in req.headers.items() if k.lower() != "content-type"}
    content_type = next(
        (v for k, v in req.headers.items() if k.lower() == "content-type"), "application/json"
    )
    return client.post(path, data=req.body, content_type=content_type, headers=rest)


# -- running handlers directly --------------------------------------------------------------


def dispatch(router: Router, event: Any) -> list[str]:
    """Run the handlers of ``router`` (a :class:`~flymy_receiver.Receiver` or any
    :class:`~flymy_receiver.Router`) that ``event`` reaches, in order, with no HTTP, signature
    or idempotency store. Async handlers are run to completion.

    Raises what a handler raises, and :class:`~flymy_receiver.OutputMismatch` when the output
    does not match a handler's model. Returns the ids of the handlers that ran.
    """
    return router.dispatch(event)


async def adispatch(router: Router, event: Any) -> list[str]:
    """The async twin of :func:`dispatch`, for tests that already run an event loop."""
    return await router.adispatch(event)


def _utc_iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
