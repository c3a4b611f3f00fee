"""The example apps, each served by a real server on 127.0.0.1 for the whole session.

One server per app is started the first time a test asks for it and stopped by PID at the
end of the session; tests tell their deliveries apart by fresh run ids, so they can share
the server and its LEADS_DB.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SECRET, require
from tests.servers import EXAMPLES, django_example_env, free_port, gunicorn, serve, uvicorn

#: Small, so that the limit tests send little; every example event is far below it.
MAX_BODY_SIZE = 64 * 1024

# name: (module that must be installed, the app to serve, the server)
APPS: dict[str, tuple[str, str, str]] = {
    "flask-gunicorn": ("flask", "flask_app:app", "gunicorn"),
    "django-gunicorn": ("django", "django_project.wsgi:application", "gunicorn"),
    "starlette-uvicorn": ("starlette", "starlette_app:app", "uvicorn"),
    "fastapi-uvicorn": ("fastapi", "fastapi_app:app", "uvicorn"),
    "django-uvicorn": ("django", "django_project.asgi:application", "uvicorn"),
    # The same Flask example with its idempotency store and journal in PostgreSQL.
    "flask-gunicorn-postgres": ("flask", "flask_app:app", "gunicorn"),
}
#: The apps whose FLYMY_STORE is a fresh database on the throwaway PostgreSQL cluster.
ON_POSTGRES = {"flask-gunicorn-postgres"}


@dataclass
class Server:
    """A running example app: where it listens and where its handlers write."""

    name: str
    port: int
    leads_db: Path
    proc: Any
    env: dict[str, str]

    def rows(self, table: str, run_id: str) -> list[tuple[Any, ...]]:
        """The rows the handlers wrote for ``run_id`` (none if the table does not exist)."""
        if not self.leads_db.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.leads_db, timeout=30)) as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            if not exists:
                return []
            return db.execute(
                f"SELECT * FROM {table} WHERE run_id = ?",  # noqa: S608 - fixed table names
                (run_id,),
            ).fetchall()


def _argv(app: str, server: str, port: int) -> list[str]:
    # Two gunicorn workers: a redelivery may reach the other one, so the store must be shared.
    return gunicorn(app, port, workers=2) if server == "gunicorn" else uvicorn(app, port)


@pytest.fixture(scope="session", params=list(APPS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One example app under its real server."""
    name: str = request.param
    module, app, kind = APPS[name]
    require(module)
    require(kind)
    tmp = tmp_path_factory.mktemp(name)
    port = free_port()
    # Shared by the gunicorn workers: a duplicate is caught whichever worker gets it.
    store = f"sqlite:///{tmp / 'deliveries.sqlite3'}"
    if name in ON_POSTGRES:
        require("psycopg")
        store = request.getfixturevalue("postgres_server").create_database()
    env = {
        "FLYMY_WEBHOOK_SECRET": SECRET,
        "FLYMY_STORE": store,
        "LEADS_DB": str(tmp / "leads.sqlite3"),
        "FLYMY_MAX_BODY_SIZE": str(MAX_BODY_SIZE),
    }
    if module == "django":  # its store is DjangoStore, in its own database
        env = django_example_env(tmp, env)
    with serve(_argv(app, kind, port), port, env=env, cwd=EXAMPLES) as proc:
        yield Server(name, port, tmp / "leads.sqlite3", proc, env)
