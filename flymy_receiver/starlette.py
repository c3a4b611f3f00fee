"""Starlette and FastAPI adapter: ``Starlette(routes=[route(receiver, "/webhooks/flymy")])``.

With FastAPI, ``app.include_router(api_router(receiver))``: the same endpoint, with the
``POST`` documented in ``/openapi.json`` (the event schemas and the signature header); a
plain ``route(...)`` works too but FastAPI leaves it out of the schema.
Translation only: the body is streamed up to the size limit and handed to
:meth:`Receiver.ahandle`, which awaits async handlers and runs sync ones in a worker thread,
so a slow sync handler never blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

try:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "flymy_receiver.starlette needs Starlette: pip install 'flymy-receiver[starlette]'"
    ) from exc

from .bodies import aread_limited
from .receiver import READ_HEADERS, Receiver

__all__ = ["api_router", "endpoint", "route"]

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
#: The headers the receiver reads, as ASGI names them (lowercase bytes).
_READ = frozenset(name.lower().encode("ascii") for name in READ_HEADERS)


def endpoint(receiver: Receiver) -> Callable[[Request], Awaitable[Response]]:
    """The ASGI endpoint function, for mounting it your own way."""

    async def webhook(request: Request) -> Response:
        # Only the lines the receiver reads (repeated ones kept), picked in one pass: the
        # receiver looks at them twice (before the body and with it).
        headers = [line for line in request.headers.raw if line[0] in _READ]
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


def api_router(
    receiver: Receiver, path: str = "/webhooks/flymy", *, tags: list[str] | None = None
) -> Any:
    """A FastAPI ``APIRouter`` with the webhook at ``path``, documented in ``/openapi.json``:
    ``app.include_router(api_router(receiver))``. The ``POST`` lists the events it accepts
    (their JSON Schemas), the signature header and every status the receiver answers; the
    other methods get the receiver's own 405 and stay out of the schema."""
    try:
        from fastapi import APIRouter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("api_router needs FastAPI: pip install fastapi") from exc
    from .schema import event_schemas
    from .signature import SIGNATURE_HEADER

    schemas = event_schemas()
    body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"oneOf": [schemas["run.completed"], schemas["run.failed"]]}
            }
        },
    }
    header = {
        "name": SIGNATURE_HEADER,
        "in": "header",
        "required": True,
        "description": "Hex HMAC-SHA256 of the raw body under the webhook secret",
        "schema": {"type": "string"},
    }
    router = APIRouter(tags=list(tags) if tags else ["webhooks"])
    router.add_api_route(
        path,
        endpoint(receiver),
        methods=["POST"],
        name="flymy_webhook",
        summary="Receive a FlyMy.AI webhook delivery",
        openapi_extra={"requestBody": body, "parameters": [header]},
        responses=_RESPONSES,
    )
    others = [m for m in _METHODS if m != "POST"]
    router.routes.append(Route(path, endpoint(receiver), methods=others, include_in_schema=False))
    return router


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Received (also a duplicate, or an event no handler wants)"},
    400: {"description": "Not a valid event, or outside the replay window"},
    401: {"description": "Signature missing or wrong"},
    405: {"description": "Not a POST"},
    409: {"description": "The same event is being handled (retry after Retry-After)"},
    413: {"description": "Body over the size limit"},
    415: {"description": "A Content-Encoding other than identity"},
    500: {"description": "A handler failed: nothing recorded as done, a retry runs it"},
    503: {"description": "The idempotency store is unavailable (retry after Retry-After)"},
}
