"""What every ``flymy-receiver`` command shares: its name, its usage errors, and the parsing
of the options several commands take (secrets, seconds)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import NoReturn

from ..describe import escape_controls
from ..errors import ConfigurationError
from ..signature import SECRET_ENV_VAR, normalize_secrets

__all__ = [
    "PROG",
    "Parser",
    "UsageError",
    "is_utf8",
    "moment",
    "one_line",
    "rate",
    "seconds",
    "secret_keys",
    "span",
    "stdin_bytes",
    "whole",
]

PROG = "flymy-receiver"


class UsageError(Exception):
    """Bad usage: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage block.
        raise UsageError(f"{message} (see {self.prog} --help)")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def seconds(*, low: float, high: float, zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds in [low, high] (0 allowed if ``zero``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from None
        if not math.isfinite(value) or not (low <= value <= high or (zero and value == 0)):
            lowest = "0 (off)" if zero else f"{low:g}"
            raise argparse.ArgumentTypeError(f"must be between {lowest} and {high:.0f} seconds")
        return value

    return parse


def whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high], written plainly (digits only).

    The number checked is the number used: ``0100`` is 100, and a string of 40 digits is
    refused as out of range before it is ever converted.
    """

    def parse(text: str) -> int:
        digits = text.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise argparse.ArgumentTypeError(f"not a whole number: {escape_controls(text[:40])!r}")
        significant = digits.lstrip("0") or "0"
        value = int(significant) if len(significant) <= 18 else high + 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}")
        return value

    return parse


def rate(high: float) -> Callable[[str], float]:
    """An argparse type: a finite positive number up to ``high`` (events per second)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a number: {escape_controls(text[:40])!r}"
            ) from None
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(f"must be more than 0 and at most {high:g}")
        return value

    return parse


_SPAN = re.compile(r"(\d{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Longer spans are refused: nothing is kept for a century.
_LONGEST_S = 100 * 365 * 86400


def span(text: str) -> timedelta:
    """An argparse type: a duration written ``90s``, ``5m``, ``12h`` or ``7d``."""
    match = _SPAN.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"takes a duration like 90s, 5m, 12h or 7d, not {escape_controls(text[:40])!r}"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > _LONGEST_S:
        raise argparse.ArgumentTypeError("must be at most 100 years")
    return timedelta(seconds=seconds)


def moment(text: str) -> datetime:
    """An argparse type: a time, as an ISO 8601 time (no offset: UTC) or a span ago (``2h``).

    Always an aware UTC datetime.
    """
    if _SPAN.fullmatch(text.strip()):
        return datetime.now(timezone.utc) - span(text)
    try:
        value = datetime.fromisoformat(text.strip()[:64].replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes 2h, 3d or an ISO time (2026-01-31, 2026-01-31T12:00:00Z), "
            f"not {escape_controls(text[:40])!r}"
        ) from None
    try:
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone(
            timezone.utc
        )
    except OverflowError:  # year 1 with a positive offset
        raise argparse.ArgumentTypeError("is out of range") from None


def secret_keys(secret: str | list[str] | None) -> tuple[bytes, ...]:
    if not secret:
        secret = os.environ.get(SECRET_ENV_VAR)
        if secret is not None and not is_utf8(secret):
            raise UsageError(f"${SECRET_ENV_VAR} is not valid UTF-8")
    if secret is None:
        raise UsageError(f"no secret: pass --secret or set {SECRET_ENV_VAR}")
    if any(not item.strip() for item in ([secret] if isinstance(secret, str) else secret)):
        raise UsageError("webhook secret must not be empty")
    try:
        return normalize_secrets(secret)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    except UnicodeError:  # its message would show a character of the secret
        raise UsageError("webhook secret is not valid UTF-8") from None


def stdin_bytes() -> bytes:
    return sys.stdin.buffer.read()


def one_line(raw: bytes, limit: int = 200) -> str:
    text = raw[: limit * 4].decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")
    text = escape_controls(text.strip())  # an answer comes from elsewhere: show it inert
    return text if len(text) <= limit else text[:limit] + "..."
