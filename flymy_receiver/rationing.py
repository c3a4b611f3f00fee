"""Rationing: a token bucket, so that a flood of requests cannot become a flood of work.

The receiver rations the costly part of bad-signature hints with it, and the journal the
writes of refused deliveries: a flood of forged requests costs an HMAC each, never more.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """``take()`` is true at most ``burst`` times at once, then ``per_second``.

    Not locked: callers that share one across threads hold their own lock (a lost token
    under a race only rations a little more or less).
    """

    __slots__ = ("_clock", "_last", "_per_second", "_tokens", "burst")

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_second, self.burst, self._clock = per_second, burst, clock
        self._tokens, self._last = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self._per_second)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
