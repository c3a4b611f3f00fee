"""Apply the webhook's size limit before Django's ASGI handler reads the body.

Django's ASGI handler reads (and spools to disk) the whole request body before any view
runs, so the view's limit would come too late: a ``Content-Length`` of 10 GB would be
waited for, a chunked flood stored. This wrapper answers the receiver's 413 (and 405, 415)
from the headers alone, and ends a longer body one byte past the limit so that the view
answers 413 without the rest being read. Other paths pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from flymy_receiver import Receiver

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class WebhookBodyLimit:
    """ASGI middleware: ``application = WebhookBodyLimit(get_asgi_application(), receiver)``."""

    def __init__(self, app: ASGIApp, receiver: Receiver, path: str = "/webhooks/flymy") -> None:
        self.app, self.receiver, self.path = app, receiver, path

    async def __call__(
        self,
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
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

        async def bounded_receive() -> Message:
            nonlocal received, ended
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                if ended:  # past the limit: the rest is dropped, Django sees only a disconnect
                    continue
                body = message.get("body", b"")
                received += len(body)
                if received > limit:
                    ended = True
                    keep = len(body) - (received - limit - 1)
                    return {**message, "body": body[:keep], "more_body": False}
                return message

        return await self.app(scope, bounded_receive, send)
