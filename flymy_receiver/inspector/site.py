"""What every part of the inspector shares: the journal it shows, the receiver that acts, and
how a page is rendered (Jinja2, autoescaped: a payload is always text)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ..journal import Journal
from ..receiver import Receiver
from ..receiver import Response as ReceiverResponse
from ..stores.records import ENTRY_STATES, HandlerOutcome, JournalEntry
from .access import new_csrf_token

__all__ = ["BODY_SHOWN", "HERE", "Deliver", "Site", "delivery_path", "store_failed"]

logger = logging.getLogger("flymy_receiver")

HERE = Path(__file__).resolve().parent
#: A body longer than this (pretty-printed characters) is cut on the page; the API has it all.
BODY_SHOWN = 100_000

#: Hands a signed test event to the receiver; returns what the receiver answered.
Deliver = Callable[[bytes, Mapping[str, str]], ReceiverResponse]

NO_JOURNAL = "This store keeps no delivery journal, so there is nothing to show."


class Site:
    """The inspector's state: its journal, its receiver (``None``: read-only), its pages."""

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
        self.templates.filters["when"] = when
        self.templates.filters["delivery_url"] = delivery_path
        self.templates.filters["q"] = lambda text: quote(str(text), safe="")
        self.templates.filters["query"] = lambda params: urlencode(
            {k: v for k, v in params.items() if v}
        )

    @property
    def can_replay(self) -> bool:
        return self.receiver is not None and self.receiver.journal is not None

    def webhook_url(self, request: Request) -> str | None:
        """Where this same server receives deliveries (``listen``), as the browser reaches it."""
        if self.webhook_path is None:
            return None
        return f"{request.url.scheme}://{request.headers.get('host', '')}{self.webhook_path}"

    def page(self, request: Request, template: str, status: int, **context: Any) -> Response:
        html = self.templates.get_template(template).render(
            base=base(request),
            csrf_token=self.csrf,
            label=self.label,
            webhook_url=self.webhook_url(request),
            can_replay=self.can_replay,
            can_send=self.receiver is not None and self.deliver is not None,
            has_journal=self.journal is not None,
            states=ENTRY_STATES,
            **{"notice": None, "sent_status": None, "problem": None, **context},
        )
        return HTMLResponse(html, status)


def base(request: Request) -> str:
    """The inspector's own root path with a final slash, wherever it is mounted."""
    return str(request.scope.get("root_path", "")).rstrip("/") + "/"


def delivery_path(base: str, key: str) -> str:
    return f"{base}deliveries/{quote(key, safe='')}"


def when(moment: datetime | str | None) -> str:
    """A time as the page shows it (UTC, to the second); the script formats the same way."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def row(entry: JournalEntry) -> dict[str, Any]:
    """An entry as the list shows it: the summary, tracebacks left to the detail."""
    data = entry.summary()
    data["handlers"] = {
        name: {"ok": o.ok, "state": o.state, "attempts": o.attempts, "error": o.error, "at": o.at}
        for name, o in entry.handlers.items()
    }
    return data


def outcome(name: str, result: HandlerOutcome) -> dict[str, Any]:
    """A handler as the delivery page shows it: state (queued, running, ok, failed), attempts."""
    return {
        "name": name,
        "ok": result.ok,
        "state": result.state,
        "attempts": result.attempts,
        "deferred": result.deferred,
        "error": result.error,
        "traceback": result.traceback,
        "at": result.finished_at if result.at else None,
    }


def pretty_body(body: bytes | None) -> tuple[str, int]:
    """The body indented for reading, cut to :data:`BODY_SHOWN`; and its full length.

    Integers past 64 bits or nesting past orjson's limit are shown as received.
    """
    if body is None:
        return "", 0
    try:
        text = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, TypeError):
        text = body.decode("utf-8", "replace")
    return text[:BODY_SHOWN], len(text)


def store_failed(exc: Exception) -> str:
    # The exception's text could name a server or worse: the log gets its type only.
    logger.warning("inspector: the store failed: %s", type(exc).__name__)
    return "The store is unavailable right now; try again shortly."


def plain(status: int, message: str) -> Response:
    return Response(f"{status}: {message}\n", status, media_type="text/plain")
