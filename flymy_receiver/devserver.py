"""The development server behind ``flymy-receiver listen`` and ``flymy-receiver inspect``.

One loopback port serves the library's own Starlette route (so the development path is the
production path) at ``/webhooks/flymy`` and the inspector at ``/``, under uvicorn. A
catch-all handler acknowledges every authentic event, so deliveries end ``handled``; each
request to the webhook path is handed, with what the receiver answered, to a ``report``
callback (the command line prints it). Needs the ``inspector`` extra.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"the development server needs {exc.name or 'its dependencies'}: "
        "pip install 'flymy-receiver[inspector]'"
    ) from exc

from .inspector import inspector_app
from .inspector.access import check_bind, check_bound
from .receiver import Receiver
from .responses import Response as ReceiverResponse
from .starlette import route
from .stores.base import Store
from .testing import DEFAULT_PATH

__all__ = [
    "DEFAULT_PATH",
    "Report",
    "bound_socket",
    "development_app",
    "development_receiver",
    "serve",
]

logger = logging.getLogger("flymy_receiver")

#: ``report(method, target, headers, body, status, answer)`` after each request to the
#: webhook path. ``body`` is ``None`` when the receiver refused before reading it.
Report = Callable[[str, str, list[tuple[str, str]], "bytes | None", int, bytes], None]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


def _acknowledge(event: Any) -> None:
    """The development receiver's catch-all: every authentic event is handled."""
    return None


def development_receiver(
    secrets: list[bytes] | list[str], *, store: Store | None = None, **options: Any
) -> Receiver:
    """A :class:`Receiver` with a catch-all handler, so every authentic event ends handled."""
    receiver = Receiver(list(secrets), store=store, **options)
    receiver.on("*")(_acknowledge)
    return receiver


def development_app(
    receiver: Receiver,
    *,
    path: str = DEFAULT_PATH,
    report: Report | None = None,
    token: str | None = None,
) -> ASGIApp:
    """The receiver's Starlette route at ``path`` and the inspector at ``/``, on one app.

    ``report`` sees every request to ``path`` after it is answered (also the test events
    the inspector's form sends); ``token`` guards the inspector (not the webhook path,
    which the signature guards).
    """
    if not path.startswith("/") or path == "/":
        raise ValueError("the webhook path must start with '/' and not be '/' itself")

    def deliver(body: bytes, headers: Mapping[str, str]) -> ReceiverResponse:
        response = receiver.handle(body, headers)
        if report is not None:
            _safely(
                report,
                "POST",
                f"{path} (from the inspector)",
                list(headers.items()),
                body,
                response.status,
                response.body,
            )
        return response

    inspector = inspector_app(receiver, token=token, webhook_path=path, deliver=deliver)
    app = Starlette(routes=[route(receiver, path), Mount("/", app=inspector)])
    if report is None:
        return app
    return _Observed(app, path, report, receiver.max_body_size)


class _Observed:
    """Watches requests to the webhook path go by and reports them; changes nothing."""

    def __init__(self, app: ASGIApp, path: str, report: Report, limit: int) -> None:
        self.app, self.path, self.report, self.limit = app, path, report, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        read = False
        status = 0
        answer: list[bytes] = []

        async def observed_receive() -> Message:
            nonlocal read, size
            message: Message = await receive()
            if message["type"] == "http.request":
                read = True
                chunk = message.get("body", b"")
                if size <= self.limit:
                    chunks.append(chunk[: self.limit + 1 - size])
                size += len(chunk)
            return message

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        await self.app(scope, observed_receive, observed_send)
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        body = b"".join(chunks) if read else None
        _safely(self.report, scope["method"], target, headers, body, status, b"".join(answer))


def _safely(report: Report, *args: Any) -> None:
    try:
        report(*args)
    except Exception:  # printing must never break a delivery
        logger.exception("the development server could not report a delivery")


def serve(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    token: str | None = None,
    ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve ``app`` with uvicorn until interrupted.

    Refuses (:class:`ValueError`) a non-loopback address without ``token``, decided on the
    address actually bound (see :func:`bound_socket`); raises :class:`OSError` when the
    address cannot be bound. ``ready(host, port)`` is called
    once the socket listens (``port=0`` picks a free one).
    """
    sock = bound_socket(host, port, token)
    config = uvicorn.Config(
        app,
        log_config=None,  # the command line's own logging stays as it is
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=3,
    )
    if ready is not None:
        ready(host, sock.getsockname()[1])
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def bound_socket(host: str, port: int, token: str | None) -> socket.socket:
    """A listening socket on ``host``:``port``, refused unless loopback or given ``token``.

    The name is resolved here and the decision is made on ``getsockname()``: a name that
    reads like loopback (``dev.localhost``, an ``/etc/hosts`` entry) but resolves to another
    address is refused without a token (:class:`ValueError`).
    """
    check_bind(host, token)  # an obviously public address, refused before any resolving
    name = host.strip().removeprefix("[").removesuffix("]")
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        check_bound(str(sock.getsockname()[0]), token)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
