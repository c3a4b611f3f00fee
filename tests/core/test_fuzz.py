"""Property tests of the core: whatever arrives, the receiver answers and never misroutes.

Both drivers are fuzzed, ``Receiver.handle`` and ``Receiver.ahandle``. About 10 000 cases
are generated per run (the ``max_examples`` below add up to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flymy_receiver import InvalidSignature, Receiver, sign
from tests.conftest import SECRET

MAX_BODY_SIZE = 2048
#: Every status the receiver may give to a request that reaches no handler failure and no
#: store failure; a 500 here would be an unhandled case.
REFUSALS = {400, 401, 405, 413, 415}

FUZZ = settings(
    deadline=None,  # this shared machine is slow at times; speed is for the benchmarks
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


class Calls:
    """A receiver whose handlers (sync, async and catch-all) record what they saw."""

    def __init__(self, max_body_size: int = MAX_BODY_SIZE) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.receiver = Receiver(secret=SECRET, max_body_size=max_body_size)

        @self.receiver.on("run.completed")
        def completed(event: Any) -> None:
            self.seen.append(("completed", event.data.run_id))

        @self.receiver.on("run.failed")
        async def failed(event: Any) -> None:
            self.seen.append(("failed", event.data.run_id))

        @self.receiver.on("*")
        def everything(event: Any) -> None:
            self.seen.append(("*", event.event))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # One loop for every async example: a new loop per example would cost more than the case.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# -- arbitrary requests -------------------------------------------------------------------

_NAMES = st.one_of(
    st.sampled_from(
        [
            "X-FlyMyAI-Signature",
            "x-flymyai-signature",
            "X-FLYMYAI-SIGNATURE",
            "Content-Encoding",
            "content-length",
            "Content-Type",
            "Transfer-Encoding",
        ]
    ),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_HEX = st.text("0123456789abcdefABCDEF", min_size=60, max_size=68)
_VALUES = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.text(st.characters(max_codepoint=255), max_size=40),  # latin-1 as decoded by servers
    _HEX,
    _HEX.map(lambda h: f"sha256={h}"),
    st.lists(_HEX, min_size=2, max_size=8).map(",".join),
    st.sampled_from(["", " ", "gzip", "identity", "-1", "99999999999999999999999", "0"]),
)
_HEADER_LISTS = st.lists(st.tuples(_NAMES, _VALUES), max_size=6)
_METHODS = st.one_of(
    st.sampled_from(["POST", "post", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    st.text(max_size=12),
)
_JSONISH = st.one_of(
    st.binary(max_size=300),
    st.just(b""),
    st.sampled_from([b"[]", b"null", b'"x"', b"1", b"{}", b"\xef\xbb\xbf{}", b"[" * 3000]),
    st.builds(
        lambda name, ts, run_id: json.dumps(
            {"event": name, "timestamp": ts, "data": {"run_id": run_id, "agent_id": "a"}}
        ).encode(),
        st.sampled_from(["run.completed", "run.failed", "run.cancelled"]),
        st.text(max_size=30),
        st.one_of(st.text(max_size=10), st.integers(), st.none()),
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, list[tuple[Any, Any]], str, bool]:
    """A body, a header list, a method, and whether a valid signature of the body is in it."""
    body = draw(_JSONISH)
    headers: list[tuple[Any, Any]] = draw(_HEADER_LISTS)
    # Sometimes slip the genuine signature in, as-is or dressed up, on a real header line.
    if draw(st.booleans()):
        good = sign(body, SECRET)
        dressed = draw(
            st.sampled_from([good, good.upper(), f"sha256={good}", f" {good}\t", f"00,{good}"])
        )
        value: Any = dressed.encode() if draw(st.booleans()) else dressed
        headers.insert(draw(st.integers(0, len(headers))), ("X-FlyMyAI-Signature", value))
    method = draw(_METHODS)
    return body, headers, method, _carries_valid_signature(body, headers)


def _carries_valid_signature(body: bytes, headers: list[tuple[Any, Any]]) -> bool:
    good = sign(body, SECRET)
    for name, value in headers:
        lowered = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if lowered == "x-flymyai-signature" and good in text.lower():
            return True
    return False


def _check_arbitrary(status: int, calls: Calls, signed: bool, method: str) -> None:
    assert status == 200 or status in REFUSALS, status
    if calls.seen:
        assert status == 200
    if not signed or method.upper() != "POST":
        assert calls.seen == []
        assert status != 200


@settings(FUZZ, max_examples=3000)
@given(requests())
def test_arbitrary_requests_to_handle(request: tuple[bytes, Any, str, bool]) -> None:
    body, headers, method, signed = request
    calls = Calls()
    response = calls.receiver.handle(body, headers, method)
    _check_arbitrary(response.status, calls, signed, method)
    assert SECRET.encode() not in response.body


@settings(FUZZ, max_examples=2000)
@given(request=requests())
def test_arbitrary_requests_to_ahandle(
    loop: asyncio.AbstractEventLoop, request: tuple[bytes, Any, str, bool]
) -> None:
    body, headers, method, signed = request
    calls = Calls()
    response = loop.run_until_complete(calls.receiver.ahandle(body, headers, method))
    _check_arbitrary(response.status, calls, signed, method)


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=200), _HEADER_LISTS, _METHODS)
def test_precheck_and_verify_never_raise_anything_else(
    body: bytes, headers: list[tuple[Any, Any]], method: str
) -> None:
    calls = Calls()
    early = calls.receiver.precheck(headers, method)
    assert early is None or early.status in REFUSALS
    with contextlib.suppress(InvalidSignature):
        calls.receiver.verify(body, headers)


# -- authentic envelopes --------------------------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=10)
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_RUN_IDS = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=16),
    st.integers(min_value=0, max_value=2**70),
)
_EVENT_NAMES = st.one_of(
    st.sampled_from(["run.completed", "run.failed", "run.cancelled", "run.started"]),
    _TEXT.filter(bool),
)


def _now_iso(offset_s: float) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset_s)
    return moment.isoformat().replace("+00:00", "Z")


_OPTIONAL_DATA = {
    "agent_name": _TEXT,
    "duration_ms": st.integers(0, 10**9),
    "input": st.dictionaries(_TEXT, _JSON_VALUES, max_size=2),
}
_IDS = {"run_id": _RUN_IDS, "agent_id": _TEXT}
_DATA = {
    "run.completed": st.fixed_dictionaries(
        {**_IDS, "status": st.just("done")}, optional={**_OPTIONAL_DATA, "output": _JSON_VALUES}
    ),
    "run.failed": st.fixed_dictionaries(
        {
            **_IDS,
            "status": st.just("error"),
            "error": st.fixed_dictionaries({"type": _TEXT, "message": _TEXT}),
        },
        optional=_OPTIONAL_DATA,
    ),
    "unknown": st.fixed_dictionaries(_IDS, optional=_OPTIONAL_DATA),
}
# Extra fields get a prefix so that they never replace a real one.
_EXTRA_DATA = st.dictionaries(_TEXT.map(lambda t: f"x_{t}"), _JSON_VALUES, max_size=2)
_EXTRA_ENVELOPE = st.dictionaries(_TEXT.map(lambda t: f"y_{t}"), _JSON_VALUES, max_size=2)
_AGE_S = st.floats(-86_400, 60)  # inside the replay window and the allowed clock skew


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """An envelope the platform could send: valid for its event name, with extra fields."""
    name = draw(_EVENT_NAMES)
    data = {**draw(_DATA.get(name, _DATA["unknown"])), **draw(_EXTRA_DATA)}
    envelope = {"event": name, "timestamp": _now_iso(draw(_AGE_S)), "data": data}
    envelope.update(draw(_EXTRA_ENVELOPE))
    return envelope


def _signed(envelope: dict[str, Any], pretty: bool) -> tuple[bytes, list[tuple[str, str]]]:
    body = json.dumps(envelope, indent=2 if pretty else None, ensure_ascii=not pretty).encode()
    return body, [("Content-Type", "application/json"), ("X-FlyMyAI-Signature", sign(body, SECRET))]


def _check_authentic(status: int, calls: Calls, envelope: dict[str, Any]) -> None:
    name, run_id = envelope["event"], str(envelope["data"]["run_id"])
    assert status == 200, status
    expected = [("*", name)]
    if name == "run.completed":
        expected.insert(0, ("completed", run_id))
    elif name == "run.failed":
        expected.insert(0, ("failed", run_id))
    assert calls.seen == expected


@settings(FUZZ, max_examples=2000)
@given(envelopes(), st.booleans())
def test_authentic_envelopes_to_handle(envelope: dict[str, Any], pretty: bool) -> None:
    body, headers = _signed(envelope, pretty)
    calls = Calls(max_body_size=1 << 20)
    _check_authentic(calls.receiver.handle(body, headers).status, calls, envelope)
    # The same delivery again is acknowledged without a second call.
    again = calls.receiver.handle(body, headers)
    assert again.status == 200
    assert len(calls.seen) == (2 if envelope["event"] in ("run.completed", "run.failed") else 1)


@settings(FUZZ, max_examples=1000)
@given(envelope=envelopes(), pretty=st.booleans())
def test_authentic_envelopes_to_ahandle(
    loop: asyncio.AbstractEventLoop, envelope: dict[str, Any], pretty: bool
) -> None:
    body, headers = _signed(envelope, pretty)
    calls = Calls(max_body_size=1 << 20)
    response = loop.run_until_complete(calls.receiver.ahandle(body, headers))
    _check_authentic(response.status, calls, envelope)


# Signed bodies that are anything at all: never a 401, a call only on 200.
_LOOSE = st.one_of(
    envelopes().map(lambda e: {**e, "timestamp": e["timestamp"][:10]}),  # a date only
    st.dictionaries(
        st.sampled_from(["event", "timestamp", "data"]) | _TEXT, _JSON_VALUES, max_size=4
    ),
    st.fixed_dictionaries(
        {"event": _EVENT_NAMES, "timestamp": _TEXT | st.integers(), "data": _JSON_VALUES}
    ),
    _JSON_VALUES,
)


@settings(FUZZ, max_examples=1500)
@given(_LOOSE, st.booleans(), st.booleans())
def test_any_signed_json_is_200_or_400(obj: Any, pretty: bool, use_async: bool) -> None:
    body = json.dumps(obj, indent=2 if pretty else None).encode()
    headers = {"X-FlyMyAI-Signature": sign(body, SECRET)}
    calls = Calls()
    if use_async:
        response = asyncio.run(calls.receiver.ahandle(body, headers))
    else:
        response = calls.receiver.handle(body, headers)
    assert response.status in (200, 400, 413), response.status
    if response.status != 200:
        assert calls.seen == []
    if response.status == 413:
        assert len(body) > MAX_BODY_SIZE
