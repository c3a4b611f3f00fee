"""The journal's tables for a terminal: one set of columns for ``flymy-receiver journal``
and ``manage.py flymy_journal``, so both print the same facts in the same order.

Each ``*_table`` function returns a header and rows of strings; :func:`render` lays them
out. Every cell that came from a payload (event names, run ids, agent names, handler ids,
refusal hints) has its control characters escaped and is cut to a bounded width, so no
sender text can move the cursor or flood a line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from .describe import escape_controls
from .stores.records import Attempt, JournalEntry, Refusal, to_datetime

__all__ = [
    "ENTRY_COLUMNS",
    "HISTORY_COLUMNS",
    "REFUSAL_COLUMNS",
    "cell",
    "entry_table",
    "handler_summary",
    "history_table",
    "refusal_table",
    "render",
    "when",
]

ENTRY_COLUMNS = ["RECEIVED (UTC)", "STATE", "EVENT", "RUN ID", "AGENT", "TRIES", "HANDLERS"]
HISTORY_COLUMNS = ["AT (UTC)", "SOURCE", "STATUS", "OUTCOME", "DURATION", "HANDLER"]
REFUSAL_COLUMNS = ["AT (UTC)", "STATUS", "REASON", "HINT"]

Table = tuple[list[str], list[list[str]]]


def cell(value: object, limit: int = 200) -> str:
    """``value`` as one terminal-safe cell: cut at ``limit`` characters, controls escaped."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    return escape_controls(text)


def when(moment: datetime | float) -> str:
    """A time as ``2026-01-31 12:00:00`` (UTC); epoch seconds too."""
    if not isinstance(moment, datetime):
        moment = to_datetime(moment)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def handler_summary(entry: JournalEntry) -> str:
    """``2/3 ok``, with the count of each other state (``1 queued``, ``1 failed``)."""
    if not entry.handlers:
        return "-"
    states: dict[str, int] = {}
    for outcome in entry.handlers.values():
        states[outcome.state] = states.get(outcome.state, 0) + 1
    summary = f"{states.pop('ok', 0)}/{len(entry.handlers)} ok"
    return ", ".join([summary, *(f"{n} {state}" for state, n in sorted(states.items()))])


def entry_table(entries: Iterable[JournalEntry]) -> Table:
    """Journal entries (summaries will do), newest first as given."""
    rows = [
        [
            when(e.received_at),
            e.state,
            cell(e.event, 40),
            cell(e.run_id or "-", 40),
            cell(e.agent_name or e.agent_id or "-", 30),
            str(e.attempts),
            handler_summary(e),
        ]
        for e in entries
    ]
    return list(ENTRY_COLUMNS), rows


def history_table(history: Sequence[Attempt]) -> Table:
    """An entry's attempts, newest first."""
    rows = [
        [
            when(a.at),
            a.source,
            "-" if a.status is None else str(a.status),
            a.outcome,
            f"{a.duration * 1000:.0f} ms",
            cell(a.handler or "-", 80),
        ]
        for a in reversed(history)
    ]
    return list(HISTORY_COLUMNS), rows


def refusal_table(refusals: Iterable[Refusal]) -> Table:
    """Refused deliveries, newest first as given."""
    rows = [[when(r.at), str(r.status), cell(r.reason, 40), cell(r.detail, 120)] for r in refusals]
    return list(REFUSAL_COLUMNS), rows


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = (
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
    return "\n".join(lines)
