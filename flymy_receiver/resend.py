"""Sending a stored delivery to another app: a signed POST, or a ``curl`` command for it.

An operator resends a journal entry to a staging or local app (``journal.resend``), or
copies a command that does it (the inspector's "copy as curl"). The POST is signed afresh
with the receiver's secret; the command computes the signature itself from
``$FLYMY_WEBHOOK_SECRET`` with ``openssl``, so neither the secret nor a signature that
could be replayed is ever shown. Neither error messages nor commands ever hold the secret.
"""

from __future__ import annotations

import shlex
import urllib.error
import urllib.parse
import urllib.request

from .signature import SECRET_ENV_VAR, SIGNATURE_HEADER

__all__ = ["ResendFailed", "check_url", "curl_command", "post_signed"]

#: Seconds a resend waits for the other app's answer.
DEFAULT_RESEND_TIMEOUT = 30.0


class ResendFailed(ConnectionError):
    """The other app could not be reached (refused, unknown host, timed out): no answer."""


def check_url(url: str) -> str:
    """``url`` if it is an ``http(s)`` URL with a host; :class:`ValueError` otherwise."""
    if not isinstance(url, str):
        raise ValueError("the URL must be a string")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {shown_url(url)!r}")
    return url.strip()


def shown_url(url: str) -> str:
    """``url`` as an error message may show it: any password hidden, at most 200 chars."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            netloc = f"{parts.username or ''}:***@{host}"
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        url = "(unparsable URL)"
    return url[:200]


def post_signed(
    url: str, body: bytes, signature: str, timeout: float = DEFAULT_RESEND_TIMEOUT
) -> int:
    """POST ``body`` with its signature header to ``url``; return the HTTP status, whatever
    it is (a 500 is returned, not raised). Raises :class:`ResendFailed` when no answer
    came, and :class:`ValueError` for a URL that is not ``http(s)``."""
    url = check_url(url)
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked just above
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            status: int = answer.status
            return status
    except urllib.error.HTTPError as exc:  # an answer all the same
        code: int = exc.code
        exc.close()
        return code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ResendFailed(
            f"could not reach {shown_url(url)}: {type(reason).__name__}: {str(reason)[:200]}"
        ) from None


def curl_command(url: str, body: bytes) -> str:
    """A shell command that POSTs ``body`` to ``url`` signed with the secret in
    ``$FLYMY_WEBHOOK_SECRET``: the signature is computed by the command (``openssl``), so
    neither it nor the secret appears in the text."""
    url = check_url(url)
    text = body.decode("utf-8")  # a journaled body was parsed as JSON, so it is UTF-8
    return (
        f"body={shlex.quote(text)}; "
        f'signature=$(printf \'%s\' "$body" | openssl dgst -sha256 -hmac "${SECRET_ENV_VAR}"'
        " | awk '{print $NF}'); "
        f"curl -sS -X POST {shlex.quote(url)} -H 'Content-Type: application/json' "
        f'-H "{SIGNATURE_HEADER}: $signature" --data-binary "$body"'
    )
