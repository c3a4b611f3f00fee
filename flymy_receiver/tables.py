"""The journal as terminal tables: one set of columns for every front end that prints them.

``flymy-receiver journal`` and ``manage.py flymy_journal`` print the same columns in the same
order from here, so an operator reads one layout whatever the tool. Each function returns
the lines to print (header first); every cell that came from a payload has its control
characters escaped (:func:`~flymy_receiver.describe.escape_controls`) and is cut to a
bounded width, so a run id holding an escape sequence cannot drive the terminal.

- :func:`entries_table` -- a list of entries: :data:`ENTRY_COLUMNS`.
- :func:`refusals_table` -- refused deliveries: :data:`REFUSAL_COLUMNS`.
- :func:`history_table` -- an entry's attempts: :data:`HISTORY_COLUMNS`.
- :func:`handlers_table` -- an entry's handlers with their state and attempts:
  :data:`HANDLER_COLUMNS`.
- :func:`handler_summary` -- the HANDLERS cell: ``"2 ok, 1 queued"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone

from .describe import escape_controls
from .stores.records import HANDLER_STATES, Attempt, HandlerOutcome, JournalEntry, Refusal

__all__ = [
    "ENTRY_COLUMNS",
    "HANDLER_COLUMNS",
    "HISTORY_COLUMNS",
    "REFUSAL_COLUMNS",
    "cell",
    "entries_table",
    "handler_summary",
    "handlers_table",
    "history_table",
    "refusals_table",
    "render",
    "when",
]

ENTRY_COLUMNS = ("RECEIVED (UTC)", "STATE", "EVENT", "RUN ID", "AGENT", "TRIES", "HANDLERS")
REFUSAL_COLUMNS = ("AT (UTC)", "STATUS", "REASON", "HINT")
HISTORY_COLUMNS = ("AT (UTC)", "SOURCE", "STATUS", "OUTCOME", "SECONDS", "HANDLER")
HANDLER_COLUMNS = ("HANDLER", "STATE", "ATTEMPTS", "AT (UTC)", "ERROR")


def cell(value: object, limit: int = 200) -> str:
    """``value`` as one terminal-safe cell: control characters escaped, cut at ``limit``."""
    text = "-" if value is None else str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    return escape_controls(text)


def when(moment: datetime | None) -> str:
    """A time as every table shows it: UTC, to the second."""
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def render(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; the last one not padded.

    Cells are printed as given: make them with :func:`cell`.
    """
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    widths[-1] = 0
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]


def handler_summary(handlers: Mapping[str, HandlerOutcome]) -> str:
    """How many handlers are in each state, in :data:`HANDLER_STATES` order (``-``: none).

    ``"1/2 ok"`` while every handler is ok or failed (the common case), else each state
    counted: ``"1 ok, 1 queued"``.
    """
    if not handlers:
        return "-"
    counts = {state: 0 for state in HANDLER_STATES}
    for outcome in handlers.values():
        counts[outcome.state if outcome.state in counts else "failed"] += 1
    if counts["ok"] + counts["failed"] == len(handlers):
        return f"{counts['ok']}/{len(handlers)} ok"
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n)


def entries_table(entries: Iterable[JournalEntry]) -> list[str]:
    """The list of entries (summaries are enough), newest first as given."""
    rows = [
        [
            when(e.received_at),
            e.state,
            cell(e.event, 40),
            cell(e.run_id, 40),
            cell(e.agent_name or e.agent_id, 30),
            str(e.attempts),
            handler_summary(e.handlers),
        ]
        for e in entries
    ]
    return render(ENTRY_COLUMNS, rows)


def refusals_table(refusals: Iterable[Refusal]) -> list[str]:
    rows = [
        [when(r.at), str(r.status), cell(r.reason, 40), cell(r.detail or "-", 120)]
        for r in refusals
    ]
    return render(REFUSAL_COLUMNS, rows)


def history_table(history: Iterable[Attempt]) -> list[str]:
    """An entry's attempts, oldest first: who tried (sender, replay, worker), what came of it."""
    rows = [
        [
            when(a.started_at),
            cell(a.source, 10),
            "-" if a.status is None else str(a.status),
            cell(a.outcome, 20),
            f"{a.duration:.3f}",
            cell(a.handler, 80),
        ]
        for a in history
    ]
    return render(HISTORY_COLUMNS, rows)


def handlers_table(handlers: Mapping[str, HandlerOutcome]) -> list[str]:
    """Each handler's latest state (queued, running, ok, failed) and its attempts."""
    rows = [
        [
            cell(name, 80),
            outcome.state + (" (deferred)" if outcome.deferred else ""),
            str(outcome.attempts) if outcome.attempts else "-",
            when(outcome.finished_at) if outcome.at else "-",
            cell(outcome.error or "-", 200),
        ]
        for name, outcome in handlers.items()
    ]
    return render(HANDLER_COLUMNS, rows)


def entry_details(entry: JournalEntry) -> list[str]:
    """An entry's facts, history, handlers and failed handlers' tracebacks, as ``journal
    show`` and ``manage.py flymy_journal show`` print them (each value terminal-safe; the
    body is the caller's, which shows it its own way)."""
    lines = [
        f"key:       {cell(entry.key, 1000)}",
        f"event:     {cell(entry.event)}",
        f"run id:    {cell(entry.run_id)}",
        f"agent:     {cell(entry.agent_name)} ({cell(entry.agent_id)})",
        f"state:     {entry.state}",
        f"attempts:  {entry.attempts}",
        f"received:  {entry.received_at.isoformat()}",
        f"updated:   {entry.updated_at.isoformat()}",
    ]
    if entry.note:
        lines.append(f"note:      {cell(entry.note, 500)}")
    lines += [f"header:    {cell(n)}: {cell(v)}" for n, v in entry.headers.items()]
    lines.append("history:")
    if entry.history:
        lines += ["  " + line for line in history_table(entry.history)]
    else:
        lines.append("  none recorded")
    lines.append("handlers:")
    if not entry.handlers:
        lines.append("  none ran")
    else:
        lines += ["  " + line for line in handlers_table(entry.handlers)]
    for name, outcome in entry.handlers.items():
        if outcome.traceback and not outcome.ok:
            lines.append(f"traceback of {cell(name)}:")
            lines += [f"    {cell(t, 500)}" for t in outcome.traceback.rstrip().splitlines()[-40:]]
    return lines
