"""``flymy-receiver journal replay|resolve|resend|sweep``: acting on the journal.

``replay``, ``resend`` and ``sweep`` need the app's receiver (``--app``): its handlers run, its
secret signs, its queue takes the jobs. ``resolve`` only writes a state and a note, so a
``--store`` is enough. Exit codes: 0 done (a dry run always), 1 something did not succeed
(a handler still failed, no handler ran, a URL answered non-2xx, an unknown entry).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..stores.records import JournalEntry
from .journal import journal_store, load_receiver, printable
from .options import PROG, UsageError

if TYPE_CHECKING:
    from ..journal import Journal

__all__ = ["replay_outcome", "run_replay", "run_resend", "run_resolve", "run_sweep"]


def replay_outcome(entry: JournalEntry) -> str:
    """What the latest replay of ``entry`` did: ``handled``, ``failed``, ``no_handler``, ...

    Read from the entry's history (the replay's own attempt), so that a replay that ran no
    handler is told apart from one that succeeded; the entry's state when there is none.
    """
    for attempt in reversed(entry.history):
        if attempt.source == "replay":
            return attempt.outcome
    return entry.state


def _app_journal(args: argparse.Namespace) -> Journal:
    receiver = load_receiver(args.app)
    if receiver.journal is None:
        raise UsageError(f"{printable(args.app)} keeps no journal (journal=False?)")
    return receiver.journal


def run_replay(args: argparse.Namespace) -> int:
    from ..errors import EventInFlight

    bulk = (args.since, args.until, args.event, args.agent_id, args.per_second)
    if args.failed == bool(args.runs):
        raise UsageError("name the entries to replay, or pass --failed (not both)")
    if not args.failed and any(option is not None for option in bulk):
        raise UsageError("--since, --until, --event, --agent and --per-second go with --failed")
    journal = _app_journal(args)
    if args.failed:
        return _replay_all(journal, args)
    results: list[dict[str, Any]] = []
    for run in args.runs:
        if args.dry_run:
            entry = journal.get(run)
            results.append(_result(run, entry, "would replay" if entry else "unknown"))
            continue
        try:
            entry = journal.replay(run, force=args.force)
        except KeyError:
            results.append(_result(run, None, "unknown"))
        except EventInFlight:
            results.append(_result(run, None, "in flight (a delivery holds it)"))
        else:
            results.append(_result(run, entry, replay_outcome(entry)))
    _print_results(results, args.json)
    if args.dry_run:
        return 0
    return 0 if all(r["outcome"] == "handled" for r in results) else 1


def _result(wanted: str, entry: JournalEntry | None, outcome: str) -> dict[str, Any]:
    if entry is None:
        return {"key": wanted, "run_id": None, "state": None, "outcome": outcome}
    return {"key": entry.key, "run_id": entry.run_id, "state": entry.state, "outcome": outcome}


def _replay_all(journal: Journal, args: argparse.Namespace) -> int:
    report = journal.replay_all(
        state="failed",
        event=args.event,
        agent_id=args.agent_id,
        since=args.since,
        until=args.until,
        dry_run=args.dry_run,
        per_second=args.per_second,
    )
    matched = list(report.matched)
    if args.dry_run:
        if args.json:
            print(json.dumps({"dry_run": True, "matched": matched}, indent=2))
        elif not matched:
            print("nothing to replay: no failed entry matches")
        else:
            for key in matched:
                print(printable(key))
            print(f"{len(matched)} failed entries would be replayed (dry run: nothing ran)")
        return 0
    handled, failed = list(report.handled), list(report.failed)
    others = [key for key in matched if key not in set(handled) | set(failed)]
    if args.json:
        data = {"matched": matched, "handled": handled, "failed": failed, "skipped": others}
        print(json.dumps(data, indent=2))
    elif not matched:
        print("nothing to replay: no failed entry matches")
    else:
        for key in failed:
            print(f"{printable(key)}: still failed")
        for key in others:
            print(f"{printable(key)}: not replayed (in flight, or no handler ran)")
        print(
            f"replayed {len(matched)}: {len(handled)} handled, {len(failed)} still failed"
            + (f", {len(others)} not handled" if others else "")
        )
    return 0 if len(handled) == len(matched) else 1


def _print_results(results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"replayed": results}, indent=2))
        return
    for r in results:
        print(f"{printable(r.get('run_id') or r['key'])}: {_said(r['outcome'])}")


def _said(outcome: str) -> str:
    return {
        "no_handler": "no handler ran (none wants this event now)",
        "failed": "still failed",
    }.get(outcome, outcome)


def run_resolve(args: argparse.Namespace) -> int:
    from ..journal import Journal

    note = args.note.strip()
    if not note:
        raise UsageError("--note must say why (it is kept with the entry)")
    journal = _app_journal(args) if args.app else Journal(journal_store(args))
    try:
        resolved = journal.resolve(args.target, note=note[:2000])
    except KeyError:
        resolved = None
    if not resolved:
        print(f"{PROG}: no journal entry for {printable(args.target)!r}", file=sys.stderr)
        return 1
    entry = resolved if isinstance(resolved, JournalEntry) else journal.get(args.target)
    shown = printable(entry.run_id or entry.key) if entry is not None else printable(args.target)
    if args.json:
        print(json.dumps({"resolved": entry.summary() if entry is not None else args.target}))
    else:
        print(f"{shown}: resolved (kept, never replayed in bulk)")
    return 0


def run_resend(args: argparse.Namespace) -> int:
    from .send import _target

    _target(args.to)  # the same checks as send: http(s), a host, no spaces
    journal = _app_journal(args)
    try:
        status = journal.resend(args.target, args.to)
    except KeyError:
        print(f"{PROG}: no journal entry for {printable(args.target)!r}", file=sys.stderr)
        return 1
    except LookupError as exc:  # a body dropped by the journal's byte limit
        print(f"{PROG}: cannot resend: {printable(exc, 300)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{PROG}: cannot deliver to {printable(args.to)}: {printable(exc, 300)}",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps({"url": args.to, "status": status}))
    else:
        print(f"{printable(args.to)} answered {status}")
    return 0 if 200 <= status < 300 else 1


def run_sweep(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from ..errors import ConfigurationError

    journal = _app_journal(args)
    older_than = args.older_than if args.older_than is not None else timedelta(minutes=5)
    try:
        jobs = list(journal.sweep(older_than=older_than))
    except ConfigurationError as exc:  # a receiver without a queue: nothing to send to
        raise UsageError(f"{printable(args.app)}: {printable(exc, 300)}") from None
    sent = [{"key": job.key, "handler": job.handler} for job in jobs]
    if args.json:
        print(json.dumps({"enqueued": sent}, indent=2))
        return 0
    for job in sent:
        print(f"{printable(job['key'])}: {printable(job['handler'])} enqueued again")
    print(f"enqueued {len(sent)} deferred handler run(s) again")
    return 0
