"""The inspector's JSON API, which its own pages poll and scripts may use too.

``GET /api/deliveries`` lists summaries (never bodies: a live page polls it every second, and
its cost must not grow with the bodies); ``/api/deliveries/{key}`` is one entry with its
headers, history and body; ``/api/bodies/{key}`` the exact bytes that were signed;
``/api/refusals`` the refusals; ``/api/curl/{key}?url=`` a ``curl`` command that sends the
stored body to ``url``, signing it as it runs.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..stores.records import JournalEntry
from . import queries
from .site import NO_JOURNAL, Site, row, store_failed

__all__ = ["Api"]


class Api:
    def __init__(self, site: Site) -> None:
        self.site = site

    def deliveries(self, request: Request) -> Response:
        journal = self.site.journal
        if journal is None:
            return JSONResponse({"error": NO_JOURNAL}, 404)
        try:
            filters = queries.filters(request.query_params)
        except queries.BadQuery as exc:
            return JSONResponse({"error": str(exc)}, 400)
        try:
            entries = journal.list(**filters)
        except Exception as exc:
            return JSONResponse({"error": store_failed(exc)}, 503)
        older = entries[-1].key if entries and len(entries) == filters["limit"] else None
        return JSONResponse({"deliveries": [row(e) for e in entries], "before": older})

    def delivery(self, request: Request) -> Response:
        entry = self._entry(request)
        if isinstance(entry, Response):
            return entry
        detail = entry.summary()
        detail["headers"] = dict(entry.headers)
        detail["body"] = None if entry.body is None else entry.body.decode("utf-8", "replace")
        return JSONResponse(detail)

    def body(self, request: Request) -> Response:
        entry = self._entry(request)
        if isinstance(entry, Response):
            return entry
        if entry.body is None:
            return JSONResponse({"error": "this body was dropped (journal byte limit)"}, 410)
        # Exactly what was signed. A sandbox policy: even opened directly it is inert data.
        headers = {"Content-Security-Policy": "default-src 'none'; sandbox"}
        return Response(entry.body, media_type="application/json", headers=headers)

    def curl(self, request: Request) -> Response:
        journal = self.site.journal
        if journal is None:
            return JSONResponse({"error": NO_JOURNAL}, 404)
        url = request.query_params.get("url", "").strip()
        if not url or len(url) > 2000:
            return JSONResponse({"error": "give the URL to send to: ?url=http://..."}, 400)
        try:
            command = journal.curl(request.path_params["key"], url)
        except KeyError:
            return JSONResponse({"error": "no delivery with this key or run id"}, 404)
        except LookupError:
            return JSONResponse({"error": "this body was dropped (journal byte limit)"}, 410)
        except ValueError as exc:  # not an http(s) URL
            return JSONResponse({"error": str(exc)[:300]}, 400)
        except Exception as exc:
            return JSONResponse({"error": store_failed(exc)}, 503)
        return JSONResponse({"command": command})

    def refusals(self, request: Request) -> Response:
        journal = self.site.journal
        if journal is None:
            return JSONResponse({"error": NO_JOURNAL}, 404)
        try:
            limit = queries.limit(request.query_params.get("limit"), default=100)
        except queries.BadQuery as exc:
            return JSONResponse({"error": str(exc)}, 400)
        try:
            refusals = journal.refusals(limit)
        except Exception as exc:
            return JSONResponse({"error": store_failed(exc)}, 503)
        return JSONResponse({"refusals": [r.to_dict() for r in refusals]})

    def _entry(self, request: Request) -> JournalEntry | Response:
        journal = self.site.journal
        if journal is None:
            return JSONResponse({"error": NO_JOURNAL}, 404)
        try:
            entry = journal.get(request.path_params["key"])
        except Exception as exc:
            return JSONResponse({"error": store_failed(exc)}, 503)
        if entry is None:
            return JSONResponse({"error": "no delivery with this key or run id"}, 404)
        return entry
