"""The inspector's pages: the deliveries (filters, keyset pages, refusals, a test-event form)
and one delivery (history, handlers, Replay, Resolve, Resend, copy as curl, the body).

A redirect after an action names what to say with a code from :data:`NOTICES` (never free
text from the query string); what a replay did is read from the entry itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from . import queries
from .site import NO_JOURNAL, Site, outcome, pretty_body, row, store_failed

__all__ = ["NOTICES", "Pages", "no_list", "notice_of"]

#: Notices a redirect may ask a page to show: code -> (text, kind). ``kind`` "ok" is shown
#: as a success, "problem" as an alert.
NOTICES: dict[str, tuple[str, str]] = {
    "sent": ("Test event sent.", "ok"),
    "resolved": ("Resolved: kept in the journal, never replayed in bulk.", "ok"),
    "replay-handled": ("Replayed: every handler succeeded; the delivery is handled.", "ok"),
    "replay-failed": ("Replayed, but it still failed", "problem"),
    "replay-no-handler": (
        "Replayed, but no handler ran: none of the app's handlers wants this event now "
        "(removed, or its filter changed). It stays failed; resolve it if that is intended.",
        "problem",
    ),
    "replay-queued": ("Replayed: its deferred handlers were sent to the queue.", "ok"),
    "bulk": ("Bulk replay done.", "ok"),
}


def notice_of(query: Mapping[str, str], entry: Any = None) -> tuple[str | None, str]:
    """The notice a page was redirected with, and its kind; a failed replay names its error."""
    code = query.get("notice", "")
    if code not in NOTICES:
        return None, "ok"
    text, kind = NOTICES[code]
    if code == "replay-failed":
        errors = [o.error for o in getattr(entry, "handlers", {}).values() if not o.ok and o.error]
        text += f": {errors[0][:300]}" if errors else "."
    if code == "bulk":
        counts = {
            name: query.get(name, "") for name in ("matched", "handled", "failed", "in_flight")
        }
        if all(
            value.isascii() and value.isdigit() and len(value) < 10 for value in counts.values()
        ):
            text = (
                f"Replayed {counts['matched']}: {counts['handled']} handled, "
                f"{counts['failed']} still failed"
                + (
                    f", {counts['in_flight']} held by a delivery"
                    if counts["in_flight"] != "0"
                    else ""
                )
                + "."
            )
            kind = "ok" if counts["failed"] == "0" and counts["in_flight"] == "0" else "problem"
    return text, kind


def no_list(form: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The context of an index page that shows no list (after a refused form)."""
    return {
        "deliveries": [],
        "refusals": [],
        "filters": dict.fromkeys(queries.FILTER_NAMES, ""),
        "older": None,
        "form": {**default_form(), **(form or {})},
        "bulk": None,
    }


def default_form() -> dict[str, str]:
    return {"event": "run.completed", "run_id": "", "agent_id": "", "agent_name": "", "data": ""}


class Pages:
    def __init__(self, site: Site) -> None:
        self.site = site

    def index(self, request: Request, bulk: dict[str, Any] | None = None) -> Response:
        site = self.site
        try:
            filters = queries.filters(request.query_params)
        except queries.BadQuery as exc:
            return site.page(request, "index.html", 400, problem=str(exc), **no_list())
        deliveries: list[dict[str, Any]] = []
        refusals: list[dict[str, Any]] = []
        problem = None
        if site.journal is not None:
            try:
                entries = site.journal.list(**filters)
                deliveries = [row(e) for e in entries]
                refusals = [r.to_dict() for r in site.journal.refusals(20)]
            except Exception as exc:
                problem = store_failed(exc)
        values = queries.filter_values(request.query_params)
        older = None
        if deliveries and len(deliveries) == filters["limit"]:
            kept = {name: value for name, value in values.items() if name != "before"}
            limit = request.query_params.get("limit", "")
            older = {**kept, "limit": limit, "before": deliveries[-1]["key"]}
        notice, kind = notice_of(request.query_params)
        return site.page(
            request,
            "index.html",
            503 if problem else 200,
            deliveries=deliveries,
            refusals=refusals,
            filters=values,
            older=older,
            problem=problem,
            notice=notice,
            notice_kind=kind,
            sent_status=_status_param(request.query_params.get("status")),
            form=default_form(),
            bulk=bulk,
        )

    def delivery(self, request: Request) -> Response:
        return self.detail(request, request.path_params["key"])

    def detail(
        self,
        request: Request,
        key: str,
        status: int = 200,
        problem: str | None = None,
        notice: str | None = None,
        resend_url: str | None = None,
    ) -> Response:
        site = self.site
        if site.journal is None:
            return site.page(request, "delivery.html", 404, entry=None, problem=NO_JOURNAL)
        try:
            entry = site.journal.get(key)
        except Exception as exc:
            return site.page(request, "delivery.html", 503, entry=None, problem=store_failed(exc))
        if entry is None:
            return site.page(
                request, "delivery.html", 404, entry=None, problem="No delivery with this key."
            )
        shown, total = pretty_body(entry.body)
        kind = "ok"
        if notice is None:
            notice, kind = notice_of(request.query_params, entry)
        return site.page(
            request,
            "delivery.html",
            status,
            entry=entry,
            body=shown,
            body_total=total,
            body_cut=len(shown) < total,
            handlers=[outcome(name, o) for name, o in entry.handlers.items()],
            history=list(reversed(entry.history)),
            problem=problem,
            notice=notice,
            notice_kind=kind,
            sent_status=_status_param(request.query_params.get("status")),
            resend_url=resend_url or site.webhook_url(request) or "",
        )


def _status_param(value: str | None) -> int | None:
    if value is not None and value.isascii() and value.isdigit() and len(value) == 3:
        return int(value)
    return None
