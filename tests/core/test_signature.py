"""Signing, verifying and configuring secrets: what the adapter contract does not reach."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flymy_receiver import ConfigurationError, InvalidSignature, Receiver
from flymy_receiver.signature import (
    MAX_CANDIDATES,
    MAX_HEADER_LENGTH,
    SECRET_ENV_VAR,
    explain_mismatch,
    normalize_secrets,
    sign,
    signature_candidates,
    verify_signature,
)
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET

BODY = b'{"event":"run.completed"}'
KNOWN = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_known_answer_vector() -> None:
    assert sign(b"Hello, World!", "It's a Secret to Everybody") == KNOWN
    assert sign(b"Hello, World!", b"It's a Secret to Everybody") == KNOWN
    assert verify_signature(b"Hello, World!", KNOWN, "It's a Secret to Everybody") == 0


def test_sign_refuses_an_empty_key() -> None:
    with pytest.raises(ConfigurationError):
        sign(BODY, "")


def test_verify_returns_the_index_of_the_matching_secret() -> None:
    secrets = ["whsec-new", "whsec-old"]
    assert verify_signature(BODY, sign(BODY, "whsec-new"), secrets) == 0
    assert verify_signature(BODY, sign(BODY, "whsec-old"), secrets) == 1
    with pytest.raises(InvalidSignature) as info:
        verify_signature(BODY, sign(BODY, "whsec-removed"), secrets)
    assert info.value.code == "signature_mismatch"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, "missing_signature"),
        ("", "missing_signature"),
        (" , ,\t", "missing_signature"),
        ([], "missing_signature"),
        ("a" * 63, "malformed_signature"),
        ("v1,abc", "malformed_signature"),
        ("\u2713" * 64, "malformed_signature"),  # beyond latin-1: a core caller may pass it
        ("\xe9" * 64, "malformed_signature"),
        ("\xe9".encode() * 32, "malformed_signature"),  # UTF-8 bytes from a raw ASGI header
        (b"\xff" * 64, "malformed_signature"),
        ("a" * (MAX_HEADER_LENGTH + 1), "malformed_signature"),
        ("0" * 64, "signature_mismatch"),
    ],
)
def test_every_bad_header_is_invalid_signature(value: object, code: str) -> None:
    with pytest.raises(InvalidSignature) as info:
        verify_signature(BODY, value, SECRET)  # type: ignore[arg-type]
    assert info.value.code == code
    assert info.value.status == 401


def test_header_length_is_bounded_over_all_lines() -> None:
    good = sign(BODY, SECRET)
    filler = " " * (MAX_HEADER_LENGTH - len(good))
    assert verify_signature(BODY, [filler, good], SECRET) == 0
    with pytest.raises(InvalidSignature):
        verify_signature(BODY, [filler + " ", good], SECRET)


def test_candidates_are_bounded() -> None:
    good = sign(BODY, SECRET)
    four_bad = [f"{n:064x}" for n in range(MAX_CANDIDATES - 1)]
    assert verify_signature(BODY, [*four_bad, good], SECRET) == 0
    with pytest.raises(InvalidSignature):
        verify_signature(BODY, [*four_bad, "f" * 64, good], SECRET)


def test_candidates_are_normalised() -> None:
    digest = "ab" * 32
    values = [f" SHA256={digest.upper()}\r\n", "junk", b"\t" + digest.encode()]
    assert signature_candidates(values) == [digest.encode(), digest.encode()]


@pytest.mark.parametrize("secret", ["", "   ", "\n", [], ["whsec-a", ""], [b""]])
def test_empty_secrets_are_refused(secret: object) -> None:
    with pytest.raises(ConfigurationError):
        normalize_secrets(secret, environ={})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Receiver(secret=secret)  # type: ignore[arg-type]


def test_secret_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        normalize_secrets([123], environ={})  # type: ignore[list-item]


def test_no_secret_and_no_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    with pytest.raises(ConfigurationError, match=SECRET_ENV_VAR):
        Receiver()
    with pytest.raises(ConfigurationError):
        Receiver(secret=None)
    monkeypatch.setenv(SECRET_ENV_VAR, "")
    with pytest.raises(ConfigurationError):
        Receiver()


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV_VAR, SECRET + "\n")
    receiver = Receiver()
    request = signed_request(make_event("run.completed"), SECRET)
    assert receiver.handle(request.body, request.headers).status == 200


def test_trailing_newline_is_stripped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flymy_receiver")
    assert normalize_secrets(["whsec-a\n", b" whsec-b\t"], environ={}) == (b"whsec-a", b"whsec-b")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert all("whitespace" in w and "whsec" not in w for w in warnings)


def test_receiver_repr_hides_the_secret() -> None:
    assert SECRET not in repr(Receiver(secret=SECRET))


@pytest.mark.parametrize(
    ("body", "signed_body", "hint"),
    [
        (b"", b"{}", "empty"),
        (b'{"a":1}\n', b'{"b":2}', "newline"),
        (b'\xef\xbb\xbf{"a":1}', b'{"b":2}', "BOM"),
        (b'{"a": 1}', b'{"a":1}', "re-serialised copy"),
        (b'{"a":1}', b'{"b":2}', "differs"),
    ],
)
def test_explain_mismatch_hints_without_leaking(body: bytes, signed_body: bytes, hint: str) -> None:
    keys = normalize_secrets(SECRET)
    candidates = signature_candidates([sign(signed_body, SECRET)])
    text = explain_mismatch(body, keys, candidates)
    assert hint in text
    assert SECRET not in text
    assert sign(body, SECRET) not in text
    assert sign(signed_body, SECRET) not in text


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=512), secret=st.text(min_size=1, max_size=40), flip=st.integers())
def test_any_signed_body_verifies_and_any_flipped_bit_does_not(
    body: bytes, secret: str, flip: int
) -> None:
    if not secret.strip(" \t\r\n"):
        return
    key = secret.strip(" \t\r\n")
    header = sign(body, key)
    assert verify_signature(body, header, secret) == 0
    if body:
        position = flip % (len(body) * 8)
        tampered = bytearray(body)
        tampered[position // 8] ^= 1 << (position % 8)
        with pytest.raises(InvalidSignature):
            verify_signature(bytes(tampered), header, secret)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), st.lists(st.text(max_size=80))))
def test_arbitrary_headers_never_raise_anything_else(value: object) -> None:
    with pytest.raises(InvalidSignature):
        verify_signature(BODY, value, SECRET)  # type: ignore[arg-type]
