"""The tests run this checkout's own environment, never a program found on ``PATH``.

On a fresh machine nothing of the project is installed globally; a test that looked a
Python console script up on ``PATH`` failed there, and passed elsewhere only by testing
another install.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.servers import PYTHON, ROOT
from tests.toolkit.cli_runner import cli, console_script


def test_the_console_script_is_found_without_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.defpath if os.name != "posix" else "")
    script = console_script()
    # Installed for this interpreter: its first line names this environment's python.
    shebang = script.read_bytes().split(b"\n", 1)[0]
    if shebang.startswith(b"#!"):
        interpreter = shebang[2:].decode().strip().split()[0]
        assert Path(interpreter).parent == Path(PYTHON).parent, (interpreter, PYTHON)
    result = cli("--version", script=True)
    assert (result.returncode, result.stdout.split()[0]) == (0, "flymy-receiver")


def _python_scripts() -> set[str]:
    # Every console script a distribution of this environment installs (flymy-receiver,
    # gunicorn, uvicorn, rq, pytest, ...): each must be run as this environment's.
    return {ep.name for ep in entry_points(group="console_scripts")}


def test_no_test_runs_a_python_script_found_on_path() -> None:
    scripts = _python_scripts()
    assert {"flymy-receiver", "gunicorn", "uvicorn"} <= scripts
    names = "|".join(re.escape(name) for name in sorted(scripts, key=len, reverse=True))
    # shutil.which("gunicorn"), or an argv that starts with the bare script name.
    lookups = re.compile(rf"""which\(\s*["']({names})["']|\[\s*["']({names})["']\s*,""")
    offenders = []
    for folder in ("tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if lookups.search(line) and path.name != Path(__file__).name:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "run these with sys.executable -m ...:\n" + "\n".join(offenders)
