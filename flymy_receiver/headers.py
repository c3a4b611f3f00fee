"""Reading the three request headers the receiver looks at, from whatever an adapter passes.

Adapters hand over a mapping or ``(name, value)`` pairs, with ``str`` or ``bytes`` names and
values (ASGI gives lowercase bytes, WSGI strings). Hand-written adapters pass odder things:
``{SIGNATURE_HEADER: request.headers.get(...)}`` gives ``None`` when the header is absent,
some frameworks give a list of lines. None of it may raise: a ``None`` value is an absent
header, a list or tuple holds the header's lines, a name that is not ``str``/``bytes`` (or a
pair that is not a pair) is not one of ours, and a value of another type is unreadable:
a signature that cannot be read is refused (401), an encoding that cannot be read is
refused (415), a length that cannot be read is ignored (the body is still measured).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .signature import SIGNATURE_HEADER

__all__ = ["READ_HEADERS", "Headers", "read_headers"]

Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]

#: Every request header the receiver reads. An adapter whose framework looks headers up
#: case-insensitively may pass only these: iterating all of a WSGI environ's headers cost
#: more than verifying a 1 KB body.
READ_HEADERS = (SIGNATURE_HEADER, "Content-Encoding", "Content-Length")

#: A declared length with more significant digits than this is beyond any size limit.
_MAX_LENGTH_DIGITS = 19
_BEYOND_ANY_LIMIT: int = 10**_MAX_LENGTH_DIGITS
#: What an encoding that is not text reads as: not identity, so 415.
UNREADABLE = "(unreadable)"

# Header name -> what it is, for str and bytes names alike (ASGI sends lowercase bytes):
# one dict lookup per header instead of decoding and lowering every name.
_SIGNATURE, _ENCODING, _LENGTH = "signature", "encoding", "length"
_HEADER_KINDS: dict[str | bytes, str] = {}
for _name, _kind in zip(READ_HEADERS, (_SIGNATURE, _ENCODING, _LENGTH), strict=True):
    for _form in (_name, _name.lower(), _name.title()):
        _HEADER_KINDS[_form] = _HEADER_KINDS[_form.encode("ascii")] = _kind


def read_headers(headers: Headers | None) -> tuple[list[Any], str, int | None]:
    """The signature lines, the content encoding (``""`` for identity) and the length.

    Never raises. The signature lines are passed on as given (``str``, ``bytes`` or
    anything else), for :func:`~flymy_receiver.signature.signature_candidates` to refuse
    what it cannot read. Of several ``Content-Length`` lines, the largest counts.
    """
    signatures: list[Any] = []
    encoding = ""
    length: int | None = None
    if headers is None:
        return signatures, encoding, length
    try:
        # A dict or a list first: the Mapping check is an ABC lookup, slow for what it is.
        container = type(headers)
        if container is dict or (container is not list and isinstance(headers, Mapping)):
            items: Iterable[Any] = headers.items()  # type: ignore[union-attr]
        else:
            items = headers
        pairs = iter(items)
    except Exception:  # not a mapping nor an iterable: no header we read
        return signatures, encoding, length
    for pair in pairs:
        try:
            name, value = pair
            kind = _HEADER_KINDS.get(name)
            if kind is None:
                # str and bytes names alike (bytes: ASCII only, as latin-1 names); a name
                # without lower(), or an unhashable one, is not a header we read.
                kind = _HEADER_KINDS.get(name.lower())
        except (AttributeError, TypeError, ValueError):  # not a pair, or an odd name
            continue
        if kind is None or value is None:  # None: what headers.get() gives when absent
            continue
        if kind is _SIGNATURE:
            if isinstance(value, (list, tuple)):
                signatures.extend(value)
            else:
                signatures.append(value)
            continue
        kind_of_value = type(value)
        if kind is _LENGTH and (kind_of_value is str or kind_of_value is bytes):
            text = value.strip()
            if text.isdigit() and text.isascii() and len(text) <= _MAX_LENGTH_DIGITS:
                declared = int(text)  # int() reads ASCII digits from bytes too
                if length is None or declared > length:
                    length = declared
                continue
        if kind_of_value is str:
            lines: Iterable[str | None] = (value,)
        elif kind_of_value is bytes:
            lines = (value.decode("latin-1"),)
        else:
            lines = _odd_lines(value)
        for text in lines:
            if kind is _ENCODING:
                text = UNREADABLE if text is None else text.strip().lower()
                if text not in ("", "identity"):
                    encoding = text
            else:
                parsed = _length(text)
                if parsed is not None and (length is None or parsed > length):
                    length = parsed
    return signatures, encoding, length


def _odd_lines(value: Any) -> Iterator[str | None]:
    """A header value that is not one ``str``/``bytes``, as lines of text; ``None`` for a
    line that is not text (an integer length is read as its digits)."""
    for line in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(line, str):
            yield line
        elif isinstance(line, (bytes, bytearray)):
            yield bytes(line).decode("latin-1")
        elif isinstance(line, int) and not isinstance(line, bool) and line >= 0:
            yield str(line) if line.bit_length() <= 64 else "9" * 20  # str() of a huge int fails
        elif line is not None:
            yield None


def _length(text: str | None) -> int | None:
    """A declared ``Content-Length``, or ``None`` when it is not a plain decimal number."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isdigit() and text.isascii()):
        return None
    if len(text) <= _MAX_LENGTH_DIGITS:
        return int(text)
    # Leading zeros carry no size: cutting the digits instead of stripping them made 20
    # zeros before the real value read as 0, and skip the early 413.
    digits = text.lstrip("0") or "0"
    return _BEYOND_ANY_LIMIT if len(digits) > _MAX_LENGTH_DIGITS else int(digits)
