"""Typed events, and parsing an authentic body into one.

``RunCompleted`` and ``RunFailed`` are the events the platform documents; any other event
name becomes an ``UnknownEvent`` so that new platform events are acknowledged, not
rejected. Every model ignores extra fields and accepts ``run_id`` as an integer.

Parsing choices (documented in the README): the body is parsed once, by pydantic-core's JSON
parser, which is strict RFC 8259 JSON: ``NaN``/``Infinity``, invalid UTF-8 and lone surrogate
escapes are refused (400). Integers are kept exact up to :data:`MAX_NUMBER_DIGITS` digits; a
longer number is refused (400) as it is read, so an absurd number costs no more than reading
it. A float literal beyond double range (``1e400``, which RFC 8259 leaves to the
implementation and no common encoder writes) reads as infinity, as in JavaScript and
Python's own json. Nesting deeper than :data:`MAX_DEPTH` levels is refused (400). For
duplicate keys the last one wins, and one leading UTF-8 BOM is ignored.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Generic, Literal, TypeAlias, TypeVar

import pydantic_core
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import MalformedEvent

__all__ = [
    "MAX_DEPTH",
    "MAX_NUMBER_DIGITS",
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


def _as_utc(value: datetime) -> datetime:
    # A timestamp without a zone is read as UTC, on every path (typed handlers re-validate
    # the event from the parsed JSON, so this lives in the field, not in the parser).
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]

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
    timestamp: Timestamp


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
#: Integers are kept exact up to this many digits; a number with more digits before its
#: point is refused as the parser reads it. It is Python's own limit for turning an ``int``
#: into text, so every number a handler gets can be printed and stored.
MAX_NUMBER_DIGITS = 4300
#: Arrays and objects nested up to this deep (the envelope counts) are accepted; the parser
#: refuses deeper nesting at its recursion limit (one more level of arrays passes).
MAX_DEPTH = 200


def parse_json(body: bytes) -> Any:
    """Parse a body as strict JSON; raise :class:`MalformedEvent` on anything else."""
    if body.startswith(_BOM):
        body = body[3:]
    try:
        # One pass, no pre-scan. The parser is exact for integers, refuses NaN/Infinity
        # (allow_inf_nan=False), lone surrogates, invalid UTF-8, numbers of more than 4300
        # digits and nesting deeper than 200. Caching only keys: values rarely repeat.
        return pydantic_core.from_json(body, allow_inf_nan=False, cache_strings="keys")
    except ValueError as exc:
        raise MalformedEvent(f"invalid JSON: {_first_line(exc)}", code="invalid_json") from None


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
