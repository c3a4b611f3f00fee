"""The inspector's ASGI app: the delivery journal as pages, and the same data as JSON.

Pages are rendered on the server (Jinja2, autoescaped: a payload is always text) and a small
script refreshes the list from ``GET /api/deliveries`` every second, building rows with
``textContent`` only. Replay and "send a test event" are form POSTs guarded by
:class:`~flymy_receiver.inspector.access.AccessGuard` and a CSRF token, and need the app's
receiver (its handlers and its secret); over a bare store the page is read-only and says so.
Store calls and handlers run in worker threads, never on the event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import orjson
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..bodies import aread_limited
from ..errors import EventInFlight, MalformedEvent
from ..events import UnknownEvent
from ..journal import Journal
from ..receiver import Receiver
from ..receiver import Response as ReceiverResponse
from ..signature import SIGNATURE_HEADER, sign
from ..stores.base import JournalStore, Store, journals
from ..stores.records import ENTRY_STATES, JournalEntry
from .access import AccessGuard, new_csrf_token, same_token

__all__ = ["BODY_SHOWN", "Deliver", "inspector_app"]

logger = logging.getLogger("flymy_receiver")

HERE = Path(__file__).resolve().parent
#: A body longer than this (pretty-printed characters) is cut on the page; the API has it all.
BODY_SHOWN = 100_000
_MAX_LIMIT = 1000
_MAX_FORM = 1024 * 1024
_MAX_TEXT = 200  # event names, run ids, agent fields of a test event
#: Notices a redirect may ask a page to show (never free text from the query string).
_NOTICES = {
    "replayed": "Replayed.",
    "sent": "Test event sent.",
}

#: Hands a signed test event to the receiver; returns what the receiver answered.
Deliver = Callable[[bytes, Mapping[str, str]], ReceiverResponse]


def inspector_app(
    receiver: Receiver | None = None,
    *,
    store: Store | None = None,
    token: str | None = None,
    label: str | None = None,
    webhook_path: str | None = None,
    deliver: Deliver | None = None,
) -> Starlette:
    """The inspector over ``receiver``'s journal, or read-only over a journaling ``store``.

    With a receiver, Replay runs its handlers and the test-event form signs with its first
    secret and hands the event to ``deliver`` (default :meth:`Receiver.handle`). ``token``
    makes every request need it (see :mod:`.access`). ``webhook_path`` is where the same
    server receives deliveries, shown on the page. Mount it anywhere; it builds its links
    from the mount path.
    """
    if receiver is None and store is None:
        raise ValueError("give the inspector a receiver or a store")
    journal: Journal | None
    if receiver is not None:
        journal = receiver.journal
        store = receiver.store
    elif store is not None and journals(store):
        journal_store: JournalStore = store  # type: ignore[assignment]  # checked just above
        journal = Journal(journal_store)
    else:
        journal = None
    inspector = _Inspector(
        journal=journal,
        receiver=receiver,
        label=label or type(store).__name__,
        webhook_path=webhook_path,
        deliver=deliver or (receiver.handle if receiver is not None else None),
    )
    routes: list[BaseRoute] = [
        Route("/", inspector.index, name="index"),
        Route("/deliveries/{key:path}", inspector.delivery, name="delivery"),
        Route("/replay", inspector.replay, methods=["POST"], name="replay"),
        Route("/send", inspector.send, methods=["POST"], name="send"),
        Route("/api/deliveries", inspector.api_deliveries, name="api_deliveries"),
        Route("/api/deliveries/{key:path}", inspector.api_delivery, name="api_delivery"),
        Route("/api/bodies/{key:path}", inspector.api_body, name="api_body"),
        Route("/api/refusals", inspector.api_refusals, name="api_refusals"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(AccessGuard, token=token)])


class _BadQuery(ValueError):
    """A query parameter the API cannot use; answered 400 with the message."""


class _Inspector:
    def __init__(
        self,
        *,
        journal: Journal | None,
        receiver: Receiver | None,
        label: str,
        webhook_path: str | None,
        deliver: Deliver | None,
    ) -> None:
        self.journal = journal
        self.receiver = receiver
        self.label = label
        self.webhook_path = webhook_path
        self.deliver = deliver
        self.csrf = new_csrf_token()
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = _when
        self.templates.filters["delivery_url"] = _delivery_path
        self.templates.filters["q"] = lambda text: quote(str(text), safe="")

    # -- pages ----------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        try:
            filters = _filters(request.query_params)
        except _BadQuery as exc:
            return self._page(request, "index.html", 400, problem=str(exc), **_no_list())
        deliveries, refusals, problem = [], [], None
        if self.journal is not None:
            try:
                deliveries = [_row(e) for e in self.journal.list(**filters)]
                refusals = [r.to_dict() for r in self.journal.refusals(20)]
            except Exception as exc:
                problem = _store_failed(exc)
        notice = _NOTICES.get(request.query_params.get("notice", ""))
        status = _status_param(request.query_params.get("status"))
        return self._page(
            request,
            "index.html",
            503 if problem else 200,
            deliveries=deliveries,
            refusals=refusals,
            filters=_filter_values(request.query_params),
            problem=problem,
            notice=notice,
            sent_status=status,
            form=_default_form(),
        )

    def delivery(self, request: Request) -> Response:
        return self._detail(request, request.path_params["key"])

    def _detail(
        self, request: Request, key: str, status: int = 200, problem: str | None = None
    ) -> Response:
        if self.journal is None:
            return self._page(request, "delivery.html", 404, entry=None, problem=_NO_JOURNAL)
        try:
            entry = self.journal.get(key)
        except Exception as exc:
            return self._page(request, "delivery.html", 503, entry=None, problem=_store_failed(exc))
        if entry is None:
            return self._page(
                request, "delivery.html", 404, entry=None, problem="No delivery with this key."
            )
        shown, total = _pretty_body(entry.body)
        return self._page(
            request,
            "delivery.html",
            status,
            entry=entry,
            body=shown,
            body_total=total,
            body_cut=len(shown) < total,
            handlers=[_outcome(name, o) for name, o in entry.handlers.items()],
            problem=problem,
            notice=_NOTICES.get(request.query_params.get("notice", "")),
            sent_status=_status_param(request.query_params.get("status")),
        )

    async def replay(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        key = form.get("key", "")
        if self.receiver is None or self.receiver.journal is None:
            return await run_in_threadpool(
                self._detail, request, key, 409, "Replay needs the app's receiver."
            )
        journal = self.receiver.journal
        force = form.get("force") == "on"
        try:
            entry = await run_in_threadpool(journal.replay, key, force)
        except KeyError:
            return self._page(
                request, "delivery.html", 404, entry=None, problem="No delivery with this key."
            )
        except EventInFlight:
            message = "This delivery is being handled right now; replay it once that ends."
            return await run_in_threadpool(self._detail, request, key, 409, message)
        except Exception as exc:  # StoreUnavailable, or a store that failed otherwise
            return await run_in_threadpool(self._detail, request, key, 503, _store_failed(exc))
        return RedirectResponse(f"{_delivery_path(_base(request), entry.key)}?notice=replayed", 303)

    async def send(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        if self.receiver is None or self.deliver is None:
            return self._page(request, "index.html", 409, problem=_NO_SENDER, **_no_list())
        try:
            body, run_id = _test_event(form)
        except ValueError as exc:
            return self._page(request, "index.html", 400, problem=str(exc), **_no_list(form))
        key = self.receiver._keys[0]  # the receiver's own newest secret
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, key)}
        answer = await run_in_threadpool(self.deliver, body, headers)
        entry = None
        if self.journal is not None and run_id is not None:
            try:
                entry = await run_in_threadpool(self.journal.get, run_id)
            except Exception as exc:
                logger.warning("inspector: store failed after a test event: %r", type(exc))
        query = f"?notice=sent&status={answer.status}"
        if entry is None:
            return RedirectResponse(f"{_base(request)}{query}", 303)
        return RedirectResponse(f"{_delivery_path(_base(request), entry.key)}{query}", 303)

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The urlencoded form of a POST, bounded in size, with its CSRF token checked."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length[:20]) > _MAX_FORM:
            return _plain(413, "form too large")
        raw = await aread_limited(request.stream(), _MAX_FORM)
        if len(raw) > _MAX_FORM:
            return _plain(413, "form too large")
        try:
            parsed = parse_qs(raw.decode("utf-8"), max_num_fields=20, keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return _plain(400, "unreadable form")
        form = {name: values[0] for name, values in parsed.items()}
        csrf = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if not same_token(csrf, self.csrf):
            return _plain(403, "this form is out of date or not from this page: reload the page")
        return form

    # -- the JSON API ---------------------------------------------------------------------

    def api_deliveries(self, request: Request) -> Response:
        if self.journal is None:
            return JSONResponse({"error": _NO_JOURNAL}, 404)
        try:
            filters = _filters(request.query_params)
        except _BadQuery as exc:
            return JSONResponse({"error": str(exc)}, 400)
        try:
            entries = self.journal.list(**filters)
        except Exception as exc:
            return JSONResponse({"error": _store_failed(exc)}, 503)
        return JSONResponse({"deliveries": [_row(e) for e in entries]})

    def api_delivery(self, request: Request) -> Response:
        entry = self._entry(request)
        if isinstance(entry, Response):
            return entry
        detail = entry.summary()
        detail["headers"] = dict(entry.headers)
        detail["body"] = entry.body.decode("utf-8", "replace")
        return JSONResponse(detail)

    def api_body(self, request: Request) -> Response:
        entry = self._entry(request)
        if isinstance(entry, Response):
            return entry
        # Exactly what was signed. A sandbox policy: even opened directly it is inert data.
        headers = {"Content-Security-Policy": "default-src 'none'; sandbox"}
        return Response(entry.body, media_type="application/json", headers=headers)

    def api_refusals(self, request: Request) -> Response:
        if self.journal is None:
            return JSONResponse({"error": _NO_JOURNAL}, 404)
        try:
            limit = _limit(request.query_params.get("limit"), default=100)
        except _BadQuery as exc:
            return JSONResponse({"error": str(exc)}, 400)
        try:
            refusals = self.journal.refusals(limit)
        except Exception as exc:
            return JSONResponse({"error": _store_failed(exc)}, 503)
        return JSONResponse({"refusals": [r.to_dict() for r in refusals]})

    def _entry(self, request: Request) -> JournalEntry | Response:
        if self.journal is None:
            return JSONResponse({"error": _NO_JOURNAL}, 404)
        try:
            entry = self.journal.get(request.path_params["key"])
        except Exception as exc:
            return JSONResponse({"error": _store_failed(exc)}, 503)
        if entry is None:
            return JSONResponse({"error": "no delivery with this key or run id"}, 404)
        return entry

    # -- rendering ------------------------------------------------------------------------

    def _page(self, request: Request, template: str, status: int, **context: Any) -> Response:
        base = _base(request)
        webhook_url = None
        if self.webhook_path is not None:
            webhook_url = f"{request.url.scheme}://{request.headers.get('host', '')}"
            webhook_url += self.webhook_path
        html = self.templates.get_template(template).render(
            base=base,
            csrf_token=self.csrf,
            label=self.label,
            webhook_url=webhook_url,
            can_replay=self.receiver is not None and self.receiver.journal is not None,
            can_send=self.receiver is not None and self.deliver is not None,
            has_journal=self.journal is not None,
            states=ENTRY_STATES,
            **{"notice": None, "sent_status": None, "problem": None, **context},
        )
        return HTMLResponse(html, status)


_NO_JOURNAL = "This store keeps no delivery journal, so there is nothing to show."
_NO_SENDER = (
    "Sending a test event needs the app's receiver (its secret and handlers): "
    "start the inspector with --app module:receiver."
)


def _no_list(form: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The context of an index page that shows no list (after a refused form)."""
    return {
        "deliveries": [],
        "refusals": [],
        "filters": {"state": "", "event": "", "agent_id": ""},
        "form": {**_default_form(), **(form or {})},
    }


