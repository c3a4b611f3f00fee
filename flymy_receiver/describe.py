"""What a developer sees of one delivery: short, bounded, terminal-safe text.

Used by ``flymy-receiver listen``; free of any server, so another front end (a web page, a
log) can show deliveries the same way. Everything here costs at most a bounded amount of
work whatever the body holds (megabytes, 1024 levels of nesting), and every piece of text
that comes from a payload has its control characters escaped, so that an escape sequence in
a delivery cannot drive the terminal it is printed on.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

from .errors import InvalidSignature, WebhookError
from .signature import SIGNATURE_HEADER, explain_mismatch, match_signature, signature_candidates

__all__ = ["describe", "escape_controls", "inline", "show"]

#: How much of an output, error or data field ``show`` prints.
SHOW_LIMIT = 2000
#: How much of a single field (run id, agent name, ...) ``inline`` prints.
INLINE_LIMIT = 200

# Statuses the receiver decides before it checks the signature: for them the signature was
# not checked, so nothing may be said about it.
_REFUSED_UNCHECKED = {
    405: "method not allowed",
    413: "body over max_body_size",
    415: "Content-Encoding not supported",
}
# Control (C0, DEL, C1), format (bidi overrides, zero-width), surrogate, line/paragraph
# separator: each can move the cursor, recolour, retitle or reorder what a terminal shows.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_DEEPEST_INDENT = 16  # deeper levels are shown at this indentation, not 2 more per level


def escape_controls(text: str) -> str:
    """``text`` with every control character (newlines too), format character (bidi
    overrides, zero-width) and line separator written as an escape (``\\x1b``,
    ``\\u202e``); every other character is kept as it is."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(
        _escape(char) if unicodedata.category(char) in _UNSAFE_CATEGORIES else char for char in text
    )


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def show(value: Any, limit: int = SHOW_LIMIT, *, prefix: str = "    ") -> str:
    """``value`` (parsed JSON) as indented JSON, cut after about ``limit`` characters.

    Costs O(``limit``) whatever the size or depth of ``value``; continuation lines start
    with ``prefix``. Terminal-safe.
    """
    return _bounded(_tokens(value, newline="\n" + prefix), limit)


def inline(value: Any, limit: int = INLINE_LIMIT) -> str:
    """One field on one line: a string as itself, anything else as compact JSON, cut after
    ``limit`` characters. Terminal-safe."""
    if isinstance(value, str):
        text = escape_controls(value[:limit])
        return text if len(value) <= limit else text + "..."
    return _bounded(_tokens(value, newline=None), limit)


def _bounded(tokens: Iterator[str], limit: int) -> str:
    pieces: list[str] = []
    size = 0
    for token in tokens:
        pieces.append(token)
        size += len(token)
        if size > limit:
            return "".join(pieces)[:limit] + "... (cut)"
    return "".join(pieces)


def _tokens(value: Any, *, newline: str | None) -> Iterator[str]:
    """JSON text in small pieces; indented after ``newline`` (``None``: compact)."""
    # Iterative, not recursive: a body may nest 1024 levels, deeper than Python's stack.
    frames: list[tuple[Iterator[tuple[Any, Any]], str]] = [(iter([(None, value)]), "")]
    first = True
    while frames:
        entries, closing = frames[-1]
        entry = next(entries, None)
        if entry is None:
            frames.pop()
            if closing:
                yield closing if first else _indent(len(frames) - 1, newline) + closing
            first = False
            continue
        key, item = entry
        if len(frames) > 1:
            yield ("" if first else ",") + _indent(len(frames) - 1, newline)
        if key is not None:
            yield _scalar(key) + (":" if newline is None else ": ")
        first = False
        if isinstance(item, dict):
            yield "{"
            frames.append((iter(item.items()), "}"))
            first = True
        elif isinstance(item, (list, tuple)):
            yield "["
            frames.append((((None, element) for element in item), "]"))
            first = True
        else:
            yield _scalar(item)


def _indent(depth: int, newline: str | None) -> str:
    return "" if newline is None else newline + "  " * min(depth, _DEEPEST_INDENT)


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        cut = value[: SHOW_LIMIT + 1]  # never encode more than can be shown
        text = json.dumps(cut, ensure_ascii=False)
        return escape_controls(text if cut == value else text[:-1] + '..."')
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float, Decimal)):
        try:
            text = str(value)
        except ValueError:  # an int past Python's digit limit for str()
            return "<a very long integer>"
        return text if len(text) <= SHOW_LIMIT else text[:SHOW_LIMIT] + "..."
    return escape_controls(repr(value)[:SHOW_LIMIT])


def describe(
    body: bytes,
    headers: Iterable[tuple[str, str]],
    keys: Sequence[bytes],
    *,
    status: int | None = None,
) -> list[str]:
    """Lines about one delivery: the signature, then the event, run, agent and its output or
    error. ``status`` is the receiver's answer: when it refused the request before checking
    the signature (405, 413, 415), the lines say so instead of judging the signature.

    Never shows the secret or the expected signature; every line is terminal-safe.
    """
    from .events import parse_json

    if status in _REFUSED_UNCHECKED:
        reason = _REFUSED_UNCHECKED[status]
        return [f"  {reason}: refused before the signature was checked ({len(body)} bytes read)"]
    values = [v for k, v in headers if k.lower() == SIGNATURE_HEADER.lower()]
    try:
        candidates = signature_candidates(values)
        index = match_signature(body, candidates, keys)
    except InvalidSignature as exc:
        reason = exc.detail
        if exc.code == "signature_mismatch":
            reason += f"; likely cause: {explain_mismatch(body, keys, candidates)}"
        return [f"  signature: INVALID ({escape_controls(reason)})"]
    lines = [f"  signature: valid (secret #{index + 1})" if len(keys) > 1 else "  signature: valid"]
    try:
        obj = parse_json(body)
    except WebhookError as exc:
        return [*lines, f"  body: {inline(exc.detail)}"]
    if not isinstance(obj, dict):
        return [*lines, "  body: not a JSON object"]
    raw_data = obj.get("data")
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    agent = inline(data.get("agent_name") or "-")
    if data.get("agent_id") is not None:
        agent += f" ({inline(data.get('agent_id'))})"
    lines.append(
        f"  event: {inline(obj.get('event'))}  run: {inline(data.get('run_id', '-'))}"
        f"  agent: {agent}  status: {inline(data.get('status', '-'))}"
        f"  at: {inline(obj.get('timestamp', '-'))}"
    )
    if "output" in data:
        lines.append("  output: " + show(data["output"]))
    if "error" in data:
        error = data["error"]
        if isinstance(error, dict) and "type" in error:
            message = inline(error.get("message", ""))
            lines.append(f"  error: {inline(error.get('type'))}: {message}")
        else:
            lines.append("  error: " + show(error))
    if obj.get("event") not in ("run.completed", "run.failed"):
        lines.append("  data: " + show(data))
    return lines
