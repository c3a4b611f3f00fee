"""``flymy-receiver sign`` and ``verify``: the library's own signing code from a shell."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import InvalidSignature
from ..signature import explain_mismatch, match_signature, sign, signature_candidates
from .options import secret_keys, stdin_bytes

__all__ = ["run_sign", "run_verify"]


def run_sign(args: argparse.Namespace) -> int:
    key = secret_keys(args.secret)[0]
    print(sign(stdin_bytes(), key))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    keys = secret_keys(args.secret)
    body = stdin_bytes()
    try:
        candidates = signature_candidates([args.signature])
    except InvalidSignature as exc:
        print(f"invalid: {exc.detail}; the header must be 64 hex characters")
        return 1
    try:
        index = match_signature(body, candidates, keys)
    except InvalidSignature:
        # The hint names a likely cause; it never shows the expected signature.
        print(
            f"invalid: the signature does not match; likely cause: {_hint(body, keys, candidates)}"
        )
        return 1
    which = "the secret" if len(keys) == 1 else f"secret #{index + 1} of {len(keys)}"
    print(f"valid: signed with {which} ({len(body)} bytes)")
    return 0


def _hint(body: bytes, keys: Sequence[bytes], candidates: Sequence[bytes]) -> str:
    # A shell adds or drops a final newline easily (echo, $(...)); say so when that is it.
    for variant, cause in (
        (body + b"\n", "the signature is over this body plus a final newline"),
        (body.rstrip(b"\r\n"), "the signature is over this body without its final newline"),
    ):
        if variant != body and _matches(variant, candidates, keys):
            return cause + " (echo adds one: use printf '%s' or a file)"
    return explain_mismatch(body, keys, candidates)


def _matches(body: bytes, candidates: Sequence[bytes], keys: Sequence[bytes]) -> bool:
    try:
        match_signature(body, candidates, keys)
    except InvalidSignature:
        return False
    return True
