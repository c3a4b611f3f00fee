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
    expires: float  # end of the lease while claimed, end of the retention once done
    token: str = ""
    done: bool = False
    handlers: set[str] = field(default_factory=set)
    handlers_expire: float = 0.0


class MemoryStore:
    """Keeps claims in a dict guarded by a lock; bounded and expiring.

    Shared by the threads of one process only: with several worker processes use
    :class:`~flymy_receiver.stores.SQLiteStore` or :class:`~flymy_receiver.stores.RedisStore`.
    When ``max_entries`` is reached the oldest records are forgotten first, so a duplicate of
    a very old event could run again; size it for the deliveries of your replay window
    (each record takes a few hundred bytes). Nothing survives a restart of the process.
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

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self.max_entries}, entries={len(self._entries)})"

    def claim(self, key: str, lease: float) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim."""
        now = self._clock()
        with self._lock:
            entry = self._current(key, now)
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
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        now = self._clock()
        with self._lock:
            entry = self._current(key, now)
            if entry is None:
                entry = self._entries[key] = _Entry(expires=now)
                self._evict()
            if entry.done:
                return
            entry.handlers.add(handler)
            entry.handlers_expire = max(entry.handlers_expire, now + ttl)

    def complete(self, key: str, token: str, ttl: float) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        with self._lock:
            self._entries[key] = _Entry(expires=self._clock() + ttl, done=True)
            self._entries.move_to_end(key)
            self._evict()

    def release(self, key: str, token: str) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.token == token and not entry.done:
                entry.token = ""
                if not entry.handlers:
                    del self._entries[key]

    def _current(self, key: str, now: float) -> _Entry | None:
        """The live entry for ``key``, with expired parts dropped (lock held)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.handlers and entry.handlers_expire <= now:
            entry.handlers.clear()
        if entry.expires <= now:
            if entry.done:
                del self._entries[key]
                return None
            entry.token = ""  # the lease ran out: its worker died or outlived it
        if not entry.done and not entry.token and not entry.handlers:
            del self._entries[key]
            return None
        return entry

    def _evict(self) -> None:
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
