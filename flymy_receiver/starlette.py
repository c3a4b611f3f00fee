"""Starlette and FastAPI adapter: ``Starlette(routes=[route(receiver, "/webhooks/flymy")])``.

With FastAPI, ``FastAPI(routes=[route(...)])`` or ``app.router.routes.append(route(...))``.
Translation only: the body is streamed up to the size limit and handed to
:meth:`Receiver.ahandle`, which awaits async handlers and runs sync ones in a worker thread,
so a slow sync handler never blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

try:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flymy_receiver.starlette needs Starlette: pip install 'flymy-receiver[starlette]'"
    ) from exc

from .bodies import aread_limited
from .receiver import Receiver

__all__ = ["endpoint", "route"]

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def endpoint(receiver: Receiver) -> Callable[[Request], Awaitable[Response]]:
    """The ASGI endpoint function, for mounting it your own way."""

    async def webhook(request: Request) -> Response:
        headers = request.headers.raw
        response = receiver.precheck(headers, request.method)
        if response is None:
            body = await aread_limited(request.stream(), receiver.max_body_size)
            response = await receiver.ahandle(body, headers, request.method)
        return Response(response.body, response.status, dict(response.headers))

    return webhook


def route(
    receiver: Receiver, path: str = "/webhooks/flymy", *, name: str = "flymy_webhook"
) -> Route:
    """A route at ``path`` for every method, so a GET gets the receiver's own 405."""
    return Route(path, endpoint(receiver), methods=_METHODS, name=name)
