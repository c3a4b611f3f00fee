"""What every ``flymy-receiver`` command shares: its name, its usage errors, and the parsing
of the options several commands take (secrets, seconds)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from ..describe import escape_controls
from ..errors import ConfigurationError
from ..signature import SECRET_ENV_VAR, normalize_secrets

__all__ = [
    "PROG",
    "Parser",
    "UsageError",
    "is_utf8",
    "one_line",
    "seconds",
    "secret_keys",
    "stdin_bytes",
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
