"""`flymy-receiver send` to each example app under its real server (gunicorn / uvicorn)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SECRET, require
from tests.servers import (
    EXAMPLES,
    django_example_env,
    free_port,
    gunicorn,
    serve,
    server_log,
    uvicorn,
)
from tests.toolkit.cli_runner import cli

pytestmark = pytest.mark.e2e

# name: (module that must be installed, the app, the server)
APPS: dict[str, tuple[str, str, str]] = {
    "flask-gunicorn": ("flask", "flask_app:app", "gunicorn"),
    "django-gunicorn": ("django", "django_project.wsgi:application", "gunicorn"),
    "starlette-uvicorn": ("starlette", "starlette_app:app", "uvicorn"),
    "fastapi-uvicorn": ("fastapi", "fastapi_app:app", "uvicorn"),
}


def _argv(app: str, server: str, port: int) -> list[str]:
    # Two gunicorn workers sharing the SQLite store: duplicates are caught whichever answers.
    return gunicorn(app, port, workers=2) if server == "gunicorn" else uvicorn(app, port)


def _rows(db: Path, table: str, run_id: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        if not found:
            return []
        query = f"SELECT * FROM {table} WHERE run_id = ?"  # noqa: S608 - fixed table names
        return conn.execute(query, (run_id,)).fetchall()


def _run_ids(stdout: str) -> list[str]:
    # Each line: "<n>/<count> <event> <run_id> -> <status> <reason> <body>"
    return [line.split()[2] for line in stdout.strip().splitlines()]


@pytest.mark.parametrize("name", list(APPS))
def test_send_to_each_example_app(name: str, tmp_path: Path) -> None:
    module, app, kind = APPS[name]
    require(module)
    require(kind)
    port = free_port()
    leads_db = tmp_path / "leads.sqlite3"
    env = {
        "FLYMY_WEBHOOK_SECRET": SECRET,
        "FLYMY_STORE": f"sqlite:///{tmp_path / 'deliveries.sqlite3'}",
        "LEADS_DB": str(leads_db),
    }
    if module == "django":  # its store is DjangoStore, in its own database
        env = django_example_env(tmp_path, env)
    url = f"http://127.0.0.1:{port}/webhooks/flymy"
    with serve(_argv(app, kind, port), port, env=env, cwd=EXAMPLES) as proc:
        # The console script, with the secret from the environment as a deployer would.
        sent = cli("send", url, "--count", "2", env={"FLYMY_WEBHOOK_SECRET": SECRET}, script=True)
        assert sent.returncode == 0, sent.stdout + sent.stderr + server_log(proc)
        assert sent.stdout.count('-> 200 OK {"received":true}') == 2
        for run_id in _run_ids(sent.stdout):
            [row] = _rows(leads_db, "leads", run_id)
            assert row[1] == "agent_abc123"
            assert row[3].startswith("Focus on engineering productivity")

        error = tmp_path / "error.json"
        error.write_text(json.dumps({"type": "timeout", "message": "agent took too long"}))
        failed = cli("send", url, "--secret", SECRET, "--event", "run.failed", "--data", str(error))
        assert failed.returncode == 0, failed.stdout + failed.stderr
        [run_id] = _run_ids(failed.stdout)
        assert _rows(leads_db, "failures", run_id) == [(run_id, "timeout", "agent took too long")]

        duplicate = cli("send", url, "--secret", SECRET, "--run-id", "run_dup1", "--count", "2")
        assert duplicate.returncode == 0
        assert '"duplicate":true' in duplicate.stdout.splitlines()[1]
        assert len(_rows(leads_db, "leads", "run_dup1")) == 1

        # An output off the LeadProfile model: the handler does not run, 500, exit code 1.
        off_model = tmp_path / "off_model.json"
        off_model.write_text(json.dumps({"score": 3}))
        mismatch = cli("send", url, "--secret", SECRET, "--data", str(off_model))
        assert mismatch.returncode == 1
        assert "-> 500 " in mismatch.stdout
        assert _rows(leads_db, "leads", _run_ids(mismatch.stdout)[0]) == []

        forged = cli("send", url, "--secret", "not-the-apps-secret")
        assert forged.returncode == 1
        assert "-> 401 " in forged.stdout
        assert _rows(leads_db, "leads", _run_ids(forged.stdout)[0]) == []
        assert SECRET not in server_log(proc)
