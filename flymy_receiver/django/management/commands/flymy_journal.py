"""``manage.py flymy_journal``: the delivery journal from a shell, as ``flymy-receiver journal``.

``list``, ``show``, ``replay``, ``resolve``, ``resend``, ``sweep`` and ``refusals``, with the
same options and the same table columns as the ``flymy-receiver journal`` command line.
The journal is the configured receiver's (``FLYMY_RECEIVER`` or
``flymy_receiver.django.register``); without one, ``list``, ``show``, ``resolve`` and
``refusals`` read ``DjangoStore(using=--database)``, while ``replay``, ``resend`` and
``sweep`` refuse: they need the receiver's handlers, secret or queue. ``--database`` is
refused where it cannot apply (the receiver's journal is elsewhere), never ignored. Each
bad value is one ``CommandError`` line; ``--json`` prints JSON instead of a table.
"""

from __future__ import annotations

import json
import shlex
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from .... import tables
from ....errors import ConfigurationError, EventInFlight, StoreUnavailable
from ....journal import Journal
from ....stores.records import ENTRY_STATES, JournalEntry
from ...display import pretty_body, printable
from ...registry import SETTING, configured_receiver
from .. import arguments

#: What ``sweep`` re-sends by default: deferred handlers queued or leased this long ago.
DEFAULT_OLDER_THAN = timedelta(minutes=5)

NEEDS_RECEIVER = (
    "{action} needs your receiver ({why}): set "
    f'{SETTING} = "myapp.webhooks:receiver" in settings, or call '
    "flymy_receiver.django.register(receiver)"
)


