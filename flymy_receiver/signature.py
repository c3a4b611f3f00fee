"""Signing and verifying the ``X-FlyMyAI-Signature`` header.

The platform sends the lowercase hex of ``HMAC-SHA256(secret, raw_body)``. Verification works
on the exact bytes received and never on a re-serialised body. Every malformed header is an
:class:`~flymy_receiver.errors.InvalidSignature`, never another exception.

Tolerated on purpose (documented in the README): upper or mixed case hex, surrounding
whitespace (spaces, tabs, CR, LF), a ``sha256=`` prefix, and several candidates either as
repeated header lines or joined by commas, up to :data:`MAX_CANDIDATES`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import ConfigurationError, InvalidSignature

__all__ = [
    "MAX_CANDIDATES",
    "SECRET_ENV_VAR",
    "SIGNATURE_HEADER",
    "explain_mismatch",
    "match_signature",
    "normalize_secrets",
    "sign",
    "signature_candidates",
    "verify_signature",
]

logger = logging.getLogger("flymy_receiver")

SIGNATURE_HEADER = "X-FlyMyAI-Signature"
SECRET_ENV_VAR = "FLYMY_WEBHOOK_SECRET"  # noqa: S105 - a variable name, not a secret
#: At most this many candidate signatures are compared; more is refused.
MAX_CANDIDATES = 5
#: Header values longer than this (all lines together) are refused before any parsing.
MAX_HEADER_LENGTH = 1024

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_LOWER_HEX64 = re.compile(r"[0-9a-f]{64}")
_LOWER_HEX64_BYTES = re.compile(rb"[0-9a-f]{64}")
_WHITESPACE = " \t\r\n"

SecretInput = str | bytes
Secrets = SecretInput | Sequence[SecretInput]


def sign(body: bytes, secret: str | bytes) -> str:
    """Return the header value the platform sends for ``body``: lowercase hex HMAC-SHA256."""
    key = _secret_bytes(secret, "the secret")
    if not key:
        raise ConfigurationError("secret must not be empty")
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def normalize_secrets(
    secret: Secrets | None, environ: Mapping[str, str] | None = None
) -> tuple[bytes, ...]:
    """Turn the ``secret`` argument into HMAC keys, newest first.

    ``None`` reads :data:`SECRET_ENV_VAR`. Surrounding whitespace (a newline pasted from an
    env file) is stripped with a warning. An empty secret is a :class:`ConfigurationError`:
    no request is ever checked against an empty key.
    """
    source = "webhook secret"
    if secret is None:
        secret = (os.environ if environ is None else environ).get(SECRET_ENV_VAR)
        if secret is None:
            raise ConfigurationError(f"no webhook secret: pass secret=... or set {SECRET_ENV_VAR}")
        source = SECRET_ENV_VAR
    items: Sequence[SecretInput] = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    if not items:
        raise ConfigurationError("at least one webhook secret is required")
    keys: list[bytes] = []
    for position, item in enumerate(items):
        if not isinstance(item, (str, bytes)):
            raise ConfigurationError("webhook secrets must be str or bytes")
        raw = _secret_bytes(item, f"{source} #{position}" if len(items) > 1 else source)
        key = raw.strip(_WHITESPACE.encode())
        if key != raw:
            logger.warning(
                "webhook secret #%d had surrounding whitespace; it was stripped", position
            )
        if not key:
            raise ConfigurationError("webhook secret must not be empty")
        keys.append(key)
    return tuple(keys)


def _secret_bytes(secret: str | bytes, what: str) -> bytes:
    """A secret as HMAC key bytes; a str that is not valid UTF-8 is a configuration error
    whose message shows nothing of the secret (the codec's own error quotes a character)."""
    if not isinstance(secret, str):
        return secret
    try:
        return secret.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{what} is not valid UTF-8 text (it holds a lone surrogate, as a str read from "
            "bytes that are not UTF-8 does): set it as UTF-8 text, or pass the key as bytes"
        ) from None


def signature_candidates(values: Iterable[Any]) -> list[bytes]:
    """Parse header values into candidate digests (lowercase ASCII hex, 64 chars each).

    Raises :class:`InvalidSignature` for a missing, oversized, non-ASCII or malformed header,
    and for a value that is neither ``str`` nor ``bytes``.
    """
    # The form the platform sends (one line, exact lowercase hex) skips the general parse.
    if isinstance(values, (list, tuple)) and len(values) == 1:
        value = values[0]
        if isinstance(value, str):
            if _LOWER_HEX64.fullmatch(value) is not None:
                return [value.encode("ascii")]
        elif isinstance(value, bytes) and _LOWER_HEX64_BYTES.fullmatch(value) is not None:
            return [bytes(value)]
    if isinstance(values, (str, bytes)):  # one value, not a list of lines
        values = [values]
    try:
        lines = list(values)
    except TypeError:
        raise InvalidSignature("unreadable signature header", code="malformed_signature") from None
    parts: list[str] = []
    total = 0
    for value in lines:
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("ascii")
            except UnicodeDecodeError:
                raise InvalidSignature(
                    "non-ASCII signature header", code="malformed_signature"
                ) from None
        elif not isinstance(value, str):
            raise InvalidSignature("unreadable signature header", code="malformed_signature")
        total += len(value)
        if total > MAX_HEADER_LENGTH:
            raise InvalidSignature("signature header too long", code="malformed_signature")
        if not value.isascii():
            raise InvalidSignature("non-ASCII signature header", code="malformed_signature")
        parts.extend(value.split(","))
    candidates: list[bytes] = []
    seen_any = False
    for part in parts:
        part = part.strip(_WHITESPACE)
        if not part:
            continue
        seen_any = True
        if part[:7].lower() == "sha256=":
            part = part[7:].strip(_WHITESPACE)
        if _HEX64.fullmatch(part) is None:
            continue
        candidates.append(part.lower().encode("ascii"))
    if not seen_any:
        raise InvalidSignature("missing signature header", code="missing_signature")
    if not candidates:
        raise InvalidSignature("malformed signature header", code="malformed_signature")
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidSignature("too many signatures", code="malformed_signature")
    return candidates


def verify_signature(
    body: bytes, signature: str | bytes | Iterable[str | bytes] | None, secrets: Secrets
) -> int:
    """Check ``signature`` (one header value, or every line of the header) against ``body``.

    Returns the index of the secret that matched (0 is the newest), so a deployer can tell
    when the old secret of a rotation is no longer used. Raises :class:`InvalidSignature`.
    """
    if signature is None:
        raise InvalidSignature("missing signature header", code="missing_signature")
    return match_signature(body, signature_candidates(signature), normalize_secrets(secrets))


def match_signature(body: bytes, candidates: Sequence[bytes], keys: Sequence[bytes]) -> int:
    """Compare parsed ``candidates`` with the HMAC of ``body`` under each key, in constant time.

    Returns the index of the matching key; raises :class:`InvalidSignature` when none matches.
    """
    for index, key in enumerate(keys):
        inner, outer = _keyed_states(key)
        inner = inner.copy()
        inner.update(body)
        outer = outer.copy()
        outer.update(inner.digest())
        expected = outer.hexdigest().encode("ascii")
        for candidate in candidates:
            if hmac.compare_digest(expected, candidate):
                return index
    raise InvalidSignature("signature does not match", code="signature_mismatch")


@functools.lru_cache(maxsize=64)
def _keyed_states(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) as two SHA-256 states keyed once: the key schedule costs about
    as much as hashing 1 KB, and ``hmac.HMAC``'s Python layer about 1 µs more per body
    than copying and updating these directly (they are copied, never updated in place)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = hashlib.sha256(key.translate(_IPAD))
    outer = hashlib.sha256(key.translate(_OPAD))
    return inner, outer


_BLOCK = 64  # SHA-256's block size in bytes
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


#: Hints are only computed for bodies up to this size, so forged requests stay cheap.
_HINT_BODY_LIMIT = 64 * 1024


def explain_mismatch(
    body: bytes,
    keys: Sequence[bytes],
    candidates: Sequence[bytes],
    header_values: Iterable[str | bytes] = (),
    *,
    deep: bool = True,
) -> str:
    """Likely causes for a signature that does not match, for logs and the CLI only.

    ``header_values`` are the raw header lines, to tell whitespace or a prefix around the
    signature. ``deep`` also re-serialises the JSON to look for a re-encoded body, which
    costs a parse and a few HMACs: the receiver rations it, so forgeries stay cheap.
    Never includes the expected signature, the secret or the body.
    """
    hints = _header_hints(header_values)
    if not body:
        hints.append("the body is empty: did a middleware or the framework consume it first?")
        return "; ".join(hints)
    if body.startswith(b"\xef\xbb\xbf"):
        hints.append("the body starts with a UTF-8 BOM")
    if body.endswith((b"\n", b"\r")):
        # One HMAC, as cheap as the check itself: say exactly what `verify` would.
        if _signs_any([body.rstrip(b"\r\n")], keys, candidates):
            hints.append(
                "the body ends with a newline: the signature is over this body without its"
                " final newline (something added one after signing)"
            )
        else:
            hints.append("the body ends with a newline")
    elif deep and _signs_any([body + b"\n"], keys, candidates):
        hints.append(
            "the signature is over this body plus a final newline (something dropped it"
            " after signing)"
        )
    if deep and len(body) <= _HINT_BODY_LIMIT:
        forms = _reserialised_forms(body)
        if _signs_any(forms, keys, candidates):
            hints.append(
                "the signature matches a re-serialised copy of this JSON: something between "
                "the sender and the receiver re-encoded the body"
            )
        elif forms and body not in forms:
            hints.append(
                "the body is neither a compact nor a pretty JSON dump of itself: it may "
                "have been re-serialised after signing"
            )
    if not hints:
        hints.append("the body or the secret differs from what the sender signed")
    return "; ".join(hints)


def _header_hints(values: Iterable[str | bytes]) -> list[str]:
    # Both are tolerated, so neither is the cause; but they show that something between the
    # sender and us rewrote the header, which may also have touched the body.
    whitespace = prefix = False
    for value in values:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if not isinstance(text, str):
            continue
        for part in text[:MAX_HEADER_LENGTH].split(","):
            stripped = part.strip(_WHITESPACE)
            whitespace = whitespace or (bool(stripped) and stripped != part)
            prefix = prefix or stripped[:7].lower() == "sha256="
    hints = []
    if whitespace:
        hints.append("the signature header had surrounding whitespace (ignored)")
    if prefix:
        hints.append("the signature header had a 'sha256=' prefix (ignored)")
    return hints


def _signs_any(forms: list[bytes], keys: Sequence[bytes], candidates: Sequence[bytes]) -> bool:
    for form in forms:
        for key in keys:
            expected = hmac.new(key, form, hashlib.sha256).hexdigest().encode()
            if any(hmac.compare_digest(expected, c) for c in candidates):
                return True
    return False


def _reserialised_forms(body: bytes) -> list[bytes]:
    try:
        obj = json.loads(body.removeprefix(b"\xef\xbb\xbf"))
    except (ValueError, RecursionError):
        return []
    forms = []
    for kwargs in (
        {"separators": (",", ":")},
        {},
        {"indent": 2},
        {"separators": (",", ":"), "ensure_ascii": False},
        {"ensure_ascii": False},
    ):
        try:
            forms.append(json.dumps(obj, **kwargs).encode())
        except (ValueError, RecursionError):  # pragma: no cover - loads succeeded
            return []
    return forms
