"""``manage.py flymy_journal list|show|replay|refusals``: the delivery journal from a shell.

Reads go to the configured receiver's journal (``FLYMY_RECEIVER`` or
``flymy_receiver.django.register``), else straight to ``DjangoStore(using=--database)``;
``replay`` needs the receiver, since it runs the application's handlers. ``--json`` prints
JSON instead of a table.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ....errors import ConfigurationError, EventInFlight, StoreUnavailable
from ....journal import Journal
from ....stores.base import JournalStore
from ....stores.records import JournalEntry
from ...display import pretty_body, printable
from ...registry import SETTING, configured_receiver
from ...store import DjangoStore

_SPAN = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class Command(BaseCommand):
    help = "List, show and replay the FlyMy.AI delivery journal; list refusals."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(
            dest="action", required=True, metavar="list|show|replay|refusals"
        )

        def action(name: str, help: str) -> CommandParser:
            command: CommandParser = sub.add_parser(name, help=help)
            command.add_argument("--json", action="store_true", help="print JSON, not a table")
            command.add_argument(
                "--database", default="default", help="the DjangoStore's database alias"
            )
            return command

        listing = action("list", "entries, newest first")
        listing.add_argument("--state", choices=["pending", "handled", "failed", "ignored"])
        listing.add_argument("--failed", action="store_true", help="the same as --state failed")
        listing.add_argument("--event")
        listing.add_argument("--agent", help="an agent id")
        listing.add_argument("--since", help="7d, 12h, 30m or an ISO date")
        listing.add_argument("--limit", type=int, default=50)
        show = action("show", "one entry: outcomes, tracebacks and body")
        show.add_argument("entry", help="a run id or an idempotency key")
        replay = action("replay", "run the handlers not yet ok (--force: all)")
        replay.add_argument("entries", nargs="*", help="run ids or idempotency keys")
        replay.add_argument("--failed", action="store_true", help="every failed entry")
        replay.add_argument("--since", help="with --failed: 7d, 12h, 30m or an ISO date")
        replay.add_argument("--force", action="store_true", help="every handler again")
        refusals = action("refusals", "refused deliveries, newest first")
        refusals.add_argument("--limit", type=int, default=50)

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        try:
            if action == "replay":
                self._replay(options)
                return
            reader = self._reader(options["database"])
            if action == "list":
                self._list(reader, options)
            elif action == "show":
                self._show(reader, options)
            else:
                self._refusals(reader, options)
        except (ConfigurationError, StoreUnavailable) as exc:
            raise CommandError(str(exc)) from None

    # -- the actions ----------------------------------------------------------------------

    def _list(self, reader: Journal | JournalStore, options: dict[str, Any]) -> None:
        state = "failed" if options["failed"] else options["state"]
        entries = reader_list(
            reader,
            state=state,
            event=options["event"],
            agent_id=options["agent"],
            since=_since(options["since"]),
            limit=max(1, options["limit"]),
        )
        if options["json"]:
            self._json({"entries": [entry.summary() for entry in entries]})
            return
        if not entries:
            self.stdout.write("no entries")
            return
        rows = [
            [
                _when(entry.received_at),
                entry.state,
                str(entry.attempts),
                entry.event,
                entry.run_id or "-",
                entry.agent_name or entry.agent_id or "-",
            ]
            for entry in entries
        ]
        self._table(["received (UTC)", "state", "attempts", "event", "run id", "agent"], rows)

    def _show(self, reader: Journal | JournalStore, options: dict[str, Any]) -> None:
        entry = reader_get(reader, options["entry"])
        if entry is None:
            raise CommandError(f"no journal entry for {printable(options['entry'][:200])}")
        if options["json"]:
            body = entry.body.decode("utf-8", errors="replace")
            self._json({**entry.summary(), "headers": dict(entry.headers), "body": body})
            return
        lines = [
            f"key       {entry.key}",
            f"event     {entry.event}",
            f"run id    {entry.run_id or '-'}",
            f"agent     {entry.agent_name or '-'} ({entry.agent_id or '-'})",
            f"state     {entry.state}",
            f"attempts  {entry.attempts}",
            f"received  {_when(entry.received_at)} UTC",
            f"updated   {_when(entry.updated_at)} UTC",
            "handlers",
        ]
        if not entry.handlers:
            lines.append("  none ran yet")
        for name, outcome in entry.handlers.items():
            lines.append(f"  {name}  {'ok' if outcome.ok else 'failed'}  {outcome.error or ''}")
            if outcome.traceback:
                lines.extend("    " + line for line in outcome.traceback.rstrip().splitlines())
        lines += ["body", pretty_body(entry.body)]
        self.stdout.write(printable("\n".join(lines), newlines=True))

    def _replay(self, options: dict[str, Any]) -> None:
        receiver = configured_receiver()
        if receiver is None:
            raise CommandError(
                f"replay runs your handlers, so it needs your receiver: set {SETTING} = "
                '"myapp.webhooks:receiver" in settings, or call '
                "flymy_receiver.django.register(receiver)"
            )
        journal = receiver.journal
        if journal is None:
            raise CommandError("the configured receiver keeps no journal (journal=False)")
        if options["failed"] == bool(options["entries"]):
            raise CommandError("replay takes run ids or keys, or --failed (not both)")
        results: list[dict[str, Any]] = []
        if options["failed"]:
            for entry in journal.replay_failed(since=_since(options["since"])):
                results.append({"key": entry.key, "run_id": entry.run_id, "state": entry.state})
        for wanted in options["entries"]:
            result: dict[str, Any] = {"entry": wanted}
            try:
                entry = journal.replay(wanted, force=options["force"])
            except KeyError:
                result["error"] = "not in the journal"
            except EventInFlight:
                result["error"] = "being handled right now, try again later"
            else:
                result.update(key=entry.key, run_id=entry.run_id, state=entry.state)
            results.append(result)
        if options["json"]:
            self._json({"replayed": results})
        elif not results:
            self.stdout.write("no failed entries")
        else:
            rows = [
                [r.get("run_id") or r.get("entry") or "-", r.get("state") or r["error"]]
                for r in results
            ]
            self._table(["run id", "state now"], rows)
        if any(r.get("error") or r.get("state") == "failed" for r in results):
            raise CommandError("some entries were not handled")

    def _refusals(self, reader: Journal | JournalStore, options: dict[str, Any]) -> None:
        refusals = reader.refusals(max(1, options["limit"]))
        if options["json"]:
            self._json({"refusals": [refusal.to_dict() for refusal in refusals]})
            return
        if not refusals:
            self.stdout.write("no refusals")
            return
        rows = [[_when(r.at), str(r.status), r.reason, r.detail] for r in refusals]
        self._table(["at (UTC)", "status", "reason", "detail"], rows)

    # -- pieces -----------------------------------------------------------------------------

    def _reader(self, database: str) -> Journal | JournalStore:
        receiver = configured_receiver()
        if receiver is not None and receiver.journal is not None:
            return receiver.journal
        return DjangoStore(using=database)

    def _table(self, header: list[str], rows: list[list[str]]) -> None:
        cells = [[printable(cell) for cell in row] for row in rows]
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
        widths[-1] = 0  # the last column is not padded
        for row in [header, *cells]:
            self.stdout.write(
                "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            )

    def _json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2))


def reader_list(reader: Journal | JournalStore, **filters: Any) -> list[JournalEntry]:
    """``list`` of a journal or a journaling store (the store's filters are keywords)."""
    if isinstance(reader, Journal):
        return reader.list(**filters)
    return reader.journal_list(**filters)


def reader_get(reader: Journal | JournalStore, wanted: str) -> JournalEntry | None:
    """``get`` of a journal or a journaling store."""
    return reader.get(wanted) if isinstance(reader, Journal) else reader.journal_get(wanted)


def _since(text: str | None) -> datetime | None:
    if not text:
        return None
    span = _SPAN.match(text.strip())
    if span:
        delta = timedelta(**{_UNITS[span.group(2)]: int(span.group(1))})
        return datetime.now(timezone.utc) - delta
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(
            f"--since takes 7d, 12h, 30m or an ISO date, not {text[:40]!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
