"""The ``flymy-receiver journal`` parser: its subcommands, their options, what each runs.

Reading commands live in :mod:`.journal_read`, the ones that change something in
:mod:`.journal_ops`; both load through :mod:`.journal`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..stores.records import ENTRY_STATES
from ..stores.urls import redacted_url
from .journal import MAX_LIST, MAX_RATE, printable
from .journal_ops import run_replay, run_resend, run_resolve, run_sweep
from .journal_read import run_list, run_refusals, run_show
from .options import PROG, UsageError, moment, rate, span, whole

__all__ = ["add_journal_command", "store_failures_in_one_line"]


def add_journal_command(commands: Any, store_help: str) -> None:
    """Add ``journal`` and its subcommands to the ``flymy-receiver`` parser."""
    journal = commands.add_parser(
        "journal", help="list, show, replay, resolve and resend journaled deliveries"
    )
    sub = journal.add_subparsers(dest="journal_command", metavar="SUBCOMMAND")
    journal.set_defaults(run=_missing_subcommand)

    def common(p: argparse.ArgumentParser, *, app_required: bool = False) -> None:
        if not app_required:
            p.add_argument("--store", help=store_help)
        p.add_argument(
            "--app",
            required=app_required,
            metavar="MODULE:RECEIVER",
            help="your app's receiver (brings its store and handlers)",
        )
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

    limit = whole(1, MAX_LIST)
    p = sub.add_parser("list", help="journaled deliveries, newest first")
    common(p)
    p.add_argument("--state", choices=ENTRY_STATES, help="only entries in this state")
    p.add_argument("--event", help="only this event name")
    p.add_argument("--agent-id", "--agent", dest="agent_id", help="only this agent's runs")
    p.add_argument("--run-id", help="only the entries of this run id")
    p.add_argument("--since", type=moment, help="received since: 2h, 3d, or an ISO time")
    p.add_argument("--until", type=moment, help="received before: 2h, 3d, or an ISO time")
    p.add_argument("--before", metavar="KEY", help="the page after this entry (the last key shown)")
    p.add_argument("--limit", type=limit, default=50, help=f"at most this many, 1-{MAX_LIST} (50)")
    p.set_defaults(run=store_failures_in_one_line(run_list))

    p = sub.add_parser("show", help="one delivery: history, handlers, tracebacks, body")
    common(p)
    p.add_argument("target", metavar="RUN_ID_OR_KEY")
    p.add_argument("--body", action="store_true", help="print the exact body too")
    p.set_defaults(run=store_failures_in_one_line(run_show))

    p = sub.add_parser(
        "replay", help="run the handlers of entries that did not succeed (--dry-run first)"
    )
    common(p, app_required=True)
    p.add_argument("runs", nargs="*", metavar="RUN_ID_OR_KEY")
    p.add_argument("--failed", action="store_true", help="every failed entry the filters match")
    p.add_argument("--since", type=moment, help="with --failed: received since (2h, ISO time)")
    p.add_argument("--until", type=moment, help="with --failed: received before (2h, ISO time)")
    p.add_argument("--event", help="with --failed: only this event name")
    p.add_argument("--agent", "--agent-id", dest="agent_id", help="with --failed: only this agent")
    p.add_argument("--dry-run", action="store_true", help="print what would be replayed; exit 0")
    p.add_argument(
        "--per-second", type=rate(MAX_RATE), metavar="N", help="with --failed: at most N a second"
    )
    p.add_argument("--force", action="store_true", help="run every handler again, even ok ones")
    p.set_defaults(run=store_failures_in_one_line(run_replay))

    p = sub.add_parser("resolve", help="dismiss an entry that will never succeed (kept, noted)")
    common(p)
    p.add_argument("target", metavar="RUN_ID_OR_KEY")
    p.add_argument("--note", required=True, help="why: kept with the entry")
    p.set_defaults(run=store_failures_in_one_line(run_resolve))

    p = sub.add_parser("resend", help="POST a stored delivery, signed afresh, to another URL")
    common(p, app_required=True)
    p.add_argument("target", metavar="RUN_ID_OR_KEY")
    p.add_argument("--to", required=True, metavar="URL", help="where to POST it (http(s)://)")
    p.set_defaults(run=store_failures_in_one_line(run_resend))

    p = sub.add_parser("sweep", help="enqueue again the deferred handlers left queued or stalled")
    common(p, app_required=True)
    p.add_argument(
        "--older-than", type=span, metavar="SPAN", help="queued longer than this: 90s, 5m (5m)"
    )
    p.set_defaults(run=store_failures_in_one_line(run_sweep))

    p = sub.add_parser("refusals", help="refused deliveries, newest first (no bodies)")
    common(p)
    p.add_argument("--limit", type=limit, default=50, help=f"at most this many, 1-{MAX_LIST} (50)")
    p.set_defaults(run=store_failures_in_one_line(run_refusals))


def store_failures_in_one_line(run: Callable[[argparse.Namespace], int]) -> Any:
    """A store that cannot be reached is one line on stderr and exit 1, never a traceback."""

    def guarded(args: argparse.Namespace) -> int:
        from ..errors import StoreUnavailable

        try:
            return run(args)
        except StoreUnavailable as exc:
            shown = redacted_url(args.store) if getattr(args, "store", None) else "the store"
            print(
                f"{PROG}: error: {shown} failed: {printable(exc.detail or exc, 300)}",
                file=sys.stderr,
            )
            return 1

    return guarded


def _missing_subcommand(args: argparse.Namespace) -> int:
    raise UsageError(
        "choose a journal command: list, show, replay, resolve, resend, sweep or refusals"
    )
