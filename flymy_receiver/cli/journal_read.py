"""``flymy-receiver journal list|show|refusals``: reading the journal, never changing it.

These open a store with ``create=False``: pointed at a SQLite file that does not exist, they
say so and create nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import tables
from ..stores.records import JournalEntry
from .journal import journal_store, printable
from .options import PROG

__all__ = ["entry_detail", "run_list", "run_refusals", "run_show"]


def run_list(args: argparse.Namespace) -> int:
    store = journal_store(args)
    entries = store.journal_list(
        state=args.state,
        event=args.event,
        agent_id=args.agent_id,
        run_id=args.run_id,
        since=args.since,
        until=args.until,
        before=args.before,
        limit=args.limit,
    )
    # A full page may have older entries after it: say how to get them.
    older = entries[-1].key if len(entries) == args.limit else None
    if args.json:
        print(json.dumps({"deliveries": [e.summary() for e in entries], "before": older}, indent=2))
        return 0
    if not entries:
        print("no journaled deliveries")
        return 0
    print("\n".join(tables.entries_table(entries)))
    if older is not None:
        print(f"older entries: add --before {_shell_word(older)}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    store = journal_store(args)
    entry = store.journal_get(args.target)
    if entry is None:
        print(f"{PROG}: no journal entry for {printable(args.target)!r}", file=sys.stderr)
        return 1
    if args.json:
        data: dict[str, Any] = entry.summary()
        data["headers"] = dict(entry.headers)
        if args.body:
            data["body"] = None if entry.body is None else entry.body.decode("utf-8", "replace")
        print(json.dumps(data, indent=2))
        return 0
    print("\n".join(entry_detail(entry, body=args.body)))
    return 0


def entry_detail(entry: JournalEntry, *, body: bool = False) -> list[str]:
    """What ``journal show`` prints: the facts, the history, each handler, the body."""
    lines = tables.entry_details(entry)
    if body:
        if entry.body is None:
            lines.append("body:      dropped (the journal's byte limit)")
        else:
            text = entry.body.decode("utf-8", "replace")
            lines += ["body:", printable(text, 1_000_000).replace("\\x0a", "\n")]
    return lines


def run_refusals(args: argparse.Namespace) -> int:
    store = journal_store(args)
    refusals = store.refusals(args.limit)
    if args.json:
        print(json.dumps({"refusals": [r.to_dict() for r in refusals]}, indent=2))
        return 0
    if not refusals:
        print("no refusals recorded")
        return 0
    print("\n".join(tables.refusals_table(refusals)))
    return 0


def _shell_word(text: str) -> str:
    import shlex

    return shlex.quote(printable(text, 500))
