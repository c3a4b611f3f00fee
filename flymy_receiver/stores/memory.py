"""An in-process idempotency store: the default, for one worker process."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import Claim, ClaimState

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Entry:
    expires: float
    token: str = ""
    done: bool = False
    handlers: set[str] = field(default_factory=set)


class MemoryStore:
    """Keeps claims in a dict guarded by a lock; bounded and expiring.

    Shared by the threads of one process only: with several worker processes use
    :class:`~flymy_receiver.stores.SQLiteStore` or :class:`~flymy_receiver.stores.RedisStore`.
    When ``max_entries`` is reached the oldest records are forgotten first, so a duplicate of
    a very old event could run again; size it for the deliveries of your replay window.
    """

    blocking = False

    def __init__(
        self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: str, lease: float) -> Claim:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= now:
                if entry.done or not entry.handlers:
                    del self._entries[key]
                    entry = None
                else:
                    entry.token = ""  # the lease ran out; keep the per-handler records
            if entry is not None and entry.done:
                return Claim(ClaimState.DONE)
            if entry is not None and entry.token:
                return Claim(ClaimState.BUSY, retry_after=max(entry.expires - now, 0.0))
            token = secrets.token_hex(8)
            if entry is None:
                entry = self._entries[key] = _Entry(expires=now + lease)
                self._evict()
            entry.token, entry.expires = token, now + lease
            return Claim(ClaimState.ACQUIRED, token, frozenset(entry.handlers))

    def mark_handler_done(self, key: str, token: str, handler: str, ttl: float) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(expires=self._clock() + ttl)
            entry.handlers.add(handler)

    def complete(self, key: str, token: str, ttl: float) -> None:
        with self._lock:
            self._entries[key] = _Entry(expires=self._clock() + ttl, done=True)
            self._entries.move_to_end(key)
            self._evict()

    def release(self, key: str, token: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.token == token and not entry.done:
                entry.token = ""
                if not entry.handlers:
                    del self._entries[key]

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
