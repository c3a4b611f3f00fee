"""Every Python block in ``docs/`` runs as a test (see ``tests/docs/snippets.py``), and the
site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.docs.snippets import DOCS, ROOT, blocks, page_script, pages, project_files
from tests.servers import PYTHON

_RUNNER = """
import ast, asyncio, sys
source = open(sys.argv[1]).read()
code = compile(source, sys.argv[1], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
namespace = {"__name__": "__main__"}
result = eval(code, namespace)
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FLYMY_WEBHOOK_SECRET", "CI")}
    env["FLYMY_WEBHOOK_SECRET"] = "whsec-docs-test"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (".", env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("docs-project")
    for name, code in project_files().items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(code)
    return where


def test_a_skipped_block_says_why() -> None:
    text = "\n".join(p.read_text() for p in pages())
    assert "<!-- not run:" in text  # the convention is used, so the pattern below is live
    bare = re.findall(r"<!-- not run\s*(?::\s*)?-->", text)
    assert not bare, "a not-run marker without a reason"


def test_the_docs_have_runnable_blocks_on_most_pages() -> None:
    with_code = [p for p in pages() if blocks(p)]
    runnable = [
        p for p in with_code if page_script(p) is not None or any(b.file for b in blocks(p))
    ]
    assert len(with_code) >= 10
    assert len(runnable) == len(with_code), "a page whose every block is marked not run"


@pytest.mark.parametrize(
    "page",
    [p for p in pages() if page_script(p) is not None],
    ids=lambda p: str(p.relative_to(DOCS)),
)
def test_page_blocks_run(page: Path, project: Path) -> None:
    for module in ("flask", "starlette", "django"):
        require(module)
    _run_script(project, f"_page_{page.stem}.py", page_script(page) or "")


def _run_script(project: Path, name: str, text: str) -> None:
    """Run a page's blocks as one script in the docs project, as a reader would."""
    script = project / name
    script.write_text(text)
    runner = project / "_run_page.py"
    runner.write_text(_RUNNER)
    result = subprocess.run(
        [PYTHON, str(runner), str(script)],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_named_files_compile() -> None:
    for name, code in project_files().items():
        compile(code, name, "exec")


def test_the_doc_test_files_pass(project: Path) -> None:
    for module in ("flask", "starlette", "httpx", "django"):
        require(module)
    tests = sorted(name for name in project_files() if Path(name).name.startswith("test_"))
    assert len(tests) >= 6
    files = project_files()
    expected = sum(len(re.findall(r"^(?:async )?def test_", files[n], re.MULTILINE)) for n in tests)
    env = _env()
    result = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=project,
        env={k: v for k, v in env.items() if k != "FLYMY_WEBHOOK_SECRET"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{expected} passed" in output, output


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    require("mkdocs")
    result = subprocess.run(
        [PYTHON, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "api" / "index.html").exists()


README = ROOT / "README.md"


def test_the_readme_is_a_short_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    # The two commands, the test command on its own line and labelled as what CI runs.
    assert "examples/demo.py" in text.split("```bash", 2)[1]
    assert "\nbash .ci/run\n" in text
    assert "exactly what CI runs" in text


def test_readme_files_are_the_docs_files() -> None:
    """A file the README shows (``# webhooks.py``) is the same file the docs run."""
    docs = project_files()
    shown = {b.file: b.code for b in blocks(README) if b.file}
    assert {"webhooks.py", "app.py", "urls.py"} <= set(shown)
    for name, code in shown.items():
        assert docs.get(name) == code, f"README's {name} differs from the docs'"


def test_readme_blocks_run(project: Path) -> None:
    for module in ("fastapi", "flask", "django"):
        require(module)
    script = page_script(README)
    assert script
    _run_script(project, "_page_readme.py", script)


def test_readme_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), target