class Command(BaseCommand):
    help = (
        "The FlyMy.AI delivery journal: list, show, replay, resolve and resend entries; "
        "sweep deferred handlers; list refusals."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(
            dest="action",
            required=True,
            metavar="list|show|replay|resolve|resend|sweep|refusals",
        )

        def action(name: str, help: str) -> CommandParser:
            command: CommandParser = sub.add_parser(name, help=help)
            command.add_argument("--json", action="store_true", help="print JSON, not a table")
            command.add_argument(
                "--database",
                help="the DjangoStore's database alias, when no receiver is configured "
                "(or the configured receiver's own)",
            )
            return command

        def filters(command: CommandParser) -> None:
            command.add_argument("--event", help="only this event name")
            command.add_argument("--agent", "--agent-id", dest="agent", help="only this agent id")
            command.add_argument("--since", help="received since: 30m, 12h, 7d or an ISO date")

        listing = action("list", "entries, newest first")
        listing.add_argument("--state", choices=ENTRY_STATES)
        listing.add_argument("--failed", action="store_true", help="the same as --state failed")
        filters(listing)
        listing.add_argument("--until", help="received before: 30m, 12h, 7d or an ISO date")
        listing.add_argument("--run-id", help="only this run's entries")
        listing.add_argument("--before", metavar="KEY", help="the page after the entry KEY")
        listing.add_argument(
            "--limit", default="50", help=f"at most this many, 1 to {arguments.MAX_LIMIT}"
        )

        show = action("show", "one entry: handlers, history, tracebacks and body")
        show.add_argument("entry", metavar="KEY", help="a run id or an idempotency key")

        replay = action("replay", "run the handlers not yet ok (--force: all)")
        replay.add_argument("entries", nargs="*", metavar="KEY", help="run ids or keys")
        replay.add_argument("--failed", action="store_true", help="every failed entry (filtered)")
        filters(replay)
        replay.add_argument("--until", help="received before: 30m, 12h, 7d or an ISO date")
        replay.add_argument("--dry-run", action="store_true", help="say what would run; run none")
        replay.add_argument("--per-second", help="at most this many replays a second")
        replay.add_argument("--force", action="store_true", help="every handler again")

        resolve = action("resolve", "dismiss an entry that will never succeed")
        resolve.add_argument("entry", metavar="KEY")
        resolve.add_argument("--note", required=True, help="why (kept with the entry)")

        resend = action("resend", "POST the stored body, signed afresh, to another URL")
        resend.add_argument("entry", metavar="KEY")
        resend.add_argument("--to", required=True, metavar="URL", help="http(s)://host/path")

        sweep = action("sweep", "enqueue again deferred handlers still queued or stalled")
        sweep.add_argument(
            "--older-than", default="5m", help="queued or leased this long ago (5m; 0s: all)"
        )

        refusals = action("refusals", "refused deliveries, newest first")
        refusals.add_argument(
            "--limit", default="50", help=f"at most this many, 1 to {arguments.MAX_LIMIT}"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        run = getattr(self, f"_{options['action']}")
        try:
            run(options)
        except (ConfigurationError, StoreUnavailable) as exc:
            raise CommandError(printable(str(exc)[:500])) from None

    # -- the actions ----------------------------------------------------------------------

    def _list(self, options: dict[str, Any]) -> None:
        if options["failed"] and options["state"] not in (None, "failed"):
            raise CommandError("--failed and --state say different things: give one")
        limit = arguments.limit(options["limit"])
        since, until = _moment(options, "since"), _moment(options, "until")
        journal = self._journal(options)
        entries = journal.list(
            state="failed" if options["failed"] else options["state"],
            event=options["event"],
            agent_id=options["agent"],
            run_id=options["run_id"],
            since=since,
            until=until,
            before=options["before"],
            limit=limit,
        )
        # A full page may have older entries after it (keyset pages): say how to get them.
        older = entries[-1].key if len(entries) == limit else None
        if options["json"]:
            self._json({"deliveries": [entry.summary() for entry in entries], "before": older})
            return
        if not entries:
            self.stdout.write("no journaled deliveries")
            return
        self._lines(tables.entries_table(entries))
        if older is not None:
            self.stdout.write(f"older entries: add --before {shlex.quote(printable(older))}")

    def _show(self, options: dict[str, Any]) -> None:
        journal = self._journal(options)
        entry = journal.get(options["entry"])
        if entry is None:
            raise CommandError(f"no journal entry for {_named(options['entry'])}")
        if options["json"]:
            body = entry.body.decode("utf-8", errors="replace") if entry.body is not None else None
            self._json({**entry.summary(), "headers": dict(entry.headers), "body": body})
            return
        self.stdout.write(printable(_details(entry), newlines=True))

    def _replay(self, options: dict[str, Any]) -> None:
        bulk = ("since", "until", "event", "agent", "per_second")
        if options["failed"] == bool(options["entries"]):
            raise CommandError("replay takes run ids or keys, or --failed (not both)")
        if options["entries"] and (options["dry_run"] or any(options[o] for o in bulk)):
            raise CommandError(
                "--since, --until, --event, --agent, --dry-run and --per-second choose "
                "entries for --failed; they do not apply to named entries"
            )
        if options["failed"] and options["force"]:
            raise CommandError("--force applies to named entries, not to --failed")
        since, until = _moment(options, "since"), _moment(options, "until")
        per_second = arguments.per_second(options["per_second"]) if options["per_second"] else None
        journal = self._journal(options, needs="replay", why="it runs your handlers")
        if options["failed"]:
            self._replay_failed(journal, options, since, until, per_second)
            return
        results: list[dict[str, Any]] = []
        for wanted in options["entries"]:
            try:
                entry = journal.replay(wanted, force=options["force"])
            except KeyError:
                results.append({"key": wanted, "state": "unknown"})
            except LookupError:
                results.append({"key": wanted, "state": "body not kept (journal byte limit)"})
            except EventInFlight:
                results.append({"key": wanted, "state": "in flight (a delivery holds it)"})
            else:
                results.append(_replayed(entry))
        self._results(options, results)

    def _replay_failed(
        self,
        journal: Journal,
        options: dict[str, Any],
        since: Any,
        until: Any,
        per_second: float | None,
    ) -> None:
        report = journal.replay_all(
            state="failed",
            event=options["event"],
            agent_id=options["agent"],
            since=since,
            until=until,
            dry_run=options["dry_run"],
            per_second=per_second,
        )
        if options["dry_run"]:
            matched = list(report.matched)
            if options["json"]:
                self._json({"dry_run": True, "matched": matched})
                return
            self.stdout.write(f"{len(matched)} failed entries would be replayed (dry run)")
            for key in matched:
                self.stdout.write(f"  {printable(key[:200])}")
            return
        results = [{"key": key, "state": "handled"} for key in report.handled]
        results += [{"key": key, "state": "failed"} for key in report.failed]
        results += [{"key": key, "state": "in flight (skipped)"} for key in report.in_flight]
        self._results(options, results, matched=len(report.matched))

    def _results(
        self, options: dict[str, Any], results: list[dict[str, Any]], matched: int | None = None
    ) -> None:
        if options["json"]:
            self._json({"replayed": results})
        elif not results:
            self.stdout.write("nothing to replay" if matched is None else "no failed entries")
        else:
            rows = [[tables.cell(r.get("run_id") or r["key"]), str(r["state"])] for r in results]
            self._lines(tables.render(["RUN ID OR KEY", "STATE NOW"], rows))
        still = sum(1 for r in results if r["state"] != "handled")
        if still:
            raise CommandError(f"{still} of {len(results)} entries are not handled")

    def _resolve(self, options: dict[str, Any]) -> None:
        note = options["note"].strip()
        if not note:
            raise CommandError("--note says why the entry is resolved; it cannot be empty")
        journal = self._journal(options)
        try:
            entry = journal.resolve(options["entry"], note=note)
        except KeyError:
            raise CommandError(f"no journal entry for {_named(options['entry'])}") from None
        if options["json"]:
            self._json({"resolved": entry.key, "state": entry.state, "note": entry.note})
        else:
            self.stdout.write(f"{_named(entry.run_id or entry.key)}: {entry.state}")

    def _resend(self, options: dict[str, Any]) -> None:
        url = options["to"].strip()
        if not url.lower().startswith(("http://", "https://")) or len(url) > 2000:
            raise CommandError(f"--to takes an http:// or https:// URL, not {_named(url)}")
        journal = self._journal(options, needs="resend", why="it signs with your receiver's secret")
        try:
            status = journal.resend(options["entry"], url)
        except KeyError:
            raise CommandError(f"no journal entry for {_named(options['entry'])}") from None
        except LookupError:
            raise CommandError(
                f"{_named(options['entry'])}: the journal did not keep its body (byte limit)"
            ) from None
        except (OSError, ValueError) as exc:  # unreachable (ResendFailed), or not http(s)
            raise CommandError(
                f"could not send to {_named(url)}: {printable(str(exc)[:200])}"
            ) from None
        if options["json"]:
            self._json({"resent": options["entry"], "to": url, "status": status})
        else:
            self.stdout.write(f"{_named(url)} answered {status}")
        if not 200 <= status < 300:
            raise CommandError(f"the app at {_named(url)} answered {status}, not 2xx")

    def _sweep(self, options: dict[str, Any]) -> None:
        older_than = arguments.span(options["older_than"], "--older-than", zero=True)
        journal = self._journal(options, needs="sweep", why="it enqueues on your receiver's queue")
        jobs = journal.sweep(older_than=older_than)
        if options["json"]:
            self._json({"swept": [{"key": job.key, "handler": job.handler} for job in jobs]})
            return
        self.stdout.write(f"{len(jobs)} deferred handler jobs sent again")
        for job in jobs[:1000]:
            self.stdout.write(f"  {printable(job.key[:200])}  {printable(job.handler[:200])}")

    def _refusals(self, options: dict[str, Any]) -> None:
        limit = arguments.limit(options["limit"])
        refusals = self._journal(options).refusals(limit)
        if options["json"]:
            self._json({"refusals": [refusal.to_dict() for refusal in refusals]})
        elif not refusals:
            self.stdout.write("no refusals recorded")
        else:
            self._lines(tables.refusals_table(refusals))

    # -- pieces -----------------------------------------------------------------------------

    def _journal(self, options: dict[str, Any], needs: str = "", why: str = "") -> Journal:
        """The configured receiver's journal; without a receiver, for reads and resolve,
        ``DjangoStore(using=--database)``. ``--database`` must agree with the receiver's."""
        database: str | None = options["database"]
        receiver = configured_receiver()
        if receiver is not None:
            journal = receiver.journal
            if journal is None:
                raise CommandError("the configured receiver keeps no journal (journal=False)")
            if database is not None and _alias(journal) != database:
                raise CommandError(
                    f"--database {printable(database[:100])} does not apply: the configured "
                    f"receiver's journal is in {_where(journal)}"
                )
            return journal
        if needs:
            raise CommandError(NEEDS_RECEIVER.format(action=needs, why=why))
        from django.db import connections

        from ...store import DjangoStore

        alias = database or "default"
        if alias not in connections.settings:
            raise CommandError(f"--database {printable(alias[:100])} is not in settings.DATABASES")
        _check_migrated(alias)
        return Journal(DjangoStore(using=alias))

    def _lines(self, lines: list[str]) -> None:
        self.stdout.write("\n".join(lines))

    def _json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2))