def _default_form() -> dict[str, str]:
    return {"event": "run.completed", "run_id": "", "agent_id": "", "agent_name": "", "data": ""}


def _base(request: Request) -> str:
    """The inspector's own root path with a final slash, wherever it is mounted."""
    return str(request.scope.get("root_path", "")).rstrip("/") + "/"


def _delivery_path(base: str, key: str) -> str:
    return f"{base}deliveries/{quote(key, safe='')}"


def _filters(query: Mapping[str, str]) -> dict[str, Any]:
    """The journal filters of a query string, checked; raises :class:`_BadQuery`."""
    filters: dict[str, Any] = {"limit": _limit(query.get("limit"), default=100)}
    state = query.get("state") or None
    if state is not None and state not in ENTRY_STATES:
        raise _BadQuery(f"state must be one of {', '.join(ENTRY_STATES)}")
    filters["state"] = state
    for name in ("event", "agent_id"):
        value = (query.get(name) or "").strip()
        if len(value) > _MAX_TEXT:
            raise _BadQuery(f"{name} is longer than {_MAX_TEXT} characters")
        filters[name] = value or None
    since = (query.get("since") or "").strip()
    filters["since"] = _since(since) if since else None
    return filters


def _filter_values(query: Mapping[str, str]) -> dict[str, str]:
    """What the filter form shows: the query's own text (escaped by the template)."""
    return {name: query.get(name, "")[:_MAX_TEXT] for name in ("state", "event", "agent_id")}


