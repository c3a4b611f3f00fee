"""``flymy-receiver journal list|show|replay|refusals``: the journal from a terminal.

The journal is read from ``--store URL`` or from an app's receiver (``--app
module:receiver``, which brings its store); ``replay`` needs the app, whose handlers it runs.
Tables are for people; ``--json`` prints the same facts for scripts. Every value that came
from a payload is printed with its control characters escaped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ..describe import escape_controls
from ..stores.base import JournalStore, journals
from ..stores.records import ENTRY_STATES, JournalEntry
from ..stores.urls import redacted_url
from .options import PROG, UsageError

if TYPE_CHECKING:
    from ..receiver import Receiver

__all__ = ["add_journal_command", "load_receiver", "printable"]

_SPAN = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def printable(value: object, limit: int = 200) -> str:
    """``value`` as one terminal-safe line: control and format characters escaped (see
    :func:`flymy_receiver.describe.escape_controls`), cut at ``limit`` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    return escape_controls(text)


def load_receiver(spec: str) -> Receiver:
    """Import ``module:attribute`` (from the current directory too) and check it is a
    :class:`~flymy_receiver.Receiver`."""
    from ..receiver import Receiver

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--app must be MODULE:RECEIVER, got {printable(spec)!r}")
    sys.path.insert(0, os.getcwd())  # like python -m: the user's own modules are importable
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except Exception as exc:  # the user's module may raise anything while importing
        raise UsageError(
            f"cannot import {printable(spec)}: {type(exc).__name__}: {printable(exc)}"
        ) from None
    if not isinstance(value, Receiver):
        raise UsageError(f"{printable(spec)} is not a flymy_receiver.Receiver")
    return value


