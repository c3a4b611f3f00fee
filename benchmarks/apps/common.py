"""The receiver both apps share, and the hand-written check the baseline handlers use."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from benchmarks.payloads import SECRET
from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.stores import Store

KEY = SECRET.encode()
MAX_BODY_SIZE = int(os.environ.get("BENCH_MAX_BODY_SIZE", str(5 * 1024 * 1024)))


def make_receiver(
    async_handler: bool = False, *, store: Store | None = None, journal: bool = True
) -> Receiver:
    """A receiver with one no-op ``run.completed`` handler (``BENCH_HANDLER`` overrides)."""
    receiver = Receiver(secret=SECRET, max_body_size=MAX_BODY_SIZE, store=store, journal=journal)
    async_handler = os.environ.get("BENCH_HANDLER", "async" if async_handler else "sync") == "async"
    if async_handler:

        @receiver.on("run.completed")
        async def profiled_async(event: RunCompleted[Any]) -> None:
            pass

    else:

        @receiver.on("run.completed")
        def profiled(event: RunCompleted[Any]) -> None:
            pass

    return receiver


def authentic(body: bytes, signature: str | None) -> bool:
    """The platform docs' check: HMAC-SHA256 hex of the raw body, compared in constant time."""
    expected = hmac.new(KEY, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature or "")