def _limit(value: str | None, default: int) -> int:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value[:6]) <= _MAX_LIMIT:
        raise _BadQuery(f"limit must be a whole number from 1 to {_MAX_LIMIT}")
    return int(value)


def _since(value: str) -> datetime:
    """An ISO 8601 time; ``Z`` and a missing offset both mean UTC."""
    try:
        moment = datetime.fromisoformat(value[:64].replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _BadQuery("since must be an ISO 8601 time, like 2025-01-15T10:00:00Z") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _status_param(value: str | None) -> int | None:
    if value is not None and value.isascii() and value.isdigit() and len(value) == 3:
        return int(value)
    return None


def _row(entry: JournalEntry) -> dict[str, Any]:
    """An entry as the list shows it: the summary, tracebacks left to the detail."""
    row = entry.summary()
    row["handlers"] = {
        name: {"ok": o.ok, "error": o.error, "at": o.at} for name, o in entry.handlers.items()
    }
    return row


def _outcome(name: str, outcome: Any) -> dict[str, Any]:
    return {
        "name": name,
        "ok": outcome.ok,
        "error": outcome.error,
        "traceback": outcome.traceback,
        "at": outcome.finished_at if outcome.at else None,
    }


def _when(moment: datetime | str | None) -> str:
    """A time as the page shows it (UTC, to the second); the script formats the same way."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _pretty_body(body: bytes) -> tuple[str, int]:
    """The body indented for reading, cut to :data:`BODY_SHOWN`; and its full length.

    Integers past 64 bits or nesting past orjson's limit are shown as received.
    """
    try:
        text = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, TypeError):
        text = body.decode("utf-8", "replace")
    return text[:BODY_SHOWN], len(text)


def _test_event(form: Mapping[str, str]) -> tuple[bytes, str | None]:
    """The body of a test event described by the page's form, and its run id.

    ``data`` is JSON, as with ``flymy-receiver send --data``: the output of
    ``run.completed``, the error of ``run.failed``, the data fields of another event.
    """
    from ..testing import data_fields, make_event, serialize

    name = form.get("event", "").strip() or "run.completed"
    fields: dict[str, Any] = {}
    for field in ("event", "run_id", "agent_id", "agent_name"):
        if len(form.get(field, "")) > _MAX_TEXT:
            raise ValueError(f"{field} is longer than {_MAX_TEXT} characters")
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


def _store_failed(exc: Exception) -> str:
    # The exception's text could name a server or worse: the log gets its type only.
    logger.warning("inspector: the store failed: %s", type(exc).__name__)
    return "The store is unavailable right now; try again shortly."


def _plain(status: int, message: str) -> Response:
    return Response(f"{status}: {message}\n", status, media_type="text/plain")
