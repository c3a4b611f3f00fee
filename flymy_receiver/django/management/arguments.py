"""The values ``manage.py flymy_journal`` takes, checked: each bad one is one line.

Every value is parsed here from the text given, and the value checked is the value used
(``--limit 000100999999`` is 100999999, refused as out of range, never cut to fit). Errors
are :class:`~django.core.management.CommandError`, which Django prints as one line.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

from django.core.management.base import CommandError

from ..display import printable

__all__ = ["MAX_LIMIT", "MAX_SPAN", "limit", "moment", "per_second", "span"]

#: The most entries or refusals one listing prints (as ``flymy-receiver journal``).
MAX_LIMIT = 10_000
#: The longest span ``--since 7d`` or ``--older-than`` takes: a century.
MAX_SPAN = timedelta(days=36_500)
#: The fastest ``--per-second`` pace.
MAX_PER_SECOND = 1000.0

_SPAN = re.compile(r"(\d{1,12})([smhd])", re.ASCII)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _shown(text: str) -> str:
    return printable(text[:40] + ("…" if len(text) > 40 else ""))


def limit(text: str, option: str = "--limit") -> int:
    """A whole number from 1 to :data:`MAX_LIMIT`."""
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        raise CommandError(
            f"{option} takes a whole number from 1 to {MAX_LIMIT}, not {_shown(text)!r}"
        )
    digits = value.lstrip("0") or "0"  # leading zeros change nothing; a huge value is out
    number = int(digits) if len(digits) <= 9 else MAX_LIMIT + 1
    if not 1 <= number <= MAX_LIMIT:
        raise CommandError(f"{option} must be from 1 to {MAX_LIMIT}, not {_shown(text)}")
    return number


def span(text: str, option: str, *, zero: bool = False) -> timedelta:
    """``30s``, ``15m``, ``12h`` or ``7d``: more than nothing (``zero``: or nothing), at
    most :data:`MAX_SPAN`."""
    found = _SPAN.fullmatch(text.strip())
    if found is None:
        raise CommandError(f"{option} takes a span such as 30m, 12h or 7d, not {_shown(text)!r}")
    seconds = int(found.group(1)) * _UNITS[found.group(2)]
    if not (0 if zero else 1) <= seconds <= MAX_SPAN.total_seconds():
        least = "0" if zero else "more than 0"
        raise CommandError(f"{option} must be {least} and at most {MAX_SPAN.days}d")
    return timedelta(seconds=seconds)


def moment(text: str, option: str) -> datetime:
    """A span back from now (``7d``) or an ISO date or time (UTC unless it says), aware."""
    value = text.strip()
    if _SPAN.fullmatch(value):
        return datetime.now(timezone.utc) - span(value, option)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # An offset near the ends of the calendar can leave it: checked here, not in a query.
        return (
            parsed.astimezone(timezone.utc)
            if parsed.tzinfo
            else parsed.replace(tzinfo=timezone.utc)
        )
    except (ValueError, OverflowError):
        raise CommandError(
            f"{option} takes 30m, 12h, 7d or an ISO date such as 2026-01-31, not {_shown(text)!r}"
        ) from None


def per_second(text: str) -> float:
    """A pace above 0 and at most :data:`MAX_PER_SECOND`."""
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_PER_SECOND):
        raise CommandError(
            f"--per-second takes a number above 0 and at most {MAX_PER_SECOND:g}, "
            f"not {_shown(text)!r}"
        )
    return value
