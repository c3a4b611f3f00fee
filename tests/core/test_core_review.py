"""The core's fixes from the second review and the new-user trial (issue 22): bounded log
lines, "handler failed" wording, the precise trailing-newline hint, public class names in
configuration errors, and the one-warning-per-event-name for events no handler wants."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.errors import ConfigurationError
from flymy_receiver.stores import MemoryStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET

LONG_RUN_ID = "run_" + "x" * 10_000
#: No line the library writes about a delivery is longer than this, whatever the sender sent.
LINE_LIMIT = 1_200


def _signed(event: Any, secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    req = signed_request(event, secret)
    return req.body, req.headers


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flymy_receiver"]


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="flymy_receiver")
    return caplog


def test_every_log_line_is_bounded_whatever_the_run_id(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    broken = [True]

    @receiver.on("run.failed")
    def fails(event: Any) -> None:
        if broken[0]:
            raise RuntimeError("down")

    completed = make_event("run.completed", run_id=LONG_RUN_ID)  # no handler: a warning
    failed = make_event("run.failed", run_id=LONG_RUN_ID)
    body, headers = _signed(failed)
    assert receiver.handle(*_signed(completed)).status == 200
    assert receiver.handle(body, headers).status == 500  # handler failed
    receiver.store.claim(receiver.journal.get(LONG_RUN_ID).key, 60.0)  # type: ignore[union-attr]
    assert receiver.handle(body, headers).status == 409  # in flight: a refusal line
    assert receiver.handle(*_signed(failed, "whsec-wrong")).status == 401
    other = Receiver(SECRET, store=MemoryStore())
    other.on("run.failed")(lambda event: None)
    assert other.handle(body, headers).status == 200
    assert other.handle(body, headers).status == 200  # the duplicate line
    messages = _messages(caplog_debug)
    assert any("duplicate" in m for m in messages)
    assert any("refused delivery: reason=in_flight" in m for m in messages)
    assert any("handler failed" in m for m in messages)
    # The WARNING comes once per event name and process (an earlier test in this worker may
    # have had it); after it, the DEBUG line: either way a line about it, bounded below.
    assert any("no handler wants" in m or "no handler for" in m for m in messages)
    for message in messages:
        assert len(message) < LINE_LIMIT, message[:300]


def test_a_handler_failure_is_logged_as_handler_failed_not_refused(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    broken = [True]

    @receiver.on("run.completed", name="crm")
    def crm(event: RunCompleted) -> None:
        if broken[0]:
            raise RuntimeError("crm is down")

    assert receiver.handle(*_signed(make_event(run_id="run_fail"))).status == 500
    assert receiver.journal is not None
    receiver.journal.replay("run_fail")
    lines = [
        m for m in _messages(caplog_debug) if "crm" in m and "run_fail" in m and "status=500" in m
    ]
    assert lines == [
        "handler failed: handler=crm event=run.completed run_id=run_fail status=500"
        " (raised RuntimeError)",
        "replay: handler failed: handler=crm event=run.completed run_id=run_fail status=500"
        " (raised RuntimeError)",
    ]
    assert not any("refused delivery" in m for m in _messages(caplog_debug))


def test_the_trailing_newline_hint_is_as_precise_as_verify(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    body, headers = _signed(make_event())
    assert receiver.handle(body + b"\n", headers).status == 401
    [message] = [m for m in _messages(caplog_debug) if "refused delivery" in m]
    assert "the signature is over this body without its final newline" in message
    caplog_debug.clear()
    signed_with_newline = {"X-FlyMyAI-Signature": _signed_raw(body + b"\n")}
    assert receiver.handle(body, signed_with_newline).status == 401
    [message] = [m for m in _messages(caplog_debug) if "refused delivery" in m]
    assert "the signature is over this body plus a final newline" in message


def _signed_raw(body: bytes) -> str:
    from flymy_receiver import sign

    return sign(body, SECRET)


def test_configuration_errors_name_public_classes_only() -> None:
    receiver = Receiver(SECRET)  # the default in-process store
    with pytest.raises(ConfigurationError) as caught:
        receiver.on("run.completed", atomic=True)(lambda event: None)
    assert "MemoryStore cannot" in str(caught.value)
    assert "_Default" not in str(caught.value)
    with pytest.raises(ConfigurationError) as caught:
        Receiver(SECRET, journal=False, on_failure=lambda entry: None)
    assert "_Default" not in str(caught.value)


def test_an_event_no_handler_wants_is_a_warning_once_per_event_name(
    caplog_debug: pytest.LogCaptureFixture,
) -> None:
    from flymy_receiver import receiver as receiver_module

    receiver_module._UNWANTED_SEEN.clear()  # once per process: start this test afresh
    receiver = Receiver(SECRET, store=MemoryStore())
    receiver.on("run.completed", agent_id="agent_a")(lambda event: None)
    for number in range(3):
        event = make_event("run.completed", run_id=f"run_other_{number}", agent_id="agent_b")
        assert receiver.handle(*_signed(event)).status == 200
    assert receiver.handle(*_signed(make_event("run.failed", run_id="run_f"))).status == 200
    warnings = [r.getMessage() for r in caplog_debug.records if r.levelno == logging.WARNING]
    assert warnings == [
        "no handler wants run.completed events (run run_other_0): answered 200 and journaled"
        " as ignored; register one with receiver.on('run.completed') if this is not meant"
        " (logged once per event name)",
        "no handler wants run.failed events (run run_f): answered 200 and journaled as"
        " ignored; register one with receiver.on('run.failed') if this is not meant (logged"
        " once per event name)",
    ]


def test_ahandle_logs_the_same_bounded_lines(caplog_debug: pytest.LogCaptureFixture) -> None:
    receiver = Receiver(SECRET, store=MemoryStore())

    @receiver.on("run.failed")
    async def fails(event: Any) -> None:
        raise RuntimeError("down")

    response = asyncio.run(receiver.ahandle(*_signed(make_event("run.failed", run_id=LONG_RUN_ID))))
    assert response.status == 500
    for message in _messages(caplog_debug):
        assert len(message) < LINE_LIMIT
