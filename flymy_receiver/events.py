"""Typed events, and parsing an authentic body into one.

``RunCompleted`` and ``RunFailed`` are the events the platform documents; any other event
name becomes an ``UnknownEvent`` so that new platform events are acknowledged, not
rejected. Every model ignores extra fields and accepts ``run_id`` as an integer.

Parsing choices (documented in the README): the body is parsed with orjson, which is strict
RFC 8259 JSON: ``NaN``/``Infinity`` and invalid UTF-8 are refused (400), nesting deeper than
1024 levels is refused (400), for duplicate keys the last one wins, and one leading UTF-8 BOM
is ignored. Integers too large for 64 bits (which orjson would turn into floats) are read by
the standard parser: huge integers are kept exact (as ``Decimal`` past 4000 digits), and a
float that overflows to infinity is refused (400).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeAlias, TypeVar

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import MalformedEvent

__all__ = [
    "BaseEvent",
    "Event",
    "RunCompleted",
    "RunCompletedData",
    "RunError",
    "RunFailed",
    "RunFailedData",
    "UnknownEvent",
    "parse_event",
    "parse_json",
]

OutputT = TypeVar("OutputT")


def _run_id(value: Any) -> Any:
    # The platform may send run_id as an integer; handlers always see a string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


RunId = Annotated[str, BeforeValidator(_run_id)]

_OPEN = ConfigDict(extra="allow", frozen=True)


class _Model(BaseModel):
    model_config = _OPEN


class RunError(_Model):
    """Why a run failed."""

    type: str
    message: str = ""


class _RunData(_Model):
    run_id: RunId
    agent_id: str
    agent_name: str | None = None
    status: str
    duration_ms: int | None = None
    input: dict[str, Any] | None = None


class RunCompletedData(_RunData, Generic[OutputT]):
    """``data`` of ``run.completed``; ``output`` is typed by ``RunCompleted[Model]``."""

    status: str = "done"
    output: OutputT = Field(default=None)  # type: ignore[assignment]  # None when absent


class RunFailedData(_RunData):
    """``data`` of ``run.failed``."""

    status: str = "error"
    error: RunError


class BaseEvent(_Model):
    """Fields every event has."""

    event: str
    timestamp: datetime


class RunCompleted(BaseEvent, Generic[OutputT]):
    """A run finished. ``RunCompleted[LeadProfile]`` validates ``data.output`` as a model."""

    event: Literal["run.completed"] = "run.completed"
    data: RunCompletedData[OutputT]


class RunFailed(BaseEvent):
    """A run failed; ``data.error`` says why."""

    event: Literal["run.failed"] = "run.failed"
    data: RunFailedData


class UnknownEvent(BaseEvent):
    """An event name this version does not know; ``data`` is kept as a plain dict."""

    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        value = self.data.get("run_id")
        return None if value is None else str(value)


Event: TypeAlias = "RunCompleted[Any] | RunFailed | UnknownEvent"

_MODELS: dict[str, type[BaseEvent]] = {
    "run.completed": RunCompleted,
    "run.failed": RunFailed,
}

_BOM = b"\xef\xbb\xbf"
_INT_DIGITS = 4000  # below the interpreter's int/str conversion limit
# Digits become "0", everything else a space: a 19-digit run is then a plain substring,
# found by a byte scan several times faster than the equivalent regular expression (which
# cost more than parsing the body).
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGITS = b"0" * 19


def parse_json(body: bytes) -> Any:
    """Parse a body as strict JSON; raise :class:`MalformedEvent` on anything else."""
    if body.startswith(_BOM):
        body = body[3:]
    # orjson silently turns an integer beyond 64 bits into a float (and refuses longer ones):
    # a body with a run of 19+ digits is read by the standard parser instead, which keeps
    # integers exact (as a Decimal past Python's int digit limit).
    if _LONG_DIGITS not in body.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if "number" not in str(exc):
                message = f"invalid JSON: {_first_line(exc)}"
                raise MalformedEvent(message, code="invalid_json") from None
    try:
        return json.loads(
            body.decode("utf-8"),  # strict, as orjson: no UTF-16/32 guessing
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise MalformedEvent(f"invalid JSON: {_first_line(exc)}", code="invalid_json") from None


def _parse_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _INT_DIGITS else Decimal(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def parse_event(body: bytes) -> tuple[RunCompleted[Any] | RunFailed | UnknownEvent, Any]:
    """Parse an authentic body into a typed event; also return the parsed JSON object.

    Raises :class:`MalformedEvent` (400) for anything that is not a valid envelope.
    """
    obj = parse_json(body)
    return validate_event(obj), obj


def validate_event(obj: Any) -> RunCompleted[Any] | RunFailed | UnknownEvent:
    """Validate a parsed JSON value into the event model its ``event`` name selects."""
    if not isinstance(obj, dict):
        raise MalformedEvent("the body is not a JSON object", code="not_an_object")
    name = obj.get("event")
    model = _MODELS.get(name, UnknownEvent) if isinstance(name, str) else UnknownEvent
    try:
        event = model.model_validate(obj)
    except ValidationError as exc:
        raise MalformedEvent(describe_validation_error(exc), code="invalid_envelope") from None
    if event.timestamp.tzinfo is None:
        event = event.model_copy(update={"timestamp": event.timestamp.replace(tzinfo=timezone.utc)})
    return event  # type: ignore[return-value]


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """Field locations and messages only: never the input values."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:limit]:
        location = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
