"""Odd header input never raises: what hand-written adapters and frameworks pass.

``{SIGNATURE_HEADER: request.headers.get(SIGNATURE_HEADER)}`` gives ``None`` for a missing
header; some frameworks give lists of lines; a mapping may hold names that are not strings.
Each gets the documented status, never a ``TypeError`` out of ``handle()``. The cases an
HTTP server can produce (leading zeros in ``Content-Length``) are in ``tests/contract.py``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.errors import ConfigurationError, InvalidSignature
from flymy_receiver.headers import read_headers
from flymy_receiver.signature import (
    SECRET_ENV_VAR,
    SIGNATURE_HEADER,
    normalize_secrets,
    sign,
    verify_signature,
)
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET


@pytest.fixture
def delivery() -> tuple[Receiver, bytes, str, list[Any]]:
    receiver = Receiver(secret=SECRET)
    calls: list[Any] = []
    receiver.on("run.completed")(calls.append)
    body = signed_request(make_event("run.completed"), SECRET).body
    return receiver, body, sign(body, SECRET), calls


GOOD = object()  # stands for the valid signature in the cases below


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({SIGNATURE_HEADER: None}, 401, id="value-none"),
        pytest.param({SIGNATURE_HEADER: [None]}, 401, id="list-of-none"),
        pytest.param({SIGNATURE_HEADER: 12345}, 401, id="value-int"),
        pytest.param({SIGNATURE_HEADER: {"a": 1}}, 401, id="value-dict"),
        pytest.param({SIGNATURE_HEADER: []}, 401, id="empty-list"),
        pytest.param({SIGNATURE_HEADER: [GOOD, 5]}, 401, id="good-next-to-unreadable"),
        pytest.param({SIGNATURE_HEADER: [GOOD]}, 200, id="list-with-the-good-one"),
        pytest.param({SIGNATURE_HEADER: ("0" * 64, GOOD)}, 200, id="tuple-of-lines"),
        pytest.param({SIGNATURE_HEADER: bytearray(b"@")}, 200, id="bytearray"),
        pytest.param(
            {None: "x", 5: "y", b"\xff": "z", SIGNATURE_HEADER: GOOD}, 200, id="odd-names"
        ),
        pytest.param([(["unhashable"], "x"), (SIGNATURE_HEADER, GOOD)], 200, id="unhashable-name"),
        pytest.param(
            ["not-a-pair", None, (1, 2, 3), (SIGNATURE_HEADER, GOOD)], 200, id="not-pairs"
        ),
        pytest.param(None, 401, id="headers-none"),
        pytest.param(42, 401, id="headers-not-iterable"),
        pytest.param({SIGNATURE_HEADER: GOOD, "Content-Encoding": None}, 200, id="encoding-none"),
        pytest.param({SIGNATURE_HEADER: GOOD, "Content-Encoding": 7}, 415, id="encoding-int"),
        pytest.param(
            {SIGNATURE_HEADER: GOOD, "Content-Encoding": ["identity"]}, 200, id="enc-list"
        ),
        pytest.param({SIGNATURE_HEADER: GOOD, "Content-Encoding": [b"gzip"]}, 415, id="enc-gzip"),
        pytest.param({SIGNATURE_HEADER: GOOD, "Content-Length": None}, 200, id="length-none"),
        pytest.param({SIGNATURE_HEADER: GOOD, "Content-Length": object()}, 200, id="length-odd"),
        pytest.param({SIGNATURE_HEADER: GOOD, "Content-Length": 10**9}, 413, id="length-int"),
        pytest.param({SIGNATURE_HEADER: GOOD, "Content-Length": 10**5000}, 413, id="length-huge"),
        pytest.param(
            {SIGNATURE_HEADER: GOOD, "Content-Length": ["1", "9" * 25]}, 413, id="len-list"
        ),
        pytest.param(
            {SIGNATURE_HEADER: GOOD, "Content-Length": "0" * 40 + "9" * 12}, 413, id="zeros"
        ),
    ],
)
def test_odd_headers_get_the_documented_status(
    delivery: tuple[Receiver, bytes, str, list[Any]], headers: Any, status: int
) -> None:
    receiver, body, good, calls = delivery

    def fill(value: Any) -> Any:
        if value is GOOD:
            return good
        if isinstance(value, bytearray):
            return bytearray(good.encode())
        if isinstance(value, (list, tuple)):
            return type(value)(fill(v) for v in value)
        return value

    if isinstance(headers, dict):
        headers = {name: fill(value) for name, value in headers.items()}
    elif isinstance(headers, list):
        headers = [fill(pair) for pair in headers]
    response = receiver.handle(body, headers)
    assert response.status == status, response.body
    assert len(calls) == (1 if status == 200 else 0)
    if status != 200:  # the async path answers alike (a 200 would now be a duplicate)
        assert asyncio.run(receiver.ahandle(body, headers)).status == status
        assert receiver.precheck(headers) is None or receiver.precheck(headers).status == status


@pytest.mark.parametrize("method", [None, 5, b"POST", ["POST"]])
def test_a_method_that_is_not_a_string_is_a_405(
    delivery: tuple[Receiver, bytes, str, list[Any]], method: Any
) -> None:
    receiver, body, good, _ = delivery
    assert receiver.handle(body, {SIGNATURE_HEADER: good}, method).status == 405


@pytest.mark.parametrize(
    "value", [None, 5, [None], [b"\xff" * 64], [object()], {"x": 1}, ["a" * 64, 1.5]]
)
def test_verify_and_verify_signature_raise_only_invalid_signature(
    delivery: tuple[Receiver, bytes, str, list[Any]], value: Any
) -> None:
    receiver, body, _, _ = delivery
    with pytest.raises(InvalidSignature):
        receiver.verify(body, {SIGNATURE_HEADER: value})
    with pytest.raises(InvalidSignature):
        verify_signature(body, value, SECRET)


@pytest.mark.parametrize(
    ("declared", "length"),
    [
        ("0" * 20 + "4096", 4096),
        ("0" * 5000 + "1", 1),
        ("000", 0),
        (" 12 ", 12),
        ("9" * 19, int("9" * 19)),
        ("1" + "0" * 30, 10**19),  # beyond any limit: bounded, no giant int
        ("+12", None),
        ("1e3", None),
        ("١٢", None),  # Arabic-Indic digits are digits to str.isdigit, not to HTTP
        ("12, 12", None),
    ],
)
def test_content_length_is_read_without_its_leading_zeros(
    declared: str, length: int | None
) -> None:
    assert read_headers({"Content-Length": declared})[2] == length


def test_the_largest_of_several_content_lengths_counts() -> None:
    assert read_headers([("content-length", "10"), (b"content-length", b"99")])[2] == 99


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("whsec-\ud83d-tail", id="lone-high-surrogate"),
        pytest.param("whsec-\udcff\udcfe", id="surrogateescape-bytes"),
        pytest.param(["whsec-new", "whsec-\ud800"], id="second-of-a-rotation"),
    ],
)
def test_a_secret_that_is_not_utf8_is_a_configuration_error_showing_none_of_it(
    secret: Any,
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Receiver(secret=secret)
    shown = str(info.value) + repr(info.value)
    assert "whsec" not in shown
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in shown)
    assert "\\ud" not in shown
    assert info.value.__suppress_context__  # the codec's error, which quotes it, is hidden


def test_a_secret_from_the_environment_that_is_not_utf8(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bytes that are not UTF-8 in the environment reach Python as lone surrogates.
    raw = os.fsdecode(b"whsec-\xff\xfe")
    monkeypatch.setenv(SECRET_ENV_VAR, raw)
    with pytest.raises(ConfigurationError, match=SECRET_ENV_VAR) as info:
        Receiver()
    assert "whsec" not in str(info.value)
    with pytest.raises(ConfigurationError):
        normalize_secrets(None, {SECRET_ENV_VAR: raw})
    with pytest.raises(ConfigurationError):
        sign(b"{}", raw)


def test_the_same_key_as_bytes_works() -> None:
    receiver = Receiver(secret=b"whsec-\xff\xfe")
    body = signed_request(make_event("run.completed"), b"whsec-\xff\xfe").body
    assert receiver.handle(body, {SIGNATURE_HEADER: sign(body, b"whsec-\xff\xfe")}).ok
