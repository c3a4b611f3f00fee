"""How the admin and ``manage.py flymy_journal`` show what the sender chose.

A body, a run id or a handler's error text may hold terminal escapes, bidirectional
controls or lone surrogates: shown as ``\\x1b``-style text, they are read, never
interpreted, and never break the page's or the terminal's encoding.
"""

from __future__ import annotations

import contextlib
import json

from ..describe import escape_controls

__all__ = ["pretty_body", "printable"]


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with every control, format or surrogate character written as an escape
    (``\\x1b``), as the command line shows them (``newlines`` keeps line breaks and tabs,
    for tracebacks and pretty-printed bodies)."""
    if text.isprintable() or not newlines:
        return escape_controls(text)
    return "\n".join(
        "\t".join(escape_controls(part) for part in line.split("\t")) for line in text.split("\n")
    )


def pretty_body(body: bytes, limit: int | None = None) -> str:
    """The body indented (the standard json module keeps integers of any size exact), or
    as received when it is not JSON; cut to ``limit`` characters if given."""
    text = body.decode("utf-8", errors="replace")
    with contextlib.suppress(ValueError, RecursionError):  # else shown as received
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"\n... (the first {limit} characters of {len(text)})"
    return printable(text, newlines=True)
