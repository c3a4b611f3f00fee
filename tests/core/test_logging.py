"""Safe logging: every refusal is logged once, with a reason code, and never a secret.

A refusal's log record carries ``flymy_reason`` and ``flymy_status`` and names the event and
run id where they are known. No record contains the secret, the expected signature or the
body. A bad signature gets a hint, in the log only, when one can be known.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flymy_receiver import Receiver, Response, sign
from flymy_receiver.stores import MemoryStore, Store
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET

OLD_SECRET = "whsec-old-rotated-secret"
#: Put in every body; it must never show up in a log record.
MARKER = "body-marker-7f3a9c"
BAD_SIGNATURE = {"X-FlyMyAI-Signature": "0" * 64}


def _event(name: str = "run.completed", **fields: Any) -> Any:
    fields.setdefault("input", {"note": MARKER})
    return make_event(name, **fields)


def _signed(obj: Any, secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    request = signed_request(obj, secret)
    return request.body, request.headers


def _deliver(receiver: Receiver, body: bytes, headers: Any, method: str = "POST") -> Response:
    """What an adapter does: answer from the headers if it can, else read and handle."""
    return receiver.precheck(headers, method) or receiver.handle(body, headers, method)


def _adeliver(receiver: Receiver, body: bytes, headers: Any, method: str = "POST") -> Response:
    early = receiver.precheck(headers, method)
    return early or asyncio.run(receiver.ahandle(body, headers, method))


def _text(record: logging.LogRecord) -> str:
    """Everything a log handler could write for ``record``: message, extras, traceback."""
    formatted = logging.Formatter().format(record)
    return formatted + repr(record.__dict__)


class Receivers:
    """A receiver with a recording handler and a handler that raises, and its records."""

    def __init__(self, caplog: pytest.LogCaptureFixture, store: Store | None = None) -> None:
        self.caplog = caplog
        self.calls: list[str] = []
        self.receiver = Receiver(
            secret=[SECRET, OLD_SECRET], store=store if store is not None else MemoryStore()
        )

        @self.receiver.on("run.completed")
        def completed(event: Any) -> None:
            self.calls.append(event.data.run_id)

        @self.receiver.on("run.failed")
        def failing(event: Any) -> None:
            raise RuntimeError(f"handler exploded on {event.data.run_id}")

    def refusals(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if hasattr(r, "flymy_reason")]


@pytest.fixture
def rx(caplog: pytest.LogCaptureFixture) -> Iterator[Receivers]:
    caplog.set_level(logging.DEBUG, logger="flymy_receiver")
    receivers = Receivers(caplog)
    yield receivers
    # Whatever the test did: no record holds a secret, an expected signature or the body.
    for record in caplog.records:
        text = _text(record)
        assert SECRET not in text
        assert OLD_SECRET not in text
        assert MARKER not in text


def _stale(days: int) -> tuple[bytes, dict[str, str]]:
    stamp = datetime.now(timezone.utc) + timedelta(days=days)
    return _signed(_event(timestamp=stamp, run_id="run_stale"))


# (reason, status, request builder, what the message names besides the reason)
CASES: dict[str, tuple[str, int, Callable[[], tuple[bytes, dict[str, str], str]], str]] = {
    "no signature": (
        "missing_signature",
        401,
        lambda: (signed_request(_event(), SECRET).body, {}, "POST"),
        "",
    ),
    "wrong secret": (
        "signature_mismatch",
        401,
        lambda: (*_signed(_event(), "whsec-wrong"), "POST"),
        "",
    ),
    "63 hex digits": (
        "malformed_signature",
        401,
        lambda: (b"{}", {"X-FlyMyAI-Signature": "a" * 63}, "POST"),
        "",
    ),
    "non-ASCII signature": (
        "malformed_signature",
        401,
        lambda: (b"{}", {"X-FlyMyAI-Signature": "é" * 64}, "POST"),
        "",
    ),
    "invalid JSON": (
        "invalid_json",
        400,
        lambda: (*_signed(b'{"x": ' + MARKER.encode()), "POST"),
        "",
    ),
    "not an object": ("not_an_object", 400, lambda: (*_signed(f'["{MARKER}"]'), "POST"), ""),
    "bad envelope": (
        "invalid_envelope",
        400,
        lambda: (*_signed({"event": "run.completed", "data": {"x": MARKER}}), "POST"),
        "",
    ),
    "too old": (
        "too_old",
        400,
        lambda: (*_stale(-30), "POST"),
        "event=run.completed run_id=run_stale",
    ),
    "from the future": (
        "from_the_future",
        400,
        lambda: (*_stale(2), "POST"),
        "event=run.completed run_id=run_stale",
    ),
    "body too large": (
        "too_large",
        413,
        lambda: (*_signed(_event(output={"blob": "x" * 6_000_000})), "POST"),
        "",
    ),
    "content-length too large": (
        "too_large",
        413,
        lambda: (b"", {**BAD_SIGNATURE, "Content-Length": "99999999"}, "POST"),
        "",
    ),
    "gzip": (
        "unsupported_encoding",
        415,
        lambda: (b"\x1f\x8b", {**BAD_SIGNATURE, "Content-Encoding": "gzip"}, "POST"),
        "",
    ),
    "GET": ("method_not_allowed", 405, lambda: (b"", {}, "GET"), ""),
}


@pytest.mark.parametrize("driver", [_deliver, _adeliver], ids=["handle", "ahandle"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_refusal_is_logged_once_with_its_reason(
    rx: Receivers, case: str, driver: Callable[..., Response]
) -> None:
    reason, status, build, names = CASES[case]
    body, headers, method = build()
    response = driver(rx.receiver, body, headers, method)
    assert response.status == status
    assert rx.calls == []
    [record] = rx.refusals()
    assert (record.flymy_reason, record.flymy_status) == (reason, status)  # type: ignore[attr-defined]
    assert f"reason={reason}" in record.getMessage()
    assert names in record.getMessage()
    assert record.levelno == logging.WARNING
    # The expected signatures of this body, under either secret, appear nowhere.
    for record in rx.caplog.records:
        assert sign(body, SECRET) not in _text(record)
        assert sign(body, OLD_SECRET) not in _text(record)


def test_an_event_in_flight_is_logged_with_its_event_and_run(rx: Receivers) -> None:
    event = _event(run_id="run_busy")
    rx.receiver.store.claim("run.completed:run_busy", 60.0)  # another worker holds it
    assert rx.receiver.handle(*_signed(event)).status == 409
    [record] = rx.refusals()
    assert record.flymy_reason == "in_flight"  # type: ignore[attr-defined]
    assert "event=run.completed run_id=run_busy" in record.getMessage()


def test_a_handler_failure_is_logged_once_with_its_traceback(rx: Receivers) -> None:
    body, headers = _signed(_event("run.failed", run_id="run_boom"))
    response = rx.receiver.handle(body, headers)
    assert response.status == 500
    assert b"exploded" not in response.body
    assert b"Traceback" not in response.body
    [record] = [r for r in rx.caplog.records if r.levelno >= logging.ERROR]
    assert record is rx.refusals()[0]
    assert (record.flymy_reason, record.flymy_status) == ("handler_failed", 500)  # type: ignore[attr-defined]
    assert record.exc_info is not None
    text = _text(record)
    assert "Traceback" in text
    assert "RuntimeError: handler exploded on run_boom" in text
    assert "run_boom" in record.getMessage()
    assert sign(body, SECRET) not in text


def test_a_store_failure_is_logged_once_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    class DownStore(MemoryStore):
        def claim(self, key: str, lease: float, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("store is down")

    caplog.set_level(logging.DEBUG, logger="flymy_receiver")
    rx = Receivers(caplog, store=DownStore())
    body, headers = _signed(_event(run_id="run_down"))
    response = rx.receiver.handle(body, headers)
    assert response.status == 503
    assert b"store is down" not in response.body
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record is rx.refusals()[0]
    assert (record.flymy_reason, record.flymy_status) == ("store_unavailable", 503)  # type: ignore[attr-defined]
    assert "event=run.completed run_id=run_down" in record.getMessage()
    assert SECRET not in _text(record)
    assert sign(body, SECRET) not in _text(record)


def test_the_secret_whitespace_warning_does_not_show_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flymy_receiver")
    receiver = Receiver(secret=f"  {SECRET}\n")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "whitespace" in record.getMessage()
    assert SECRET not in _text(record)
    body, headers = _signed(_event())
    assert receiver.handle(body, headers).status == 200  # the stripped secret is the one used


# -- hints for a bad signature, in the log only --------------------------------------------


def _hint(rx: Receivers, body: bytes, headers: dict[str, str]) -> str:
    response = rx.receiver.handle(body, headers)
    # The sender learns nothing more than "Invalid signature".
    assert (response.status, response.body) == (401, b'{"error":"Invalid signature"}')
    [record] = rx.refusals()
    assert record.flymy_reason == "signature_mismatch"  # type: ignore[attr-defined]
    return record.getMessage()


def test_hint_body_reserialised_after_signing(rx: Receivers) -> None:
    body, headers = _signed(_event())
    pretty = json.dumps(json.loads(body), indent=2).encode()
    assert "re-serialised" in _hint(rx, pretty, headers)


def test_hint_body_is_not_a_plain_dump_of_itself(rx: Receivers) -> None:
    body, _ = _signed(_event())
    odd = body.replace(b'":', b'" :')  # no json.dumps writes this spacing
    message = _hint(rx, odd, BAD_SIGNATURE)
    assert "neither a compact nor a pretty JSON dump" in message


def test_hint_trailing_newline(rx: Receivers) -> None:
    body, headers = _signed(_event())
    assert "ends with a newline" in _hint(rx, body + b"\n", headers)


def test_hint_byte_order_mark(rx: Receivers) -> None:
    body, headers = _signed(_event())
    assert "BOM" in _hint(rx, b"\xef\xbb\xbf" + body, headers)


def test_hint_empty_body_consumed_by_a_middleware(rx: Receivers) -> None:
    _, headers = _signed(_event())
    assert "middleware" in _hint(rx, b"", headers)


def test_hint_header_with_whitespace(rx: Receivers) -> None:
    body, _ = _signed(_event())
    headers = {"X-FlyMyAI-Signature": f"  {sign(body, 'whsec-wrong')}\t"}
    assert "whitespace" in _hint(rx, body, headers)


def test_hint_header_with_a_prefix(rx: Receivers) -> None:
    body, _ = _signed(_event())
    headers = {"X-FlyMyAI-Signature": f"sha256={sign(body, 'whsec-wrong')}"}
    assert "sha256=" in _hint(rx, body, headers)


def test_no_hint_is_invented_for_a_plain_wrong_secret(rx: Receivers) -> None:
    body, headers = _signed(_event(), "whsec-wrong")
    message = _hint(rx, body, headers)
    for hint in ("whitespace", "sha256=", "newline", "BOM", "re-serialised", "middleware"):
        assert hint not in message


def test_an_accepted_delivery_logs_no_refusal(rx: Receivers) -> None:
    body, headers = _signed(_event())
    assert rx.receiver.handle(body, headers).status == 200
    assert rx.refusals() == []
    assert [r for r in rx.caplog.records if r.levelno >= logging.WARNING] == []


def test_costly_hints_are_rationed_so_a_flood_of_forgeries_stays_cheap(rx: Receivers) -> None:
    # A clock that stands still: no refill during the test, however slow the machine.
    rx.receiver._hint_budget = type(rx.receiver._hint_budget)(1.0, 10, clock=lambda: 0.0)
    body, headers = _signed(_event())
    pretty = json.dumps(json.loads(body), indent=2).encode() + b"\n"
    burst = rx.receiver._hint_budget.burst
    messages = []
    for _ in range(burst + 5):
        rx.caplog.clear()
        messages.append(_hint(rx, pretty, headers))
    # The re-serialisation check (a parse and several HMACs) runs for the first burst only,
    assert all("re-serialised" in m for m in messages[:burst])
    assert not any("re-serialised" in m for m in messages[burst:])
    # while the cheap hints are given every time.
    assert all("ends with a newline" in m for m in messages)
