"""How :class:`~flymy_receiver.stores.RedisStore` writes journal entries into script
arguments and reads them back: the entry hash's fields, summaries, and the walk of the
journal's sorted-set indexes, newest first, for lists."""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson

from .records import (
    Attempt,
    HandlerOutcome,
    JournalEntry,
    NewEntry,
    to_datetime,
)

__all__ = [
    "attempt_json",
    "digest",
    "entry_args",
    "entry_from",
    "newest_first",
    "outcome_pairs",
    "shown_state",
    "text",
]

#: Index members read per page while walking an index.
PAGE = 200


def digest(value: str) -> str:
    """What the scripts name an index after (``redis.sha1hex``): long run ids, agent ids
    and event names never reach a key name."""
    return hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()  # noqa: S324


def entry_args(entry: NewEntry, budget: int) -> list[Any]:
    """The new entry as the scripts' ``create`` reads it (see redis_scripts)."""
    args: list[Any] = [
        _ms(entry.retention),
        budget,
        entry.body,
        orjson.dumps(dict(entry.headers)),
        entry.event,
    ]
    for name in ("run_id", "agent_id", "agent_name"):
        value = getattr(entry, name)
        if value is not None:
            args += [name, value]
    return args


def attempt_json(attempt: Attempt | None) -> bytes:
    return orjson.dumps(attempt.to_dict()) if attempt is not None else b""


def outcome_pairs(outcomes: Mapping[str, HandlerOutcome]) -> list[Any]:
    pairs: list[Any] = []
    for name, outcome in outcomes.items():
        pairs += [name, orjson.dumps(outcome.to_dict())]
    return pairs


def shown_state(state: str, lease_until: float, now: float) -> str:
    """A pending entry whose claim's lease has ended is shown ``stalled``."""
    return "stalled" if state == "pending" and lease_until < now else state


def entry_from(
    key: str,
    fields: Mapping[bytes, bytes],
    now: float,
    *,
    body: bytes | None = None,
    history: Sequence[bytes] = (),
) -> JournalEntry:
    """The entry from its hash (a summary unless ``body``/``history`` are given)."""

    def field(name: bytes) -> str | None:
        value = fields.get(name)
        return value.decode() if value is not None else None

    handlers = {
        name[2:].decode(): HandlerOutcome.from_dict(orjson.loads(value))
        for name, value in fields.items()
        if name.startswith(b"h:")
    }
    headers = fields.get(b"headers")
    if body is None and b"body" in fields:  # written before bodies had a key of their own
        body = bytes(fields[b"body"])
    size = fields.get(b"body_size")
    state = shown_state(field(b"state") or "pending", float(fields.get(b"lease_until") or 0), now)
    return JournalEntry(
        key=key,
        event=field(b"event") or "",
        run_id=field(b"run_id"),
        agent_id=field(b"agent_id"),
        agent_name=field(b"agent_name"),
        state=state,
        attempts=int(fields.get(b"attempts") or 0),
        received_at=to_datetime(float(fields.get(b"received_at") or 0)),
        updated_at=to_datetime(float(fields.get(b"updated_at") or 0)),
        body=body,
        headers=orjson.loads(headers) if headers else {},
        handlers=handlers,
        history=tuple(Attempt.from_dict(orjson.loads(item)) for item in history),
        note=field(b"note"),
        body_size=int(size) if size is not None else len(body or b""),
        body_dropped=fields.get(b"body_dropped") == b"1",
    )


def newest_first(
    client: Any,
    indexes: Sequence[str],
    high: str,
    low: str,
    after: tuple[float, str] | None,
) -> Iterator[tuple[float, str]]:
    """``(received_at, key)`` of the members of ``indexes`` (sorted sets by arrival) between
    ``low`` and ``high`` (``ZRANGEBYSCORE`` bounds), newest first, merged, without
    duplicates; ``after`` is a keyset cursor (only what sorts strictly before it)."""
    walks = [_walk(client, index, high, low, after) for index in indexes]
    last: tuple[float, str] | None = None
    for item in heapq.merge(*walks, reverse=True):
        if item != last:
            yield item
        last = item


def _walk(
    client: Any, index: str, high: str, low: str, after: tuple[float, str] | None
) -> Iterator[tuple[float, str]]:
    if after is not None:
        high = min(high, repr(after[0]), key=_bound)
    offset = 0
    while True:
        rows = client.zrevrangebyscore(index, high, low, start=offset, num=PAGE, withscores=True)
        for member, score in rows:
            item = (float(score), text(member))
            # Equal scores come in reverse byte order of the key, as the cursor compares.
            if after is None or item < after:
                yield item
        if len(rows) < PAGE:
            return
        offset += len(rows)


def _bound(value: str) -> float:
    """A ``ZRANGEBYSCORE`` bound as a number, to pick the tighter one."""
    if value == "+inf":
        return float("inf")
    if value == "-inf":
        return float("-inf")
    return float(value.lstrip("("))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
