"""The README's first command: examples/demo.py runs and shows the events arriving."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import require
from tests.servers import EXAMPLES, PYTHON

pytestmark = pytest.mark.e2e


def test_the_demo_runs_the_flask_example_and_exits_0() -> None:
    require("flask")
    require("gunicorn")
    # The demo bounds its own waits (start, each request) and stops its server by PID.
    result = subprocess.run(
        [PYTHON, str(EXAMPLES / "demo.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "POST run.completed            -> 200" in out
    assert '-> 200 {"received":true,"duplicate":true}' in out
    assert "POST a forged signature       -> 401" in out
    assert "lead profiled: run run_" in out  # the handler's own line, from the server output
    assert "run failed: run run_" in out
    assert out.count("\nleads (") == 1  # the duplicate stored nothing
    assert out.count("\nfailures (") == 1
    assert "whsec-demo-only" not in out.split("--- server output ---")[1]
