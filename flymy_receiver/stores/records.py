"""What the delivery journal keeps: the records a journaling store reads and writes.

These are plain values shared by the receiver, the :class:`~flymy_receiver.journal.Journal`
and every store. Stores keep times as epoch seconds; the records give aware UTC datetimes.
The JSON forms here are the ones the SQLite, Redis and PostgreSQL stores persist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

__all__ = [
    "ENTRY_STATES",
    "HandlerOutcome",
    "JournalEntry",
    "NewEntry",
    "Refusal",
    "outcomes_from_json",
    "outcomes_to_json",
    "to_datetime",
]

#: ``pending`` (claimed, handlers running or worker died), ``handled``, ``failed`` (a handler
#: raised; the claim was released) and ``ignored`` (authentic, but no handler wanted it).
ENTRY_STATES = ("pending", "handled", "failed", "ignored")


def to_datetime(seconds: float) -> datetime:
    """Epoch seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


# Not frozen: one is made per handler per delivery, and a frozen dataclass's __init__ costs
# several times more. Treat them as values all the same.
@dataclass(slots=True)
class HandlerOutcome:
    """How one handler's latest run ended. ``error`` is ``"RuntimeError: boom"``."""

    ok: bool
    error: str | None = None
    traceback: str | None = None
    at: float = 0.0  # epoch seconds

    @property
    def finished_at(self) -> datetime:
        return to_datetime(self.at)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "traceback": self.traceback, "at": self.at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HandlerOutcome:
        return cls(
            bool(data.get("ok")),
            data.get("error"),
            data.get("traceback"),
            float(data.get("at") or 0.0),
        )


def outcomes_to_json(outcomes: Mapping[str, HandlerOutcome]) -> bytes:
    return orjson.dumps({name: outcome.to_dict() for name, outcome in outcomes.items()})


def outcomes_from_json(data: bytes | str | None) -> dict[str, HandlerOutcome]:
    if not data:
        return {}
    return {name: HandlerOutcome.from_dict(value) for name, value in orjson.loads(data).items()}


@dataclass(slots=True)
class NewEntry:
    """What a delivery tells the store about an authentic event as it claims it."""

    key: str
    event: str
    run_id: str | None
    agent_id: str | None
    agent_name: str | None
    body: bytes
    headers: Mapping[str, str]
    retention: float  # seconds the entry is kept after its last change


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One authentic event as the journal keeps it (see ``DESIGN.md`` section 6)."""

    key: str
    event: str
    run_id: str | None
    agent_id: str | None
    agent_name: str | None
    state: str
    attempts: int
    received_at: datetime
    updated_at: datetime
    body: bytes = field(repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    handlers: Mapping[str, HandlerOutcome] = field(default_factory=dict)

    def parse(self) -> Any:
        """The event, typed as at receipt (the body was authenticated when it arrived)."""
        from ..events import parse_event

        return parse_event(self.body)[0]

    def summary(self) -> dict[str, Any]:
        """A JSON-ready view without the body: what lists and APIs show."""
        return {
            "key": self.key,
            "run_id": self.run_id,
            "event": self.event,
            "agent_id": self.agent_id,
            "agent_name": self.agent_name,
            "state": self.state,
            "attempts": self.attempts,
            "received_at": self.received_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "handlers": {name: o.to_dict() for name, o in self.handlers.items()},
        }


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused delivery, kept without its body. ``reason`` is the log line's code and
    ``detail`` its hint (never a secret nor an expected signature)."""

    at: datetime
    status: int
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
        }