def _check_migrated(alias: str) -> None:
    """A database without the app's tables is a clear error, not a failed query."""
    from django.db import DatabaseError, connections

    from ...models import JournalEntry as Row

    try:
        with connections[alias].cursor() as cursor:
            tables = connections[alias].introspection.table_names(cursor)
    except DatabaseError as exc:
        raise CommandError(f"database {alias!r} cannot be read: {type(exc).__name__}") from None
    if Row._meta.db_table not in tables:
        raise CommandError(
            f"database {alias!r} has no journal: run manage.py migrate flymy_receiver "
            f"--database {alias} (with flymy_receiver.django in INSTALLED_APPS)"
        )


def _moment(options: dict[str, Any], name: str) -> Any:
    text = options.get(name)
    return arguments.moment(text, f"--{name}") if text else None


def _named(text: str) -> str:
    return repr(printable(text[:200] + ("…" if len(text) > 200 else "")))


def _alias(journal: Journal) -> str | None:
    from ...store import DjangoStore

    store = journal.store
    return store.using if isinstance(store, DjangoStore) else None


def _where(journal: Journal) -> str:
    alias = _alias(journal)
    return f"database {alias!r}" if alias is not None else type(journal.store).__name__


def _replayed(entry: JournalEntry) -> dict[str, Any]:
    last = entry.history[-1].outcome if entry.history else ""
    state = "no handler ran" if last == "no_handler" else entry.state
    return {"key": entry.key, "run_id": entry.run_id, "state": state}


def _details(entry: JournalEntry) -> str:
    """What ``show`` prints, as ``flymy-receiver journal show --body`` does: the facts, the
    history, each handler (a deferred one with its state and attempts), the body."""
    lines = tables.entry_details(entry)
    if entry.body is None:
        lines.append("body:      dropped (the journal's byte limit)")
    else:
        lines += ["body:", pretty_body(entry.body)]
    return "\n".join(lines)
