"""Claims given up after a timeout, for :class:`~flymy_receiver.stores.RedisStore`.

A claim that times out on the client may still run on the server once it wakes up (a stalled
Redis, a slow network). Its token is then given up from one background thread per process:
released if the claim ran, or remembered so that the claim, if it runs later, takes nothing.
So a 503 never leaves the event locked for a whole lease.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from ..errors import StoreUnavailable

__all__ = ["GiveUps"]

logger = logging.getLogger("flymy_receiver")

#: Claims given up after a timeout waiting to be sent (beyond that, their lease ends them).
_QUEUE = 1000


class GiveUps:
    """The claims to give up, sent by ``give_up(key, token, lease)`` from one thread."""

    def __init__(self, give_up: Callable[[str, str, float], None]) -> None:
        self._give_up = give_up
        self._pending: queue.Queue[tuple[str, str, float, float]] | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def later(self, key: str, token: str, lease: float) -> None:
        """Queue the release of a claim whose reply never came."""
        with self._lock:
            if self._pending is None or self._pid != os.getpid():  # none yet, or forked
                self._pending = queue.Queue(_QUEUE)
                self._pid = os.getpid()
                threading.Thread(
                    target=self._loop,
                    args=(self._pending,),
                    name="flymy-redis-give-up",
                    daemon=True,
                ).start()
            pending = self._pending
        try:
            pending.put_nowait((key, token, lease, time.monotonic() + lease))
        except queue.Full:  # the lease will end it
            logger.debug("too many claims to give up; %s waits for its lease", key[:200])

    def _loop(self, pending: queue.Queue[tuple[str, str, float, float]]) -> None:
        while True:
            key, token, lease, deadline = pending.get()
            try:
                while True:
                    try:
                        self._give_up(key, token, lease)
                        break
                    except StoreUnavailable as exc:
                        if time.monotonic() > deadline:  # the lease has ended it by now
                            logger.debug("could not give up the claim on %s: %r", key[:200], exc)
                            break
                        time.sleep(0.1)
            finally:
                pending.task_done()  # so that wait() sees the queue drain

    def wait(self, timeout: float) -> bool:
        """Whether every claim given up so far was sent, waiting up to ``timeout`` (tests)."""
        deadline = time.monotonic() + timeout
        while self._pending is not None and self._pending.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
