"""The README's quick start under ``gunicorn -w 2``: the default store says it is wrong there."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.servers import EXAMPLES, free_port, gunicorn, post, serve, server_log

pytestmark = pytest.mark.e2e

WARNING = "the default in-memory idempotency store is private to one process"


def _wait_for(proc: subprocess.Popen[bytes], text: str, count: int) -> str:
    log = ""
    for _ in range(300):  # workers boot after the port is bound: wait, bounded (30 s)
        log = server_log(proc)
        if log.count(text) >= count:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not {count} times in the server's log:\n{log[-4000:]}")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"FLYMY_WEBHOOK_SECRET": SECRET, "LEADS_DB": str(tmp_path / "leads.sqlite3"), **extra}


def _deliver(port: int) -> None:
    req = signed_request(make_event("run.completed"), SECRET)
    assert post(port, req.body, req.headers)[0] == 200


def test_each_gunicorn_worker_warns_about_the_default_store(tmp_path: Path) -> None:
    require("flask")
    require("gunicorn")
    port = free_port()
    argv = gunicorn("flask_app:app", port, workers=2)  # each worker imports the app
    with serve(argv, port, env=_env(tmp_path), cwd=EXAMPLES) as proc:
        log = _wait_for(proc, WARNING, 2)
    line = next(line for line in log.splitlines() if WARNING in line)
    assert "under gunicorn/" in line
    assert "SQLiteStore" in line
    assert "RedisStore" in line
    assert SECRET not in log


def test_a_preloaded_app_warns_in_the_master_and_in_each_forked_worker(tmp_path: Path) -> None:
    require("flask")
    require("gunicorn")
    port = free_port()
    argv = gunicorn("flask_app:app", port, workers=2)
    argv.insert(-1, "--preload")  # built once in the master, then forked
    with serve(argv, port, env=_env(tmp_path), cwd=EXAMPLES) as proc:
        _wait_for(proc, WARNING, 1)  # the master, while it loads the app
        _deliver(port)  # the worker that takes it notices it was forked
        log = _wait_for(proc, "was forked from the one that built the receiver", 1)
    assert log.count(WARNING) >= 2


def test_a_shared_store_under_gunicorn_does_not_warn(tmp_path: Path) -> None:
    require("flask")
    require("gunicorn")
    port = free_port()
    argv = gunicorn("flask_app:app", port, workers=2)
    argv.insert(-1, "--preload")  # loaded before any worker boots: the log below is complete
    store = f"sqlite:///{tmp_path / 'deliveries.sqlite3'}"
    with serve(argv, port, env=_env(tmp_path, FLYMY_STORE=store), cwd=EXAMPLES) as proc:
        _wait_for(proc, "Booting worker", 2)
        _deliver(port)
        log = server_log(proc)
    assert WARNING not in log
