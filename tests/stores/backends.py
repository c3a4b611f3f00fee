"""The stores under test, each with a way to let time pass.

MemoryStore, SQLiteStore and DjangoStore take a clock, so time is simulated; RedisStore
expires keys on the server, and PostgresStore keeps time on the server's clock by default,
so their tests wait for real (leases there are a fraction of a second). DjangoStore runs on
SQLite (``django``) and on PostgreSQL (``django-postgres``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flymy_receiver.stores import MemoryStore, Store
from tests.conftest import require

BACKENDS = ["memory", "sqlite", "redis", "postgres", "django", "django-postgres"]
#: The stores that keep the delivery journal too (tests/stores/test_journal_contract.py).
JOURNAL_BACKENDS = ["memory", "sqlite", "redis", "postgres", "django", "django-postgres"]


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
    extra: object = None  # the SQLite path, the Redis server or the PostgreSQL server

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
    elif name == "postgres":
        require("psycopg")
        from flymy_receiver.stores import PostgresStore

        server = request.getfixturevalue("postgres_server")
        server.thaw()
        server.start()  # a no-op unless an outage test left it stopped
        # A fresh schema per test: its own tables, created by the store on first use.
        store = PostgresStore(server.url, schema=f"t_{uuid.uuid4().hex[:16]}")
        # The store keeps time on the server's clock: wait past the expiry asked for.
        yield Backend(name, store, lambda seconds: time.sleep(seconds + 0.05), server)
        store.close()
    elif name in ("django", "django-postgres"):
        yield from _django_backend(name, request)
    else:  # pragma: no cover
        raise ValueError(name)


def _django_backend(name: str, request: pytest.FixtureRequest) -> Iterator[Backend]:
    from tests.conftest import require

    require("django")
    from django.db import connections

    from flymy_receiver.django import DjangoStore
    from tests.django_db import empty, migrated, postgres_alias

    if name == "django":
        alias = migrated("default")
    else:
        require("psycopg")
        alias = postgres_alias(request.getfixturevalue("postgres_server"))
    connections[alias].close()  # a fresh connection: an earlier test may have broken it
    empty(alias)
    clock = FakeClock()
    yield Backend(name, DjangoStore(using=alias, clock=clock), clock.advance, alias)
    connections[alias].close()
