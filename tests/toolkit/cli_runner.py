"""Running the flymy-receiver command line from tests."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

from tests.servers import PYTHON, ROOT


def console_script(name: str = "flymy-receiver") -> Path:
    """The console script ``name`` of the environment these tests run in.

    Never a lookup on ``PATH``: that finds whatever install comes first (a global one, or
    none on a fresh machine), not the checkout under test.
    """
    folders = [Path(PYTHON).parent, Path(sysconfig.get_path("scripts"))]
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.exe"):
            if candidate.is_file():
                return candidate
    raise AssertionError(f"{name} is not installed next to {PYTHON}")


def cli(
    *args: str,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    script: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the command line (``python -m flymy_receiver``, or the console script)."""
    base_env = {k: v for k, v in os.environ.items() if k != "FLYMY_WEBHOOK_SECRET"}
    program = [str(console_script())] if script else [PYTHON, "-m", "flymy_receiver"]
    argv = [*program, *args]
    result = subprocess.run(
        argv,
        input=stdin.decode("latin-1"),
        capture_output=True,
        text=True,
        encoding="latin-1",
        env={**base_env, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd or ROOT,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result
