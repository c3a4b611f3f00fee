"""Reading a request body without reading more than the size limit.

Adapters read the raw body here, before anything else touches it: the signature covers the
exact bytes, and a body that has been parsed as a form or re-encoded can no longer be
verified. Both readers stop one byte past ``limit``, which is enough for the receiver to
answer 413 without holding an unbounded body in memory (a chunked body has no
``Content-Length`` to refuse it by).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable

__all__ = ["aread_limited", "read_limited"]

_CHUNK = 64 * 1024


def read_limited(read: Callable[[int], bytes], limit: int) -> bytes:
    """Call ``read(n)`` until it returns ``b""`` or more than ``limit`` bytes were read."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def aread_limited(stream: AsyncIterable[bytes], limit: int) -> bytes:
    """Collect chunks from ``stream`` until it ends or more than ``limit`` bytes arrived."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
