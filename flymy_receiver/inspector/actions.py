"""What the inspector's forms do: Replay, bulk replay (a dry-run count first), Resolve, Resend
and "send a test event".

Every action is a form POST guarded by :class:`~flymy_receiver.inspector.access.AccessGuard`
(same origin) and the page's CSRF token, bounded in size. Replay, Resend and the test event
need the app's receiver (its handlers, its secret); Resolve only writes a state and a note.
Store calls and handlers run in worker threads, never on the event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..bodies import aread_limited
from ..errors import EventInFlight, MalformedEvent
from ..events import UnknownEvent
from ..journal import Journal
from ..signature import SIGNATURE_HEADER
from ..stores.records import JournalEntry
from . import queries
from .pages import Pages, no_list
from .site import Site, base, delivery_path, plain, store_failed

__all__ = ["Actions", "replay_notice"]

logger = logging.getLogger("flymy_receiver")

_MAX_FORM = 1024 * 1024
_MAX_NOTE = 2000
_NO_RECEIVER = "needs the app's receiver: start the inspector with --app module:receiver."
_NO_SENDER = (
    "Sending a test event needs the app's receiver (its secret and handlers): "
    "start the inspector with --app module:receiver."
)


def replay_notice(entry: JournalEntry) -> str:
    """The notice code that says what a replay did, read from the entry's newest replay."""
    for attempt in reversed(entry.history):
        if attempt.source == "replay":
            outcome = attempt.outcome
            break
    else:
        outcome = entry.state
    if outcome == "no_handler":
        return "replay-no-handler"
    if outcome == "queued" or entry.state == "queued":
        return "replay-queued"
    if outcome == "handled" and entry.state == "handled":
        return "replay-handled"
    return "replay-failed"


