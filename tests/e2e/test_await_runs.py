"""examples/await_runs.py awaits its runs' webhooks; ``flymy-receiver send`` is the platform.

Once with the script serving the webhook itself, once with the Flask example under gunicorn
(two workers) receiving them and the script awaiting through the SQLite store they share.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import SECRET, require
from tests.servers import EXAMPLES, PYTHON, ROOT, free_port, gunicorn, serve, stop

pytestmark = pytest.mark.e2e

SEND = Path(PYTHON).parent / "flymy-receiver"  # the console script of this interpreter
LIMIT = 120.0


class Script:
    """examples/await_runs.py running, its output read line by line with bounded waits."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, str(EXAMPLES / "await_runs.py"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env},
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """Read lines until ``count`` of them match ``pattern``; their matches."""
        found: list[re.Match[str]] = []
        deadline = time.monotonic() + LIMIT
        while len(found) < count:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} in:\n" + "\n".join(self.seen)) from None
            if line is None:
                raise AssertionError(
                    f"the script ended before {pattern!r}:\n" + "\n".join(self.seen)
                )
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                found.append(match)
        return found

    def finish(self) -> int:
        return self.proc.wait(LIMIT)


@pytest.fixture
def script_env(tmp_path: Path) -> dict[str, str]:
    return {
        "FLYMY_WEBHOOK_SECRET": SECRET,
        "LEADS_DB": str(tmp_path / "leads.sqlite3"),
        "FLYMY_STORE": "memory://",
    }


def send(port: int, run_id: str, event: str = "run.completed") -> None:
    """What the platform would post once the run ends."""
    assert SEND.exists(), f"no console script next to {PYTHON}"
    url = f"http://127.0.0.1:{port}/webhooks/flymy"
    argv = [str(SEND), "send", url, "--secret", SECRET, "--event", event, "--run-id", run_id]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "-> 200" in result.stdout


def test_the_script_serves_and_awaits_its_runs(script_env: dict[str, str], tmp_path: Path) -> None:
    require("starlette")
    require("uvicorn")
    script = Script(["--count", "3", "--port", "0", "--timeout", str(LIMIT)], script_env, tmp_path)
    try:
        port = int(script.until(r"receiving webhooks on http://127\.0\.0\.1:(\d+)/")[0][1])
        runs = [m[1] for m in script.until(r"^started (run_\w+)$", count=3)]
        send(port, runs[2], "run.failed")
        send(port, runs[0])
        send(port, runs[0])  # the platform retried: a duplicate
        send(port, runs[1])
        done = script.until(r"^(run\.\w+) (run_\w+) after [\d.]+ s: (\w+)$", count=3)
        script.until(r"^all 3 runs done$")
        assert script.finish() == 0, "\n".join(script.seen)
    finally:
        stop(script.proc)
    # In the order the webhooks were handled, each run once, each handler's verdict.
    assert [(m[1], m[2], m[3]) for m in done] == [
        ("run.failed", runs[2], "handled"),
        ("run.completed", runs[0], "handled"),
        ("run.completed", runs[1], "handled"),
    ]


def test_the_script_awaits_runs_another_server_receives(
    script_env: dict[str, str], tmp_path: Path
) -> None:
    require("flask")
    require("gunicorn")
    env = {**script_env, "FLYMY_STORE": f"sqlite:///{tmp_path / 'deliveries.sqlite3'}"}
    port = free_port()
    with serve(gunicorn("flask_app:app", port, workers=2), port, env=env, cwd=EXAMPLES):
        script = Script(["--count", "4", "--timeout", str(LIMIT)], env, tmp_path)
        try:
            runs = [m[1] for m in script.until(r"^started (run_\w+)$", count=4)]
            for run_id in reversed(runs):
                send(port, run_id)
            done = script.until(r"^run\.completed (run_\w+) after [\d.]+ s: handled$", count=4)
            assert script.finish() == 0, "\n".join(script.seen)
        finally:
            stop(script.proc)
    assert [m[1] for m in done] == list(reversed(runs))


def test_the_script_refuses_to_wait_for_nothing(script_env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [PYTHON, str(EXAMPLES / "await_runs.py"), "--count", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **script_env},
        cwd=tmp_path,
        timeout=LIMIT,
        check=False,
    )
    assert result.returncode == 2
    assert "nothing would receive the webhooks" in result.stderr
