"""The three stores under test, each with a way to let time pass.

MemoryStore and SQLiteStore take a clock, so time is simulated; RedisStore expires keys
on the server, so its tests wait for real (leases there are a fraction of a second).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flymy_receiver.stores import MemoryStore, Store

BACKENDS = ["memory", "sqlite", "redis"]
#: The stores that keep the delivery journal too (tests/stores/test_journal_contract.py).
JOURNAL_BACKENDS = ["memory", "sqlite", "redis"]


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    """A store, the way to make ``seconds`` pass for it, and a factory of fresh keys."""

    name: str
    store: Store
    advance: Callable[[float], None]
    extra: object = None  # the SQLite path or the Redis server

    @staticmethod
    def key(label: str = "run.completed") -> str:
        return f"{label}:run_{uuid.uuid4().hex[:12]}"


def make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Build the store called ``name`` (a generator, for a yield fixture)."""
    if name == "memory":
        clock = FakeClock()
        yield Backend(name, MemoryStore(clock=clock), clock.advance)
    elif name == "sqlite":
        from flymy_receiver.stores import SQLiteStore

        clock = FakeClock()
        path = tmp_path / "deliveries.sqlite3"
        store = SQLiteStore(path, clock=clock)
        yield Backend(name, store, clock.advance, path)
        store.close()
    elif name == "redis":
        from flymy_receiver.stores import RedisStore

        server = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_url")  # emptied
        store = RedisStore(server.url)
        # Redis keeps time itself: wait a little past the expiry asked for.
        yield Backend(name, store, lambda seconds: time.sleep(seconds + 0.05), server)
        store.client.close()
    else:  # pragma: no cover
        raise ValueError(name)
