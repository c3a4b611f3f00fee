"""Running the flymy-receiver command line from tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.servers import PYTHON, ROOT


def cli(
    *args: str,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    script: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the command line (``python -m flymy_receiver``, or the console script)."""
    base_env = {k: v for k, v in os.environ.items() if k != "FLYMY_WEBHOOK_SECRET"}
    if script:
        executable = shutil.which("flymy-receiver")
        assert executable, "the flymy-receiver console script is not installed"
        argv = [executable, *args]
    else:
        argv = [PYTHON, "-m", "flymy_receiver", *args]
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
