"""The documentation's Python blocks, as files and as runnable page scripts.

Conventions (``docs/development.md`` says them too):

- A block whose first line is ``# name.py`` is that file of the docs' example project; every
  such file is written into one directory, and the ``test_*.py`` files among them run with
  pytest there.
- Every other block runs: the blocks of a page run in order in one namespace, as a reader
  pasting them into one session would (a page's first block brings its own imports), with the
  project's files importable and ``FLYMY_WEBHOOK_SECRET`` set. Top-level ``await`` is allowed.
- A block right after a line ``<!-- not run: why -->`` is not run; the reason is required.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE)
_FILE = re.compile(r"# ([\w/]+\.py)\b")
_NOT_RUN = re.compile(r"<!-- not run: (?P<why>\S.*?) -->")


@dataclass
class Block:
    page: str
    line: int
    code: str
    file: str | None  # the project file it is, if named
    not_run: str | None  # why it is not run


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in _BLOCK.finditer("\n" + text):
        code = match.group("code")
        first = code.splitlines()[0] if code else ""
        named = _FILE.match(first)
        skip = _NOT_RUN.search(match.group("before"))
        line = text[: max(match.start("code") - 1, 0)].count("\n") + 1
        found.append(
            Block(
                page=str(path.relative_to(ROOT)),
                line=line,
                code=code,
                file=named.group(1) if named else None,
                not_run=skip.group("why") if skip else None,
            )
        )
    return found


def project_files() -> dict[str, str]:
    """Every named block of the docs: {file name: code}; a name appears once."""
    files: dict[str, str] = {}
    for path in pages():
        for block in blocks(path):
            if block.file is None:
                continue
            assert block.file not in files, f"two doc snippets are {block.file}"
            files[block.file] = block.code
    return files


def page_script(path: Path) -> str | None:
    """The page's runnable unnamed blocks as one script (``None`` when it has none)."""
    runnable = [b for b in blocks(path) if b.file is None and b.not_run is None]
    if not runnable:
        return None
    return "\n".join(f"# --- {b.page}:{b.line}\n{b.code}" for b in runnable)
