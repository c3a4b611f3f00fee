"""Fixtures for the Django app's tests: a migrated, emptied database and a table that
handlers write to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require

LEADS = "flymy_test_leads"


@pytest.fixture(params=["sqlite", "postgres"])
def alias(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty database alias, on SQLite and on PostgreSQL, with an empty leads
    table that the handlers under test write to."""
    require("django")
    from django.db import connections

    from flymy_receiver.django import registry
    from tests.django_db import empty, migrated, postgres_alias

    if request.param == "sqlite":
        name = migrated("default")
    else:
        require("psycopg")
        name = postgres_alias(request.getfixturevalue("postgres_server"))
    connections[name].close()
    empty(name)
    _empty_leads(name)
    registry.unregister()
    yield name
    registry.unregister()
    connections[name].close()


@pytest.fixture
def sqlite_alias() -> Iterator[str]:
    """The SQLite alias alone (for pages and commands, which need no second database)."""
    require("django")
    from flymy_receiver.django import registry
    from tests.django_db import empty, migrated

    name = migrated("default")
    empty(name)
    _empty_leads(name)
    registry.unregister()
    yield name
    registry.unregister()


def _empty_leads(alias: str) -> None:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {LEADS} (run_id VARCHAR(200) NOT NULL)")
        cursor.execute(f"DELETE FROM {LEADS}")  # noqa: S608 - a fixed table name


def insert_lead(alias: str, run_id: str) -> None:
    """What a handler writes: one row per run it saw."""
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute(f"INSERT INTO {LEADS} (run_id) VALUES (%s)", [run_id])  # noqa: S608


def leads(alias: str, run_id: str | None = None) -> list[str]:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT run_id FROM {LEADS}")  # noqa: S608
        rows = [row[0] for row in cursor.fetchall()]
    return [r for r in rows if run_id is None or r == run_id]


def request_for(run_id: str, **fields: Any) -> tuple[bytes, dict[str, str]]:
    from flymy_receiver.testing import make_event, signed_request
    from tests.conftest import SECRET

    req = signed_request(make_event("run.completed", run_id=run_id, **fields), SECRET)
    return req.body, req.headers
