"""Values between Python and PostgresStore's rows: keys and text as PostgreSQL can hold them,
outcomes and attempts as JSON, rows as journal entries."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from psycopg.types.json import Jsonb

from .records import Attempt, HandlerOutcome, JournalEntry, to_datetime

__all__ = [
    "attempts_json",
    "clean",
    "clean_or_none",
    "db_key",
    "entry",
    "outcome_dict",
    "outcomes_json",
]

#: Keys longer than this many bytes are stored as a digest (an index entry holds 2.7 KB).
MAX_KEY_BYTES = 512


def db_key(key: str) -> str:
    """The key as stored: PostgreSQL text cannot hold NUL, and an index entry at most
    2.7 KB, so such a key is kept as its digest (the same key always maps to the same)."""
    if "\x00" not in key:
        try:
            if len(key.encode("utf-8")) <= MAX_KEY_BYTES:
                return key
        except UnicodeEncodeError:
            pass
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256-of-unstorable-key:{digest}"


def clean(text: str) -> str:
    """``text`` storable as PostgreSQL text and JSON (no NUL, valid UTF-8), for display."""
    text = str(text)
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def clean_or_none(text: str | None) -> str | None:
    return None if text is None else clean(text)


def outcome_dict(outcome: HandlerOutcome) -> dict[str, Any]:
    data = outcome.to_dict()
    data["error"] = clean_or_none(outcome.error)
    data["traceback"] = clean_or_none(outcome.traceback)
    return data


def outcomes_json(outcomes: Mapping[str, HandlerOutcome]) -> Jsonb:
    return Jsonb({clean(name): outcome_dict(o) for name, o in outcomes.items()})


def attempts_json(attempt: Attempt | None) -> Jsonb:
    """The attempt to append to an entry's history, as a JSON array (empty: none)."""
    if attempt is None:
        return Jsonb([])
    data = attempt.to_dict()
    if attempt.handler is not None:
        data["handler"] = clean(attempt.handler)
    return Jsonb([data])


def entry(row: tuple[Any, ...]) -> JournalEntry:
    handlers = row[11] or {}
    history = row[12]
    return JournalEntry(
        key=row[0],
        event=row[1],
        run_id=row[2],
        agent_id=row[3],
        agent_name=row[4],
        state=row[5],
        attempts=int(row[6]),
        received_at=to_datetime(float(row[7])),
        updated_at=to_datetime(float(row[8])),
        body=bytes(row[9]) if row[9] is not None else None,
        headers=dict(row[10] or {}),
        handlers={str(name): HandlerOutcome.from_dict(value) for name, value in handlers.items()},
        history=tuple(Attempt.from_dict(item) for item in history or ()),
        note=row[13],
        body_size=int(row[14] or 0),
        body_dropped=bool(row[15]),
    )
