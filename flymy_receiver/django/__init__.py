"""Django adapter: ``path("webhooks/flymy", view(receiver))`` (``aview`` under ASGI).

Both views are CSRF-exempt (a webhook carries a signature, not a CSRF token) and read the
raw request stream, bounded by ``max_body_size``. They never touch ``request.body`` or
``request.POST``, so Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (2.5 MB by default) neither
caps genuine large outputs nor turns the receiver's 413 into Django's 400: the receiver's
``max_body_size`` is the one limit that applies to this view.

Under ASGI, Django's handler reads (and spools) a whole body before any view runs, so wrap
the application in :class:`WebhookBodyLimit` to refuse an oversized delivery first.

Both views manage their own transactions, so they are exempt from ``ATOMIC_REQUESTS``.

The package is also a Django app (``INSTALLED_APPS += ["flymy_receiver.django"]``) that keeps
claims and the delivery journal in the project's database (:class:`DjangoStore`), with an
admin and ``manage.py flymy_journal``. Importing this module loads no model, so it works
before the app registry is ready, and projects that do not install the app use the views
as they are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

try:
    from django.http import HttpRequest, HttpResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flymy_receiver.django needs Django: pip install 'flymy-receiver[django]'"
    ) from exc

from ..bodies import read_limited
from ..receiver import READ_HEADERS, Receiver, Response
from .registry import register

if TYPE_CHECKING:
    from .store import DjangoStore

__all__ = ["DjangoStore", "WebhookBodyLimit", "aview", "register", "view"]

_View = TypeVar("_View", bound=Callable[..., object])
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Message, _Receive, _Send], Awaitable[None]]


def view(receiver: Receiver) -> Callable[[HttpRequest], HttpResponse]:
    """A sync view (WSGI, or ASGI through Django's thread); async handlers still work."""

    def webhook(request: HttpRequest) -> HttpResponse:
        headers = _read_headers(request)
        response = receiver.precheck(headers, request.method or "")
        if response is None:
            body = read_limited(_reader(request), receiver.max_body_size)
            response = receiver.handle(body, headers, request.method or "")
        return _to_django(response)

    return _non_atomic(_csrf_exempt(webhook))


def aview(receiver: Receiver) -> Callable[[HttpRequest], Awaitable[HttpResponse]]:
    """An async view for Django under ASGI: sync handlers run in a worker thread."""

    async def webhook(request: HttpRequest) -> HttpResponse:
        headers = _read_headers(request)
        response = receiver.precheck(headers, request.method or "")
        if response is None:
            # Django's ASGI handler has already spooled the body; this read does not block.
            body = read_limited(request.read, receiver.max_body_size)
            response = await receiver.ahandle(body, headers, request.method or "")
        return _to_django(response)

    return _non_atomic(_csrf_exempt(webhook))


def _reader(request: HttpRequest) -> Callable[[int], bytes]:
    # Under WSGI, Django reads nothing from a body without Content-Length (a chunked
    # delivery). A server that sets wsgi.input_terminated (gunicorn does) has de-chunked the
    # body and ends the stream itself, so it is safe to read it there, bounded.
    meta = request.META
    chunked = not meta.get("CONTENT_LENGTH") and meta.get("wsgi.input_terminated")
    read: Callable[[int], bytes] = meta["wsgi.input"].read if chunked else request.read
    return read


def _read_headers(request: HttpRequest) -> list[tuple[str, str]]:
    # Only the headers the receiver reads: Django's lookups ignore case, and walking every
    # header of request.META cost more than the signature check.
    headers = request.headers
    return [(name, headers[name]) for name in READ_HEADERS if name in headers]


def _to_django(response: Response) -> HttpResponse:
    return HttpResponse(response.body, status=response.status, headers=dict(response.headers))


def _csrf_exempt(view: _View) -> _View:
    # What django.views.decorators.csrf.csrf_exempt sets, without a wrapper that would hide
    # the view's type (and, before Django 5, its async-ness).
    view.csrf_exempt = True  # type: ignore[attr-defined]
    return view


def _non_atomic(view: _View) -> _View:
    # Under ATOMIC_REQUESTS the view would run inside one transaction: claims unseen by other
    # workers until it commits, atomic=True handlers in a mere savepoint, and a handler's
    # database error rolling back the journal's record of it. Exempt for every database.
    from django.db import connections, transaction

    for alias in connections:
        view = transaction.non_atomic_requests(using=alias)(view)
    return view


class WebhookBodyLimit:
    """ASGI middleware for Django: ``WebhookBodyLimit(get_asgi_application(), receiver)``.

    On the webhook ``path`` it answers the receiver's 405/413/415 from the headers alone, and
    ends a longer body one byte past ``max_body_size``, so that the view answers 413 without
    the rest having been read or spooled. Other paths pass through untouched.
    """

    def __init__(self, app: _ASGIApp, receiver: Receiver, path: str = "/webhooks/flymy") -> None:
        self.app, self.receiver, self.path = app, receiver, path

    async def __call__(self, scope: _Message, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        early = self.receiver.precheck(scope["headers"], scope["method"])
        if early is not None:
            headers = [(k.lower().encode(), v.encode()) for k, v in early.headers.items()]
            await send({"type": "http.response.start", "status": early.status, "headers": headers})
            await send({"type": "http.response.body", "body": early.body})
            return None
        limit = self.receiver.max_body_size
        received = 0
        ended = False

        async def bounded_receive() -> _Message:
            nonlocal received, ended
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                if ended:  # past the limit: the rest is dropped, Django sees the body end
                    continue
                body = message.get("body", b"")
                received += len(body)
                if received > limit:
                    ended = True
                    keep = len(body) - (received - limit - 1)
                    return {**message, "body": body[:keep], "more_body": False}
                return message

        return await self.app(scope, bounded_receive, send)


def __getattr__(name: str) -> Any:
    # Loaded on first use: the store's module is safe before the app registry is ready, and
    # projects that only use the views never import it.
    if name == "DjangoStore":
        from .store import DjangoStore

        return DjangoStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
