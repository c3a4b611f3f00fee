"""The default store warns where one process's memory cannot be right: several workers."""

from __future__ import annotations

import logging
import subprocess
import textwrap
from pathlib import Path

import pytest

from flymy_receiver import Receiver
from flymy_receiver.stores import MemoryStore, memory
from flymy_receiver.testing import make_event, signed_request
from tests.servers import PYTHON, ROOT

SECRET = "whsec-default-store"


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if in a process that has not warned yet, started by no server.
    monkeypatch.setattr(memory, "_warned_pid", None)
    monkeypatch.delenv("SERVER_SOFTWARE", raising=False)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flymy_receiver" and r.levelno == logging.WARNING
    ]


def test_under_gunicorn_the_default_store_warns_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/23.0.0")
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        Receiver(secret=SECRET)
        Receiver(secret=SECRET)
    [message] = _warnings(caplog)
    assert "gunicorn/23.0.0" in message
    assert "SQLiteStore" in message
    assert "RedisStore" in message
    assert SECRET not in message


@pytest.mark.parametrize("software", [None, "waitress", "uvicorn", "Werkzeug/3.0"])
def test_one_process_servers_and_an_explicit_store_do_not_warn(
    software: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if software:
        monkeypatch.setenv("SERVER_SOFTWARE", software)
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        receiver = Receiver(secret=SECRET)
        receiver.on("run.completed")(lambda event: None)  # no "no handler wants" warning
        req = signed_request(make_event("run.completed"), SECRET)
        assert receiver.handle(req.body, req.headers).status == 200
    assert _warnings(caplog) == []
    assert isinstance(receiver.store, MemoryStore)


def test_an_explicit_memory_store_is_a_choice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/23.0.0")
    with caplog.at_level(logging.WARNING, logger="flymy_receiver"):
        Receiver(secret=SECRET, store=MemoryStore())
    assert _warnings(caplog) == []


FORKING_APP = """
import logging, os, sys
from flymy_receiver import Receiver
from flymy_receiver.testing import make_event, signed_request

logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
pid0 = os.getpid()
receiver = Receiver(secret="k")  # built before the fork, as a preloaded app is
receiver.on("run.completed")(lambda event: print("handled in", os.getpid() == pid0))
req = signed_request(make_event("run.completed"), "k")
pid = os.fork()
if pid == 0:
    print("child", receiver.handle(req.body, req.headers).status, flush=True)
    print("child", receiver.handle(req.body, req.headers).status, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", receiver.handle(req.body, req.headers).status, flush=True)
"""


def test_a_default_store_used_in_a_forked_process_warns_there(tmp_path: Path) -> None:
    script = tmp_path / "forking_app.py"
    script.write_text(textwrap.dedent(FORKING_APP))
    result = subprocess.run(
        [PYTHON, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stdout  # in the child, once; never in the parent
    assert "was forked from the one that built the receiver" in warnings[0]
    # The parent's memory never saw the child's delivery: exactly the duplicate it warns of.
    handled = [line for line in lines if not line.startswith("WARNING")]
    assert handled == [
        "handled in False",
        "child 200",
        "child 200",
        "handled in True",
        "parent 200",
    ]
