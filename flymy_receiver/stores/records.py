"""What the delivery journal keeps: the records a journaling store reads and writes.

These are plain values shared by the receiver, the :class:`~flymy_receiver.journal.Journal`
and every store. Stores keep times as epoch seconds; the records give aware UTC datetimes.
The JSON forms here are the ones the SQLite, Redis and PostgreSQL stores persist.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

__all__ = [
    "ENTRY_STATES",
    "FAILURE_STATES",
    "HANDLER_STATES",
    "HISTORY_LIMIT",
    "Attempt",
    "HandlerOutcome",
    "JournalEntry",
    "NewEntry",
    "Refusal",
    "history_from_json",
    "history_to_json",
    "outcomes_from_json",
    "outcomes_to_json",
    "to_datetime",
]

#: ``pending`` (claimed, handlers running), ``queued`` (acknowledged; deferred handlers still
#: to run on a task queue's workers), ``handled`` (every handler ok), ``failed`` (a handler
#: raised; the claim was released, or a deferred handler used its last attempt), ``ignored``
#: (authentic, but no handler wanted it) and ``resolved`` (dismissed by an operator: kept,
#: never replayed in bulk). A store reports ``stalled`` for a ``pending`` entry whose claim's
#: lease has ended (its worker died): a state derived when read, never stored.
ENTRY_STATES = ("pending", "queued", "handled", "failed", "ignored", "resolved", "stalled")
#: What ``journal_list(state="failed")`` returns: the entries that need an operator.
FAILURE_STATES = ("failed", "stalled")
#: A handler's latest outcome: ``ok``, ``failed``, or for a deferred handler ``queued``
#: (durable, its job sent or about to be) and ``running`` (a worker holds its lease).
HANDLER_STATES = ("ok", "failed", "queued", "running")
#: An entry's history keeps the newest attempts only, so a hot retry loop cannot grow it.
HISTORY_LIMIT = 50


def to_datetime(seconds: float) -> datetime:
    """Epoch seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


# Not frozen: one is made per handler per delivery, and a frozen dataclass's __init__ costs
# several times more. Treat them as values all the same.
@dataclass(slots=True)
class HandlerOutcome:
    """How one handler's latest run ended. ``error`` is ``"RuntimeError: boom"``.

    ``state`` is one of :data:`HANDLER_STATES` (``""`` means ``"ok"`` or ``"failed"``, from
    ``ok``). For a deferred handler: ``attempts`` counts the worker runs, ``queued_at`` is
    when its job was (last) enqueued and ``lease_until`` when a running worker's lease ends
    (all epoch seconds; 0 when not applicable).
    """

    ok: bool
    error: str | None = None
    traceback: str | None = None
    at: float = 0.0  # epoch seconds
    state: str = ""
    attempts: int = 0
    deferred: bool = False
    queued_at: float = 0.0
    lease_until: float = 0.0

    def __post_init__(self) -> None:
        if not self.state:
            self.state = "ok" if self.ok else "failed"

    @property
    def finished_at(self) -> datetime:
        return to_datetime(self.at)

    @classmethod
    def of_failure(cls, exc: BaseException, *, deferred: bool = False) -> HandlerOutcome:
        """A failed run's outcome: its error line and traceback (for the journal only:
        never in a response)."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(
            ok=False,
            error=f"{type(exc).__name__}: {exc}"[:1000],
            traceback=text[-20_000:],
            at=time.time(),
            deferred=deferred,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ok": self.ok,
            "error": self.error,
            "traceback": self.traceback,
            "at": self.at,
            "state": self.state,
        }
        if self.deferred:  # inline outcomes stay as small as before
            data.update(
                attempts=self.attempts,
                deferred=True,
                queued_at=self.queued_at,
                lease_until=self.lease_until,
            )
        elif self.attempts:
            data["attempts"] = self.attempts
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HandlerOutcome:
        return cls(
            bool(data.get("ok")),
            data.get("error"),
            data.get("traceback"),
            float(data.get("at") or 0.0),
            str(data.get("state") or ""),
            int(data.get("attempts") or 0),
            bool(data.get("deferred")),
            float(data.get("queued_at") or 0.0),
            float(data.get("lease_until") or 0.0),
        )


@dataclass(slots=True)
class Attempt:
    """One delivery, replay or worker run of an entry, as its history keeps it.

    ``source`` is ``"sender"``, ``"replay"`` or ``"worker"``; ``status`` the HTTP answer
    (``None`` for a worker run); ``outcome`` one of ``handled``, ``failed``, ``duplicate``,
    ``in_flight``, ``ignored``, ``queued`` (acknowledged, deferred handlers sent),
    ``no_handler`` (a replay that found no handler to run) or ``unavailable``;
    ``duration`` in seconds; ``handler`` names the handler of a worker run.
    """

    at: float  # epoch seconds
    source: str
    status: int | None
    outcome: str
    duration: float = 0.0
    handler: str | None = None

    @property
    def started_at(self) -> datetime:
        return to_datetime(self.at)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "at": self.at,
            "source": self.source,
            "status": self.status,
            "outcome": self.outcome,
            "duration": self.duration,
        }
        if self.handler is not None:
            data["handler"] = self.handler
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attempt:
        status = data.get("status")
        return cls(
            float(data.get("at") or 0.0),
            str(data.get("source") or "sender"),
            int(status) if status is not None else None,
            str(data.get("outcome") or ""),
            float(data.get("duration") or 0.0),
            data.get("handler"),
        )


def history_to_json(history: Sequence[Attempt]) -> bytes:
    """The newest :data:`HISTORY_LIMIT` attempts as JSON (oldest first)."""
    return orjson.dumps([attempt.to_dict() for attempt in history[-HISTORY_LIMIT:]])


def history_from_json(data: bytes | str | None) -> tuple[Attempt, ...]:
    if not data:
        return ()
    return tuple(Attempt.from_dict(item) for item in orjson.loads(data))


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
    """One authentic event as the journal keeps it (see ``DESIGN.md`` sections 6 and 12).

    ``body`` is ``None`` in a summary (what lists return: they never read bodies) and when
    the journal's byte limit dropped it (``body_dropped``; claims and idempotency records
    are kept all the same). ``body_size`` is its length in bytes either way. ``history``
    holds the newest attempts, oldest first; ``note`` is a resolution's text.
    """

    key: str
    event: str
    run_id: str | None
    agent_id: str | None
    agent_name: str | None
    state: str
    attempts: int
    received_at: datetime
    updated_at: datetime
    body: bytes | None = field(repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    handlers: Mapping[str, HandlerOutcome] = field(default_factory=dict)
    history: tuple[Attempt, ...] = ()
    note: str | None = None
    body_size: int = 0
    body_dropped: bool = False

    def parse(self) -> Any:
        """The event, typed as at receipt (the body was authenticated when it arrived).

        Raises :class:`LookupError` for a summary or an entry whose body was dropped.
        """
        from ..events import parse_event

        if self.body is None:
            why = "was dropped (journal byte limit)" if self.body_dropped else "is not loaded"
            raise LookupError(f"the body of {self.key[:200]!r} {why}: use journal.get()")
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
            "history": [attempt.to_dict() for attempt in self.history],
            "note": self.note,
            "body_size": self.body_size,
            "body_dropped": self.body_dropped,
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
