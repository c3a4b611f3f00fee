"""Receive FlyMy.AI webhooks: verify, parse into typed events, dispatch once, answer right.

The core (:class:`Receiver`) is sans-I/O and framework-free; import an adapter to mount it:
``flymy_receiver.flask``, ``flymy_receiver.starlette`` or ``flymy_receiver.django``.
"""

from __future__ import annotations

from .errors import (
    ConfigurationError,
    EventInFlight,
    HandlerFailed,
    InvalidSignature,
    MalformedEvent,
    MethodNotAllowed,
    PayloadTooLarge,
    StaleEvent,
    StoreUnavailable,
    UnsupportedEncoding,
    WebhookError,
)
from .events import (
    BaseEvent,
    Event,
    RunCompleted,
    RunCompletedData,
    RunError,
    RunFailed,
    RunFailedData,
    UnknownEvent,
    parse_event,
)
from .receiver import Receiver, Response
from .routing import CATCH_ALL, OutputMismatch, Router
from .signature import SECRET_ENV_VAR, SIGNATURE_HEADER, sign, verify_signature

__version__ = "0.1.0"

__all__ = [
    "CATCH_ALL",
    "SECRET_ENV_VAR",
    "SIGNATURE_HEADER",
    "BaseEvent",
    "ConfigurationError",
    "Event",
    "EventInFlight",
    "HandlerFailed",
    "InvalidSignature",
    "MalformedEvent",
    "MethodNotAllowed",
    "OutputMismatch",
    "PayloadTooLarge",
    "Receiver",
    "Response",
    "Router",
    "RunCompleted",
    "RunCompletedData",
    "RunError",
    "RunFailed",
    "RunFailedData",
    "StaleEvent",
    "StoreUnavailable",
    "UnknownEvent",
    "UnsupportedEncoding",
    "WebhookError",
    "__version__",
    "parse_event",
    "sign",
    "verify_signature",
]
