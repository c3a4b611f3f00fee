"""What the receiver answers: a :class:`Response`, and the refusals built from errors.

Only an error's ``public_message`` (and, for a 400, the names of the fields at fault)
reaches the sender: never a secret, a digest or a handler's exception text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import orjson

from .errors import MethodNotAllowed, WebhookError

__all__ = ["DUPLICATE", "RECEIVED", "Response", "deferred_received", "refusal"]

# Read-only: the common responses below share it.
_JSON: Mapping[str, str] = MappingProxyType({"Content-Type": "application/json"})


@dataclass(frozen=True, slots=True)
class Response:
    """What to answer the sender: a status, a JSON body and headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: dict(_JSON))

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


RECEIVED = Response(200, b'{"received":true}', _JSON)
DUPLICATE = Response(200, b'{"received":true,"duplicate":true}', _JSON)


def deferred_received(count: int) -> Response:
    """Journaled, inline handlers done, ``count`` deferred handlers sent to the queue."""
    return Response(200, b'{"received":true,"deferred":%d}' % count, _JSON)


def refusal(error: WebhookError, retry_after: float | None = None) -> Response:
    """The answer to a refused delivery: its status, a public message, ``Retry-After``."""
    headers = dict(_JSON)
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = "POST"
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    message = error.public_message
    if error.status == 400 and error.detail:
        message = f"{message}: {error.detail}"  # field names only, never input values
    body = b'{"error":' + orjson.dumps(message) + b"}"
    return Response(error.status, body, headers)
