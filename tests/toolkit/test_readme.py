"""The README's snippets are true: each one headed ``# name.py`` is written out as that file
and the test files among them are run with pytest, as a reader would run them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.conftest import require
from tests.servers import PYTHON, ROOT

README = ROOT / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_FILE = re.compile(r"# ([\w/]+\.py)\b")


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def snippet_files(text: str) -> dict[str, str]:
    """Every python block whose first line names a file: {file name: its code}."""
    files: dict[str, str] = {}
    for block in _BLOCK.findall(text):
        match = _FILE.match(block.splitlines()[0])
        if match:
            assert match.group(1) not in files, f"two README snippets are {match.group(1)}"
            files[match.group(1)] = block
    return files


def test_every_testing_snippet_is_a_file_that_runs() -> None:
    text = README.read_text()
    testing = _section(text, "Testing your handlers")
    untagged = [b for b in _BLOCK.findall(testing) if not _FILE.match(b.splitlines()[0])]
    assert not untagged, f"README testing snippets without a '# file.py' line: {untagged}"
    assert len(_BLOCK.findall(testing)) >= 6


def test_the_readme_testing_snippets_pass(tmp_path: Path) -> None:
    for module in ("flask", "starlette", "httpx", "django"):
        require(module)
    files = snippet_files(README.read_text())
    assert {"webhooks.py", "app.py", "urls.py"} <= set(files)  # what the tests import
    tests = [name for name in files if name.startswith("test_")]
    expected = sum(len(re.findall(r"^def test_", files[name], re.MULTILINE)) for name in tests)
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    # A reader's shell: no secret set, so the plugin provides one.
    env = {k: v for k, v in os.environ.items() if k not in ("FLYMY_WEBHOOK_SECRET", "CI")}
    result = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{expected} passed" in output, output
    assert expected >= 7
