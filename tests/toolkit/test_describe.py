"""flymy_receiver.describe: what ``listen`` prints about a delivery, bounded and inert."""

from __future__ import annotations

import tracemalloc
from decimal import Decimal
from typing import Any

import pytest

from flymy_receiver.describe import SHOW_LIMIT, describe, escape_controls, inline, show
from flymy_receiver.testing import make_event, signed_request

KEY = b"whsec-describe"
# Each can move the cursor, recolour, retitle the window or reorder the text on a terminal.
HOSTILE = [
    "\x1b[2J\x1b[H",  # clear the screen
    "\x1b]0;owned\x07",  # set the window title
    "\x9b31m",  # a C1 control sequence introducer
    "\x7f",
    "\x00",
    "\r",
    "\u202egnp.exe",  # right-to-left override
    "\u2028",
    "\u200b",
]


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def _lines(event: Any, **kw: Any) -> list[str]:
    req = signed_request(event, KEY)
    return describe(req.body, list(req.headers.items()), [KEY], **kw)


@pytest.mark.parametrize("text", HOSTILE)
def test_escape_controls_leaves_nothing_a_terminal_would_interpret(text: str) -> None:
    escaped = escape_controls(f"before{text}after")
    assert escaped.isprintable(), escaped
    assert escaped.startswith("before")
    assert escaped.endswith("after")
    assert "\\" in escaped


def test_escape_controls_keeps_ordinary_text() -> None:
    for text in ("Dana Lee", "café — naïve", "日本語", "🎉", 'quotes " and \\ stay'):
        assert escape_controls(text) == text


def test_show_costs_the_same_whatever_the_value_holds() -> None:
    # 400 lists 500 deep: indented whole, that is ~200 MB of text (83 s and 3.7 GiB for the
    # issue's 4 MiB body); a preview of 2000 characters needs none of it.
    value = [_nested(500) for _ in range(400)]
    tracemalloc.start()
    try:
        text = show(value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    assert len(text) == SHOW_LIMIT + len("... (cut)")
    assert text.endswith("... (cut)")


def test_show_handles_the_deepest_body_the_receiver_accepts() -> None:
    text = show(_nested(1024))  # deeper than Python's recursion limit
    assert text.startswith("[\n      [\n        [")
    assert text.endswith("... (cut)")
    assert "leaf" in show(_nested(1024), limit=10**6)


def test_show_and_inline_give_json() -> None:
    value = {"score": 3, "ok": True, "none": None, "tags": ["a", "b"], "empty": {}, "n": []}
    assert show(value, prefix="") == (
        '{\n  "score": 3,\n  "ok": true,\n  "none": null,\n  "tags": [\n    "a",\n    "b"\n  ],'
        '\n  "empty": {},\n  "n": []\n}'
    )
    assert inline(value) == '{"score":3,"ok":true,"none":null,"tags":["a","b"],"empty":{},"n":[]}'
    assert inline("run_1") == "run_1"
    assert inline(Decimal("1" * 5000)).endswith("... (cut)")
    assert inline("x" * 1000).endswith("...")
    assert len(inline("x" * 10**6)) < 300


def test_describe_escapes_everything_that_comes_from_the_payload() -> None:
    hostile = "".join(HOSTILE)
    event = {
        "event": "run.completed" + hostile,
        "timestamp": hostile,
        "data": {
            "run_id": "run_" + hostile,
            "agent_id": hostile,
            "agent_name": hostile,
            "status": hostile,
            "output": {hostile: [hostile, {"k": hostile}]},
            "error": {"type": hostile, "message": hostile},
        },
    }
    lines = _lines(event)
    assert len(lines) >= 4
    for line in lines:
        for part in line.split("\n"):
            assert part.isprintable(), part
    assert "\\x1b[2J" in "\n".join(lines)


def test_describe_says_what_it_checked() -> None:
    lines = _lines(make_event("run.completed", run_id="run_seen", agent_name="Lead Scorer"))
    assert lines[0] == "  signature: valid"
    assert "run: run_seen  agent: Lead Scorer (agent_abc123)" in lines[1]
    assert lines[2].startswith("  output: {")


@pytest.mark.parametrize("status", [405, 413, 415])
def test_describe_never_judges_a_signature_the_receiver_did_not_check(status: int) -> None:
    # A correctly signed body, cut at the size limit: its signature no longer matches, but
    # the receiver answered 413 without looking at it.
    req = signed_request(make_event("run.completed"), KEY)
    cut = req.body[: len(req.body) // 2]
    lines = describe(cut, list(req.headers.items()), [KEY], status=status)
    assert "INVALID" not in "\n".join(lines)
    assert "before the signature was checked" in lines[0]


def test_describe_a_forged_request() -> None:
    req = signed_request(make_event("run.completed"), b"not-the-key")
    [line] = describe(req.body, list(req.headers.items()), [KEY], status=401)
    assert line.startswith("  signature: INVALID (signature does not match; likely cause:")
