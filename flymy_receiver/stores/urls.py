"""Showing a store URL without its credentials, in errors, log lines and CLI messages.

A store URL often carries a password (``redis://:hunter2@cache:6379/0``), and the URLs that
need showing are the malformed ones, which a URL parser cannot be trusted to split. So the
redaction assumes little: the password is everything between the first ``:`` and the last
``@`` of the part after the scheme (the user name before it stays, as it helps find the
mistake), and so is the value of any query parameter whose name looks like one. Only the
password is hidden: ``sqlite:deliveries.sqlite3`` or ``redis//localhost:6379`` (a scheme
missing its ``//`` or its ``:``) are shown as written, and :func:`malformed_hint` says what
is wrong with them.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["STORE_SCHEMES", "malformed_hint", "redacted_url", "without_credentials"]

#: What replaces a credential.
MASK = "***"
#: Longer URLs are cut (after redaction): an error message needs the shape, not the whole.
MAX_SHOWN = 120

#: The schemes :func:`~flymy_receiver.stores.store_from_url` knows.
STORE_SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix", "postgresql", "postgres")
#: A known scheme whose separator is mistyped: ``sqlite:x``, ``redis//h``, ``redis:/h``.
_MISTYPED_SCHEME = re.compile(rf"(?i)^({'|'.join(STORE_SCHEMES)})(:/?(?!/)|//|:///+)")

_SECRET_PARAM = re.compile(
    r"(?i)([?&;][^=&;#]*(?:pass|pwd|secret|token|auth|key|cred)[^=&;#]*=)[^&;#]*"
)


def redacted_url(url: object) -> str:
    """``url`` with its password replaced by ``***``, safe to show; nothing else hidden.

    Works on malformed URLs too: ``redis://:pw`` missing its host, a password with an
    unescaped ``/`` or ``@``, no scheme at all (``:pw@host``), a mistyped separator
    (``redis//:pw@host``).
    """
    text = url if isinstance(url, str) else repr(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        mistyped = _MISTYPED_SCHEME.match(text)
        if mistyped:
            scheme, sep, rest = mistyped.group(1), mistyped.group(2), text[mistyped.end() :]
        else:
            scheme, rest = "", text
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        # "user:password@": the user stays; a lone "token@" may be a password: hidden.
        rest = f"{user}:{MASK}@{rest[at + 1 :]}" if colon and user else f"{MASK}@{rest[at + 1 :]}"
    elif not sep and ":" in rest:
        # No scheme and no "@": "host:port" or a bare "user:password"; show neither half.
        rest = f"{rest.partition(':')[0][:40]}:{MASK}"
    elif sep and not _plain_authority(rest):
        # "redis://:password" with the "@host" forgotten: the colon may start a password.
        rest = f"{rest.partition(':')[0]}:{MASK}"
    rest = _SECRET_PARAM.sub(rf"\1{MASK}", rest)
    shown = f"{scheme}{sep}{rest}"
    if len(shown) > MAX_SHOWN:
        shown = shown[: MAX_SHOWN - 3] + "..."
    return "".join(c if c.isprintable() else "?" for c in shown)


def malformed_hint(url: str) -> str:
    """What is likely wrong with a store URL that has no ``scheme://``: "" when unsure.

    ``sqlite:deliveries.sqlite3`` -> ``did you mean sqlite:///deliveries.sqlite3?`` (built
    from the redacted URL, so a password never shows here either).
    """
    mistyped = _MISTYPED_SCHEME.match(url)
    if not mistyped or "://" in url:
        return ""
    scheme = mistyped.group(1).lower()
    rest = redacted_url(url)[len(mistyped.group(0)) :]
    if scheme == "sqlite":
        return f"did you mean sqlite:///{rest.lstrip('/')}?"
    return f"did you mean {scheme}://{rest.lstrip('/')}?"


def _plain_authority(rest: str) -> bool:
    """Whether the authority (up to the first ``/``, ``?`` or ``#``) is a host with at most
    a numeric port, so that no colon in it can start a password."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if ":" not in authority or authority.startswith("["):  # no port, or an IPv6 literal
        return ":" not in authority or authority.endswith("]") or "]:" in authority
    host, _, port = authority.rpartition(":")
    return bool(host) and port.isdigit() and port.isascii()


def without_credentials(text: str, url: str) -> str:
    """``text`` (say, an error message about ``url``) with the URL's credentials taken out,
    however the message quotes them (as written or percent-decoded)."""
    _, sep, rest = url.partition("://")
    rest = rest if sep else url
    userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
    found = [userinfo, userinfo.partition(":")[2]]
    found += [m.group(0).partition("=")[2] for m in _SECRET_PARAM.finditer(rest)]
    found += [unquote(secret) for secret in found]
    for secret in sorted({s for s in found if len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
