"""The inspector's query parameters, checked: what a page or the API may be asked for.

Every value is checked as it will be used (the number compared with the limit is the number
passed to the store), and anything else is a :class:`BadQuery`, answered 400 with its
message: never a 5xx, never a value the store would choke on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..stores.records import ENTRY_STATES

__all__ = [
    "FILTER_NAMES",
    "MAX_LIMIT",
    "MAX_TEXT",
    "BadQuery",
    "filter_values",
    "filters",
    "limit",
    "moment",
]

MAX_LIMIT = 1000
#: Event names, run ids, agent fields and keys longer than this are refused.
MAX_TEXT = 200
#: The filters a page's form and the list API take, in the form's order.
FILTER_NAMES = ("state", "event", "agent_id", "run_id", "since", "until", "before")
#: A limit as a person writes it: no sign, no leading zero, at most as many digits as
#: MAX_LIMIT has (so "000100999999" or forty digits never get as far as int()).
_LIMIT = re.compile(r"[1-9][0-9]{0,3}")


class BadQuery(ValueError):
    """A query parameter the inspector cannot use; answered 400 with the message."""


def limit(value: str | None, default: int) -> int:
    """``value`` as a limit from 1 to :data:`MAX_LIMIT`; ``default`` when absent."""
    if value is None or value == "":
        return default
    if not _LIMIT.fullmatch(value) or int(value) > MAX_LIMIT:
        raise BadQuery(f"limit must be a whole number from 1 to {MAX_LIMIT}, without leading zeros")
    return int(value)


def moment(name: str, value: str) -> datetime:
    """An ISO 8601 time; ``Z`` and a missing offset both mean UTC."""
    try:
        text = value[:64].replace("Z", "+00:00").replace("z", "+00:00")
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(
            timezone.utc
        )
    except (ValueError, OverflowError):
        raise BadQuery(f"{name} must be an ISO 8601 time, like 2025-01-15T10:00:00Z") from None


def filters(query: Mapping[str, str], default_limit: int = 100) -> dict[str, Any]:
    """The journal filters of a query string, checked, as ``Journal.list`` keywords."""
    checked: dict[str, Any] = {"limit": limit(query.get("limit"), default=default_limit)}
    state = query.get("state") or None
    if state is not None and state not in ENTRY_STATES:
        raise BadQuery(f"state must be one of {', '.join(ENTRY_STATES)}")
    checked["state"] = state
    for name in ("event", "agent_id", "run_id", "before"):
        value = (query.get(name) or "").strip()
        if len(value) > MAX_TEXT:
            raise BadQuery(f"{name} is longer than {MAX_TEXT} characters")
        checked[name] = value or None
    for name in ("since", "until"):
        value = (query.get(name) or "").strip()
        checked[name] = moment(name, value) if value else None
    return checked


def filter_values(query: Mapping[str, str]) -> dict[str, str]:
    """What the filter form shows: the query's own text (escaped by the template)."""
    return {name: query.get(name, "")[:MAX_TEXT] for name in FILTER_NAMES}
