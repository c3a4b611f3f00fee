"""Django adapter: ``path("webhooks/flymy", view(receiver))`` (``aview`` under ASGI).

Both views are CSRF-exempt (a webhook carries a signature, not a CSRF token) and read the
raw request stream, bounded by ``max_body_size``. They never touch ``request.body`` or
``request.POST``, so Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (2.5 MB by default) neither
caps genuine large outputs nor turns the receiver's 413 into Django's 400: the receiver's
``max_body_size`` is the one limit that applies to this view.

Under ASGI, Django's handler reads (and spools) a whole body before any view runs, so wrap
the application in :class:`WebhookBodyLimit` to refuse an oversized delivery first: it finds
the webhook's URLs itself, wherever ``view``/``aview`` are mounted.

Both views manage their own transactions, so they are exempt from ``ATOMIC_REQUESTS``.

The package is also a Django app (``INSTALLED_APPS += ["flymy_receiver.django"]``) that keeps
claims and the delivery journal in the project's database (:class:`DjangoStore`), with an
admin and ``manage.py flymy_journal``. Importing this module loads no model, so it works
before the app registry is ready, and projects that do not install the app use the views
as they are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
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
_T = TypeVar("_T")
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Message, _Receive, _Send], Awaitable[None]]


def view(receiver: Receiver) -> Callable[..., HttpResponse]:
    """A sync view (WSGI, or ASGI through Django's thread); async handlers still work.

    Parameters captured by the URL pattern (``<slug:tenant>``) are accepted and ignored.
    """

    def webhook(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        headers = _read_headers(request)
        response = receiver.precheck(headers, request.method or "")
        if response is None:
            body = read_limited(_reader(request), receiver.max_body_size)
            response = receiver.handle(body, headers, request.method or "")
        return _to_django(response)

    return _non_atomic(_mark(_csrf_exempt(webhook), receiver))


def aview(receiver: Receiver) -> Callable[..., Awaitable[HttpResponse]]:
    """An async view for Django under ASGI: sync handlers and store calls run in the
    request's own thread (``sync_to_async``), async handlers on the event loop.

    The database connections that the store and sync handlers open there are Django's
    request's: Django closes them when the request finishes (``CONN_MAX_AGE``), as for
    any sync view, instead of leaving one idle per worker thread.

    Parameters captured by the URL pattern (``<slug:tenant>``) are accepted and ignored.
    """

    async def webhook(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        headers = _read_headers(request)
        response = receiver.precheck(headers, request.method or "")
        if response is None:
            # Django's ASGI handler has already spooled the body; this read does not block.
            body = read_limited(request.read, receiver.max_body_size)
            method = request.method or ""
            response = await receiver.ahandle(body, headers, method, offload=_in_request_thread)
        return _to_django(response)

    return _non_atomic(_mark(_csrf_exempt(webhook), receiver))


def _in_request_thread(func: Callable[[], _T]) -> Awaitable[_T]:
    # Django's own way to run the ORM from async code: thread_sensitive sync_to_async runs
    # in the request's thread and hands its context (the connections it opened) back to the
    # request, whose request_finished signal then closes them in that thread. A plain
    # asyncio.to_thread would open one connection per executor thread and never close it.
    from asgiref.sync import sync_to_async

    return sync_to_async(func, thread_sensitive=True)()


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
    answer = HttpResponse(response.body, status=response.status, headers=dict(response.headers))
    # The receiver has logged this answer once, with its reason, on the flymy_receiver
    # logger; the flag (Django's own, checked by django.utils.log.log_response) keeps
    # django.request from logging every refusal a second time ("Unauthorized: /webhooks/...").
    answer._has_been_logged = True
    return answer


def _mark(view: _View, receiver: Receiver) -> _View:
    # How WebhookBodyLimit recognises the view behind a URL. functools.wraps copies it, so a
    # decorated view is recognised too.
    view.flymy_receiver = receiver  # type: ignore[attr-defined]
    return view


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

    Guards every URL that Django's resolver maps to a :func:`view` or :func:`aview`, at any
    path and with any converters, each with the limits of its own view's receiver. On those
    URLs it answers the receiver's 405/413/415 from the headers alone, and ends a longer body
    one byte past ``max_body_size``, so that the view answers 413 without the rest having
    been read or spooled. Other paths pass through untouched.

    ``path`` (a path or several, as the client sends them) guards more URLs with
    ``receiver``'s limits: a webhook view of your own that calls ``receiver.handle``, or one
    wrapped by a decorator that hides the view it wraps.
    """

    def __init__(
        self, app: _ASGIApp, receiver: Receiver, path: str | Iterable[str] | None = None
    ) -> None:
        self.app, self.receiver = app, receiver
        self.paths = frozenset([path] if isinstance(path, str) else path or ())

    def receiver_for(self, scope: _Message) -> Receiver | None:
        """The receiver whose limits apply to this request, or ``None`` for other URLs."""
        if scope["path"] in self.paths:
            return self.receiver
        from django.conf import settings
        from django.urls import resolve

        # What Django resolves: the path below the script prefix (ASGIRequest.path_info).
        path: str = scope["path"]
        prefix = settings.FORCE_SCRIPT_NAME or scope.get("root_path") or ""
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :]
        try:
            match = resolve(path)  # the settings' URLconf: a per-request one needs path=
        except Exception:  # a 404, or a broken URLconf Django reports better itself
            return None
        receiver = getattr(match.func, "flymy_receiver", None)
        return receiver if isinstance(receiver, Receiver) else None

    async def __call__(self, scope: _Message, receive: _Receive, send: _Send) -> None:
        receiver = self.receiver_for(scope) if scope["type"] == "http" else None
        if receiver is None:
            return await self.app(scope, receive, send)
        early = receiver.precheck(scope["headers"], scope["method"])
        if early is not None:
            headers = [(k.lower().encode(), v.encode()) for k, v in early.headers.items()]
            await send({"type": "http.response.start", "status": early.status, "headers": headers})
            await send({"type": "http.response.body", "body": early.body})
            return None
        limit = receiver.max_body_size
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
