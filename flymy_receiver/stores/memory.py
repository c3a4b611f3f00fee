"""An in-process idempotency store: the default, for one worker process."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .base import Claim, ClaimState

__all__ = ["MemoryStore", "warn_if_several_processes"]

logger = logging.getLogger("flymy_receiver")

_DONE = Claim(ClaimState.DONE)


class MemoryStore:
    """Keeps claims in dicts guarded by a lock; bounded and expiring.

    Shared by the threads of one process only: with several worker processes use
    :class:`~flymy_receiver.stores.SQLiteStore` or :class:`~flymy_receiver.stores.RedisStore`.
    When ``max_entries`` handled events are remembered, the oldest are forgotten first, so a
    duplicate of a very old event could run again; size it for the deliveries of your replay
    window (each record takes about a hundred bytes). Nothing survives a restart.
    """

    blocking = False

    @classmethod
    def default(cls) -> MemoryStore:
        """The store a :class:`~flymy_receiver.Receiver` builds when given none: a
        ``MemoryStore`` that warns (once per process) where it cannot be right, under a
        multi-process server or in a process forked after it was built. Passing
        ``store=MemoryStore()`` yourself says one process is what you run: no warning."""
        warn_if_several_processes()
        return _DefaultMemoryStore()

    def __init__(
        self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        # Three plain dicts rather than one of record objects: a handled event is a str ->
        # float entry, which the garbage collector never has to walk.
        self._done: dict[str, float] = {}  # key -> end of retention
        self._claims: dict[str, tuple[str, float]] = {}  # key -> (token, end of lease)
        self._handlers: dict[str, tuple[float, set[str]]] = {}  # key -> (expiry, names)
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._done) + len(self._claims.keys() | self._handlers.keys())

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self.max_entries}, entries={len(self)})"

    def claim(self, key: str, lease: float) -> Claim:
        """Take ``key`` for ``lease`` seconds unless it is done or held by a live claim."""
        now = self._clock()
        with self._lock:
            done_until = self._done.get(key)
            if done_until is not None:
                if done_until > now:
                    return _DONE
                del self._done[key]
            held = self._claims.get(key)
            if held is not None and held[1] > now:
                return Claim(ClaimState.BUSY, retry_after=held[1] - now)
            token = str(next(self._tokens))
            self._claims[key] = (token, now + lease)
            if len(self._claims) > self.max_entries:
                self._drop_expired_claims(now)
            return Claim(ClaimState.ACQUIRED, token, self._handlers_done(key, now))

    def mark_handler_done(self, key: str, token: str, handler: str, ttl: float) -> None:
        """Remember that ``handler`` succeeded for ``key`` for ``ttl`` seconds."""
        now = self._clock()
        with self._lock:
            if key in self._done:
                return
            expires, names = self._handlers.get(key, (0.0, set()))
            if expires <= now:
                names = set()
            names.add(handler)
            self._handlers[key] = (max(expires, now + ttl), names)
            while len(self._handlers) > self.max_entries:
                del self._handlers[next(iter(self._handlers))]

    def complete(self, key: str, token: str, ttl: float) -> None:
        """Remember ``key`` as done for ``ttl`` seconds, whoever holds the claim now."""
        now = self._clock()
        with self._lock:
            self._claims.pop(key, None)
            self._handlers.pop(key, None)
            self._done.pop(key, None)  # re-inserted last, so eviction stays oldest-first
            self._done[key] = now + ttl
            while len(self._done) > self.max_entries:
                del self._done[next(iter(self._done))]

    def release(self, key: str, token: str) -> None:
        """Drop the claim held with ``token``; keep the per-handler records."""
        with self._lock:
            held = self._claims.get(key)
            if held is not None and held[0] == token:
                del self._claims[key]

    def _handlers_done(self, key: str, now: float) -> frozenset[str]:
        record = self._handlers.get(key)
        if record is None:
            return frozenset()
        if record[0] <= now:
            del self._handlers[key]
            return frozenset()
        return frozenset(record[1])

    def _drop_expired_claims(self, now: float) -> None:
        # Claims are few (one per delivery in progress) unless workers keep dying mid-handler.
        for key in [k for k, (_, until) in self._claims.items() if until <= now]:
            del self._claims[key]


class _DefaultMemoryStore(MemoryStore):
    """The default store: notices being used in a process forked after it was built."""

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()

    def claim(self, *args: Any, **kwargs: Any) -> Claim:
        if self._pid != os.getpid():  # one int comparison per delivery
            parent, self._pid = self._pid, os.getpid()
            warn_if_several_processes(
                f"this process (pid {self._pid}) was forked from the one that built the "
                f"receiver (pid {parent}), as a pre-forking server does with a preloaded app"
            )
        return super().claim(*args, **kwargs)


_warned_pid: int | None = None
_warn_lock = threading.Lock()


def warn_if_several_processes(reason: str | None = None) -> bool:
    """Log a WARNING, once per process, when an in-memory store cannot be right here.

    ``reason`` says why; without one the environment is checked: gunicorn sets
    ``SERVER_SOFTWARE`` in the master before it loads the app or forks a worker, so the
    app's workers (preloaded or not) all see it. Returns whether it warned.
    """
    global _warned_pid
    if reason is None:
        software = os.environ.get("SERVER_SOFTWARE", "")
        if not software.lower().startswith("gunicorn"):
            return False
        reason = (
            f"it runs under {software[:40]}, whose workers are separate processes "
            "(and are restarted, which empties their memory)"
        )
    with _warn_lock:
        if _warned_pid == os.getpid():
            return False
        _warned_pid = os.getpid()
    logger.warning(
        "the default in-memory idempotency store is private to one process, but %s: each "
        "process keeps its own records, so a duplicate that reaches another one runs the "
        "handlers again. Use store=SQLiteStore(path) (the workers of one machine) or "
        "store=RedisStore(url) (several machines); pass store=MemoryStore() to say you run "
        "one process.",
        reason,
    )
    return True
