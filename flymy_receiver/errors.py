"""Errors that know the HTTP status a receiver should answer with.

Every refusal the receiver makes is one of these. ``status`` is what goes on the wire,
``code`` is a stable reason code for logs and metrics, and ``public_message`` is the only
text that may reach the sender: it never contains a secret, a digest or a handler's
exception text.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "EventInFlight",
    "HandlerFailed",
    "InvalidSignature",
    "MalformedEvent",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "StaleEvent",
    "StoreUnavailable",
    "UnsupportedEncoding",
    "WebhookError",
    "public_name",
]


class ConfigurationError(ValueError):
    """The receiver was set up wrongly (for example, with an empty secret)."""


class WebhookError(Exception):
    """A delivery the receiver refuses; ``status`` is the HTTP status to answer with."""

    status: int = 400
    code: str = "rejected"
    public_message: str = "Rejected"

    def __init__(self, detail: str = "", *, code: str | None = None) -> None:
        self.detail = detail
        if code is not None:
            self.code = code
        super().__init__(detail or self.public_message)


class InvalidSignature(WebhookError):
    """The ``X-FlyMyAI-Signature`` header is missing, malformed or does not match."""

    status = 401
    code = "bad_signature"
    public_message = "Invalid signature"


class MalformedEvent(WebhookError):
    """An authentic body that is not a JSON object matching the event envelope."""

    status = 400
    code = "malformed_event"
    public_message = "Malformed event"


class StaleEvent(WebhookError):
    """An authentic event whose ``timestamp`` lies outside the replay window."""

    status = 400
    code = "stale_event"
    public_message = "Event outside the replay window"


class MethodNotAllowed(WebhookError):
    """Webhooks are delivered with ``POST`` only."""

    status = 405
    code = "method_not_allowed"
    public_message = "Method not allowed"


class PayloadTooLarge(WebhookError):
    """The body is larger than ``max_body_size``."""

    status = 413
    code = "too_large"
    public_message = "Payload too large"


class UnsupportedEncoding(WebhookError):
    """A ``Content-Encoding`` other than identity."""

    status = 415
    code = "unsupported_encoding"
    public_message = "Unsupported content encoding"


class EventInFlight(WebhookError):
    """The same event is being handled right now by another worker; retry later."""

    status = 409
    code = "in_flight"
    public_message = "Event is being handled, retry later"


class StoreUnavailable(WebhookError):
    """The idempotency store could not be reached; nothing was handled."""

    status = 503
    code = "store_unavailable"
    public_message = "Temporarily unavailable, retry later"


class HandlerFailed(WebhookError):
    """A handler raised; nothing was recorded as done so a retry runs it again."""

    status = 500
    code = "handler_failed"
    public_message = "Handler failed"


def public_name(obj: object) -> str:
    """The name of ``obj``'s class as users know it: the nearest public class, never a
    private helper such as the default in-process store's own subclass."""
    for cls in type(obj).__mro__:
        if not cls.__name__.startswith("_"):
            return cls.__name__
    return type(obj).__name__
