"""The replay window on the signed ``timestamp``, and how long handled events are remembered."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from flymy_receiver import Receiver
from flymy_receiver.stores import MemoryStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET

NOW = datetime(2025, 1, 15, 10, 0, 15, tzinfo=timezone.utc)


class Clocks:
    """One moving 'now' for the receiver (datetime) and its store (seconds)."""

    def __init__(self) -> None:
        self.now = NOW

    def receiver_clock(self) -> datetime:
        return self.now

    def store_clock(self) -> float:
        return self.now.timestamp()


def _receiver(clocks: Clocks, calls: list[str], **options: object) -> Receiver:
    receiver = Receiver(
        SECRET,
        store=MemoryStore(clock=clocks.store_clock),
        clock=clocks.receiver_clock,
        **options,  # type: ignore[arg-type]
    )
    receiver.on("*")(lambda event: calls.append(event.event))
    return receiver


def _sent_at(when: datetime, run_id: str = "run_window") -> tuple[bytes, dict[str, str]]:
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    req = signed_request(make_event("run.completed", run_id=run_id, timestamp=stamp), SECRET)
    return req.body, req.headers


def test_the_default_window_is_three_days() -> None:
    receiver = Receiver(SECRET)
    assert receiver.max_age == timedelta(days=3)
    # Handled events are remembered at least as long as a replay would be accepted.
    assert receiver.retention >= receiver.max_age + receiver.max_clock_skew


@pytest.mark.parametrize(
    ("age", "status"),
    [
        (timedelta(0), 200),
        (timedelta(days=3) - timedelta(seconds=1), 200),  # a late retry of a genuine event
        (timedelta(days=3) + timedelta(seconds=1), 400),
        (timedelta(days=400), 400),
        (-timedelta(minutes=5) + timedelta(seconds=1), 200),  # the sender's clock runs ahead
        (-timedelta(minutes=5) - timedelta(seconds=1), 400),
        (-timedelta(days=30), 400),
    ],
)
def test_window_edges(age: timedelta, status: int) -> None:
    clocks, calls = Clocks(), []
    receiver = _receiver(clocks, calls)
    response = receiver.handle(*_sent_at(NOW - age))
    assert response.status == status
    assert len(calls) == (1 if status == 200 else 0)
    if status == 400:
        message = json.loads(response.body)["error"]
        assert message.startswith("Event outside the replay window: timestamp ")
        assert ("3 days" if age > timedelta(0) else "5 minutes in the future") in message


def test_window_is_configurable_and_can_be_turned_off() -> None:
    clocks, calls = Clocks(), []
    short = _receiver(clocks, calls, max_age=timedelta(minutes=10))
    assert short.handle(*_sent_at(NOW - timedelta(minutes=11))).status == 400
    off = _receiver(clocks, calls, max_age=None)
    assert off.handle(*_sent_at(NOW - timedelta(days=3650))).status == 200
    assert off.handle(*_sent_at(NOW + timedelta(days=3650), run_id="r2")).status == 200
    assert len(calls) == 2


def test_a_retry_with_the_original_timestamp_is_handled_late_in_the_window() -> None:
    """The platform signs only the body, so every retry carries the first timestamp."""
    clocks = Clocks()
    receiver = Receiver(
        SECRET, store=MemoryStore(clock=clocks.store_clock), clock=clocks.receiver_clock
    )
    database = {"up": False, "rows": 0}

    @receiver.on("run.completed")
    def save(event: object) -> None:
        if not database["up"]:
            raise ConnectionError("database down")
        database["rows"] += 1

    request = _sent_at(NOW)
    assert receiver.handle(*request).status == 500
    clocks.now = NOW + timedelta(days=2, hours=23)  # the sender's last retry, much later
    database["up"] = True
    assert receiver.handle(*request).status == 200
    assert database["rows"] == 1


def test_a_replay_is_caught_for_the_whole_window() -> None:
    """A handled event is remembered until its timestamp has left the window."""
    clocks, calls = Clocks(), []
    receiver = _receiver(clocks, calls)
    request = _sent_at(NOW + timedelta(minutes=5))  # sent from a clock 5 minutes ahead
    assert receiver.handle(*request).status == 200
    for elapsed in (timedelta(hours=1), timedelta(days=3), timedelta(days=3, minutes=4)):
        clocks.now = NOW + elapsed
        response = receiver.handle(*request)
        assert response.status == 200
        assert json.loads(response.body).get("duplicate") is True
    clocks.now = NOW + timedelta(days=3, minutes=6)
    assert receiver.handle(*request).status == 400  # out of the window before forgotten
    assert len(calls) == 1