class Actions:
    def __init__(self, site: Site, pages: Pages) -> None:
        self.site = site
        self.pages = pages

    async def replay(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        key = form.get("key", "")
        receiver = self.site.receiver
        if receiver is None or receiver.journal is None:
            message = f"Replay {_NO_RECEIVER}"
            return await run_in_threadpool(self.pages.detail, request, key, 409, message)
        journal = receiver.journal
        try:
            entry = await run_in_threadpool(journal.replay, key, form.get("force") == "on")
        except KeyError:
            return self.site.page(
                request, "delivery.html", 404, entry=None, problem="No delivery with this key."
            )
        except EventInFlight:
            message = "This delivery is being handled right now; replay it once that ends."
            return await run_in_threadpool(self.pages.detail, request, key, 409, message)
        except LookupError:
            message = "Its body was dropped (the journal's byte limit): it cannot be replayed."
            return await run_in_threadpool(self.pages.detail, request, key, 409, message)
        except Exception as exc:  # StoreUnavailable, or a store that failed otherwise
            return await run_in_threadpool(self.pages.detail, request, key, 503, store_failed(exc))
        where = delivery_path(base(request), entry.key)
        return RedirectResponse(f"{where}?notice={replay_notice(entry)}", 303)

    async def replay_all(self, request: Request) -> Response:
        """Bulk replay of what the list's filters show: a dry run (the count) unless
        ``confirm`` is set; ``state`` defaults to failed (stalled included)."""
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        receiver = self.site.receiver
        if receiver is None or receiver.journal is None:
            return self.site.page(
                request, "index.html", 409, problem=f"Bulk replay {_NO_RECEIVER}", **no_list()
            )
        try:
            wanted = queries.filters({**form, "limit": ""})
        except queries.BadQuery as exc:
            return self.site.page(request, "index.html", 400, problem=str(exc), **no_list())
        state = wanted["state"] or "failed"
        if state == "resolved":
            return self.site.page(
                request, "index.html", 400, problem="Resolved entries are never replayed in bulk.",
                **no_list(),
            )  # fmt: skip
        options = {
            "state": state,
            "event": wanted["event"],
            "agent_id": wanted["agent_id"],
            "since": wanted["since"],
            "until": wanted["until"],
        }
        confirmed = form.get("confirm") == "yes"
        try:
            report = await run_in_threadpool(
                _replay_matching, receiver.journal, options, wanted["run_id"], not confirmed
            )
        except Exception as exc:
            return self.site.page(
                request, "index.html", 503, problem=store_failed(exc), **no_list()
            )
        filters = {name: form.get(name, "") for name in queries.FILTER_NAMES if name != "before"}
        if not confirmed:
            bulk = {"count": len(report["matched"]), "state": state, "filters": filters}
            return await run_in_threadpool(self._index_with, request, filters, bulk)
        counts = {name: len(keys) for name, keys in report.items()}
        query = urlencode({**{k: v for k, v in filters.items() if v}, "notice": "bulk", **counts})
        return RedirectResponse(f"{base(request)}?{query}", 303)

    def _index_with(
        self, request: Request, filters: Mapping[str, str], bulk: dict[str, Any]
    ) -> Response:
        # The dry run's answer is the list page for the same filters, with the count to confirm.
        scope = dict(request.scope)
        scope["query_string"] = urlencode({k: v for k, v in filters.items() if v}).encode()
        return self.pages.index(Request(scope), bulk=bulk)

    async def resolve(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        key = form.get("key", "")
        journal = self.site.journal
        note = form.get("note", "").strip()
        if journal is None:
            return await run_in_threadpool(self.pages.detail, request, key, 404)
        if not note:
            message = "Say why in the note: it is kept with the entry."
            return await run_in_threadpool(self.pages.detail, request, key, 400, message)
        try:
            entry = await run_in_threadpool(journal.resolve, key, note[:_MAX_NOTE])
        except KeyError:
            return self.site.page(
                request, "delivery.html", 404, entry=None, problem="No delivery with this key."
            )
        except Exception as exc:
            return await run_in_threadpool(self.pages.detail, request, key, 503, store_failed(exc))
        return RedirectResponse(f"{delivery_path(base(request), entry.key)}?notice=resolved", 303)

    async def resend(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        key = form.get("key", "")
        url = form.get("url", "").strip()[:2000]
        receiver = self.site.receiver
        if receiver is None or receiver.journal is None:
            message = f"Resend {_NO_RECEIVER} (its secret signs the delivery)"
            return await run_in_threadpool(self.pages.detail, request, key, 409, message, None, url)
        try:
            status = await run_in_threadpool(receiver.journal.resend, key, url)
        except KeyError:
            return self.site.page(
                request, "delivery.html", 404, entry=None, problem="No delivery with this key."
            )
        except LookupError:
            message = "Its body was dropped (the journal's byte limit): it cannot be resent."
            return await run_in_threadpool(self.pages.detail, request, key, 409, message, None, url)
        except (OSError, ValueError) as exc:  # unreachable, or not an http(s) URL
            message = f"Could not resend: {str(exc)[:300]}"
            return await run_in_threadpool(self.pages.detail, request, key, 400, message, None, url)
        except Exception as exc:
            return await run_in_threadpool(self.pages.detail, request, key, 503, store_failed(exc))
        notice = f"Resent to {url[:300]}: it answered {status}."
        if not 200 <= status < 300:
            message = f"Resent to {url[:300]}, but it answered {status}."
            return await run_in_threadpool(self.pages.detail, request, key, 200, message, None, url)
        return await run_in_threadpool(self.pages.detail, request, key, 200, None, notice, url)

    async def send(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        site = self.site
        if site.receiver is None or site.deliver is None:
            return site.page(request, "index.html", 409, problem=_NO_SENDER, **no_list())
        try:
            body, run_id = _test_event(form)
        except ValueError as exc:
            return site.page(request, "index.html", 400, problem=str(exc), **no_list(form))
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: site.receiver.sign(body)}
        answer = await run_in_threadpool(site.deliver, body, headers)
        entry = None
        if site.journal is not None and run_id is not None:
            try:
                entry = await run_in_threadpool(site.journal.get, run_id)
            except Exception as exc:
                logger.warning("inspector: store failed after a test event: %r", type(exc))
        query = f"?notice=sent&status={answer.status}"
        if entry is None:
            return RedirectResponse(f"{base(request)}{query}", 303)
        return RedirectResponse(f"{delivery_path(base(request), entry.key)}{query}", 303)

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The urlencoded form of a POST, bounded in size, with its CSRF token checked."""
        from .access import same_token

        length = request.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and (len(length) > 9 or int(length) > _MAX_FORM):
            return plain(413, "form too large")
        raw = await aread_limited(request.stream(), _MAX_FORM)
        if len(raw) > _MAX_FORM:
            return plain(413, "form too large")
        try:
            parsed = parse_qs(raw.decode("utf-8"), max_num_fields=20, keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return plain(400, "unreadable form")
        form = {name: values[0] for name, values in parsed.items()}
        csrf = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if not same_token(csrf, self.site.csrf):
            return plain(403, "this form is out of date or not from this page: reload the page")
        return form


def _replay_matching(
    journal: Journal, options: dict[str, Any], run_id: str | None, dry_run: bool
) -> dict[str, list[str]]:
    """:meth:`Journal.replay_all` over ``options``; with a run id (which it does not take),
    the same over the entries of that run, listed (summaries) and replayed one by one."""
    if run_id is None:
        report = journal.replay_all(**options, dry_run=dry_run)
        return {
            "matched": list(report.matched),
            "handled": list(report.handled),
            "failed": list(report.failed),
            "in_flight": list(report.in_flight),
        }
    listed = journal.list(**options, run_id=run_id, limit=queries.MAX_LIMIT)
    done: dict[str, list[str]] = {"matched": [e.key for e in listed if e.state != "resolved"]}
    done.update(handled=[], failed=[], in_flight=[])
    for key in [] if dry_run else done["matched"]:
        try:
            entry = journal.replay(key)
        except EventInFlight:
            done["in_flight"].append(key)
        except LookupError:  # gone meanwhile, or its body dropped
            done["failed"].append(key)
        else:
            done["handled" if entry.state == "handled" else "failed"].append(key)
    return done


def _test_event(form: Mapping[str, str]) -> tuple[bytes, str | None]:
    """The body of a test event described by the page's form, and its run id.

    ``data`` is JSON, as with ``flymy-receiver send --data``: the output of
    ``run.completed``, the error of ``run.failed``, the data fields of another event.
    """
    from ..testing import data_fields, make_event, serialize

    name = form.get("event", "").strip() or "run.completed"
    fields: dict[str, Any] = {}
    for field in ("event", "run_id", "agent_id", "agent_name"):
        if len(form.get(field, "")) > queries.MAX_TEXT:
            raise ValueError(f"{field} is longer than {queries.MAX_TEXT} characters")
    raw = form.get("data", "").strip()
    if raw:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"the data is not JSON: {str(exc)[:200]}") from None
        fields = data_fields(name, data)
    for field in ("run_id", "agent_id", "agent_name"):
        value = form.get(field, "").strip()
        if value:
            fields[field] = value
    try:
        event = make_event(name, **fields)
    except MalformedEvent as exc:
        raise ValueError(f"that does not make a valid {name[:100]} event: {exc}") from None
    run_id = event.run_id if isinstance(event, UnknownEvent) else event.data.run_id
    return serialize(event), (str(run_id) if run_id is not None else None)