def add_journal_command(commands: Any, store_help: str) -> None:
    """Add ``journal`` and its subcommands to the ``flymy-receiver`` parser."""
    journal = commands.add_parser("journal", help="list, show and replay journaled deliveries")
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

    p = sub.add_parser("list", help="journaled deliveries, newest first")
    common(p)
    p.add_argument("--state", choices=ENTRY_STATES, help="only entries in this state")
    p.add_argument("--event", help="only this event name")
    p.add_argument("--agent-id", help="only this agent's runs")
    p.add_argument("--since", help="only entries received since: 2h, 3d, or an ISO time")
    p.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    p.set_defaults(run=_store_failures_in_one_line(_list))

    p = sub.add_parser("show", help="one delivery: outcomes, tracebacks, body")
    common(p)
    p.add_argument("target", metavar="RUN_ID_OR_KEY")
    p.add_argument("--body", action="store_true", help="print the exact body too")
    p.set_defaults(run=_store_failures_in_one_line(_show))

    p = sub.add_parser("replay", help="run the handlers of entries that did not succeed")
    common(p, app_required=True)
    p.add_argument("runs", nargs="*", metavar="RUN_ID_OR_KEY")
    p.add_argument("--failed", action="store_true", help="replay every failed entry")
    p.add_argument("--force", action="store_true", help="run every handler again, even ok ones")
    p.set_defaults(run=_replay)

    p = sub.add_parser("refusals", help="refused deliveries, newest first (no bodies)")
    common(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    p.set_defaults(run=_store_failures_in_one_line(_refusals))


def _store_failures_in_one_line(run: Callable[[argparse.Namespace], int]) -> Any:
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
    raise UsageError("choose a journal command: list, show, replay or refusals")


def _journal_store(args: argparse.Namespace) -> JournalStore:
    if getattr(args, "app", None):
        receiver = load_receiver(args.app)
        if receiver.journal is None:
            raise UsageError(f"{printable(args.app)} keeps no journal (journal=False?)")
        return receiver.journal.store
    if not getattr(args, "store", None):
        raise UsageError("pass --store URL or --app MODULE:RECEIVER")
    from ..stores import store_from_url

    try:
        store = store_from_url(args.store)
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    if not journals(store):
        raise UsageError(f"{type(store).__name__} keeps no journal")
    return store  # type: ignore[return-value]  # checked by journals()


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    span = _SPAN.match(text.strip())
    if span:
        seconds = int(span.group(1)) * _UNITS[span.group(2)]
        return datetime.now(timezone.utc) - timedelta(seconds=min(seconds, 100 * 365 * 86400))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since takes 2h, 3d or an ISO time, not {printable(text)!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _limit(value: int) -> int:
    if not 1 <= value <= 10_000:
        raise UsageError("--limit must be between 1 and 10000")
    return value


def _list(args: argparse.Namespace) -> int:
    store = _journal_store(args)
    entries = store.journal_list(
        state=args.state,
        event=args.event,
        agent_id=args.agent_id,
        since=_since(args.since),
        limit=_limit(args.limit),
    )
    if args.json:
        print(json.dumps({"deliveries": [e.summary() for e in entries]}, indent=2))
        return 0
    if not entries:
        print("no journaled deliveries")
        return 0
    rows = [
        [
            e.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            e.state,
            printable(e.event, 40),
            printable(e.run_id or "-", 40),
            printable(e.agent_name or e.agent_id or "-", 30),
            str(e.attempts),
            _handler_summary(e),
        ]
        for e in entries
    ]
    _table(["RECEIVED (UTC)", "STATE", "EVENT", "RUN ID", "AGENT", "TRIES", "HANDLERS"], rows)
    return 0


def _handler_summary(entry: JournalEntry) -> str:
    if not entry.handlers:
        return "-"
    ok = sum(1 for o in entry.handlers.values() if o.ok)
    return f"{ok}/{len(entry.handlers)} ok"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _show(args: argparse.Namespace) -> int:
    store = _journal_store(args)
    entry = store.journal_get(args.target)
    if entry is None:
        print(f"{PROG}: no journal entry for {printable(args.target)!r}", file=sys.stderr)
        return 1
    if args.json:
        data = entry.summary()
        data["headers"] = dict(entry.headers)
        if args.body:
            data["body"] = entry.body.decode("utf-8", "replace")
        print(json.dumps(data, indent=2))
        return 0
    print(f"key:       {printable(entry.key)}")
    print(f"event:     {printable(entry.event)}")
    print(f"run id:    {printable(entry.run_id or '-')}")
    print(f"agent:     {printable(entry.agent_name or '-')} ({printable(entry.agent_id or '-')})")
    print(f"state:     {entry.state}")
    print(f"attempts:  {entry.attempts}")
    print(f"received:  {entry.received_at.isoformat()}")
    print(f"updated:   {entry.updated_at.isoformat()}")
    for name, value in entry.headers.items():
        print(f"header:    {printable(name)}: {printable(value)}")
    if not entry.handlers:
        print("handlers:  none ran")
    for name, outcome in entry.handlers.items():
        status = "ok" if outcome.ok else f"FAILED: {printable(outcome.error or '?', 500)}"
        print(f"handler:   {printable(name)}: {status}")
        if outcome.traceback and not outcome.ok:
            for line in outcome.traceback.rstrip().splitlines()[-40:]:
                print(f"    {printable(line, 500)}")
    if args.body:
        print("body:")
        print(printable(entry.body.decode("utf-8", "replace"), 1_000_000).replace("\\x0a", "\n"))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from ..errors import EventInFlight, StoreUnavailable

    if not args.runs and not args.failed:
        raise UsageError("name the runs to replay, or pass --failed")
    receiver = load_receiver(args.app)
    journal = receiver.journal
    if journal is None:
        raise UsageError(f"{printable(args.app)} keeps no journal (journal=False?)")
    results: list[dict[str, Any]] = []
    failed = False
    try:
        entries = journal.replay_failed() if args.failed else []
        results.extend({"key": e.key, "run_id": e.run_id, "state": e.state} for e in entries)
        for run in args.runs:
            try:
                entry = journal.replay(run, force=args.force)
            except KeyError:
                results.append({"key": run, "state": "unknown"})
                continue
            except EventInFlight:
                results.append({"key": run, "state": "in flight (a delivery holds it)"})
                continue
            results.append({"key": entry.key, "run_id": entry.run_id, "state": entry.state})
    except StoreUnavailable as exc:
        print(f"{PROG}: error: the store failed: {printable(exc)}", file=sys.stderr)
        return 1
    failed = any(r["state"] != "handled" for r in results)
    if args.json:
        print(json.dumps({"replayed": results}, indent=2))
    elif not results:
        print("nothing to replay")
    else:
        for r in results:
            print(f"{printable(r.get('run_id') or r['key'])}: {r['state']}")
    return 1 if failed else 0


def _refusals(args: argparse.Namespace) -> int:
    store = _journal_store(args)
    refusals = store.refusals(_limit(args.limit))
    if args.json:
        print(json.dumps({"refusals": [r.to_dict() for r in refusals]}, indent=2))
        return 0
    if not refusals:
        print("no refusals recorded")
        return 0
    rows = [
        [
            r.at.strftime("%Y-%m-%d %H:%M:%S"),
            str(r.status),
            printable(r.reason, 40),
            printable(r.detail, 120),
        ]
        for r in refusals
    ]
    _table(["AT (UTC)", "STATUS", "REASON", "HINT"], rows)
    return 0
