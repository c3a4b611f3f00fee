"""Code run in worker processes by the concurrency and journal tests (importable, for
``spawn``).

Each worker builds its own receiver on a shared store and delivers the same signed
requests as the others, retrying every non-2xx like the platform; every handler run is
appended to a ledger file, one line each, so the parent can count them.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from flymy_receiver import Receiver
from flymy_receiver.stores import store_from_url
from tests.conftest import SECRET

MAX_ATTEMPTS = 1000
DEADLINE = 60.0


def ledger_append(path: str, line: str) -> None:
    """One ``write`` on an ``O_APPEND`` file: lines from many processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def deliver_all(
    store_url: str,
    requests: list[tuple[bytes, dict[str, str]]],
    ledger: str,
    seed: int,
    start: Any,
) -> dict[str, int]:
    """Deliver every request until it is acknowledged; return how the answers went."""
    receiver = Receiver(SECRET, store=store_from_url(store_url))
    rng = random.Random(seed)

    @receiver.on("run.completed")
    def record(event: Any) -> None:
        time.sleep(rng.uniform(0, 0.003))  # widen the window in which others may collide
        ledger_append(ledger, f"{event.data.run_id} {os.getpid()}")

    order = list(requests)
    rng.shuffle(order)
    counts = {"received": 0, "duplicate": 0, "409": 0, "other": 0}
    start.wait(60)  # every worker starts delivering at the same moment
    deadline = time.monotonic() + DEADLINE
    for body, headers in order:
        for _ in range(MAX_ATTEMPTS):
            if time.monotonic() > deadline:
                raise TimeoutError("deliveries did not finish in time")
            response = receiver.handle(body, headers)
            if response.ok:
                counts["duplicate" if b"duplicate" in response.body else "received"] += 1
                break
            counts["409" if response.status == 409 else "other"] += 1
            time.sleep(0.002)
        else:
            raise RuntimeError("an event was never acknowledged")
    return counts


def hang_in_handler(store_url: str, request_file: str, started_file: str, lease: float) -> None:
    """Claim the event, signal that its handler started, then hang until killed."""
    from datetime import timedelta

    receiver = Receiver(SECRET, store=store_from_url(store_url), lease=timedelta(seconds=lease))

    @receiver.on("run.completed")
    def hang(event: Any) -> None:
        ledger_append(started_file, event.data.run_id)
        time.sleep(600)  # the test kills this process long before

    body = Path(request_file).read_bytes()
    signature = Path(request_file + ".sig").read_text()
    receiver.handle(body, {"X-FlyMyAI-Signature": signature})


# -- the journal shared by several processes (tests/delivery/test_journal_shared.py) --------

#: This process's ledger and whether its CRM is down (each process has its own).
_SHARED = {"ledger": "", "broken": "no"}


def save(event: Any) -> None:
    """The handler that always works: a row saved."""
    ledger_append(_SHARED["ledger"], f"save {event.data.run_id} {os.getpid()}")


def notify(event: Any) -> None:
    """The handler that fails while this process's CRM is down."""
    if _SHARED["broken"] == "yes":
        ledger_append(_SHARED["ledger"], f"notify-failed {event.data.run_id} {os.getpid()}")
        raise RuntimeError("crm is down")
    ledger_append(_SHARED["ledger"], f"notify {event.data.run_id} {os.getpid()}")


def shared_receiver(store_url: str, ledger: str, *, broken: bool) -> Receiver:
    """A receiver with ``save`` then ``notify``: the same handler ids in every process."""
    _SHARED.update(ledger=ledger, broken="yes" if broken else "no")
    receiver = Receiver(SECRET, store=store_from_url(store_url))
    receiver.on("run.completed")(save)
    receiver.on("run.completed")(notify)
    return receiver


def deliver_while_broken(
    store_url: str, body: bytes, headers: dict[str, str], ledger: str, times: int
) -> list[int]:
    """The sender's attempts reaching a worker whose CRM is down; their statuses."""
    receiver = shared_receiver(store_url, ledger, broken=True)
    return [receiver.handle(body, headers).status for _ in range(times)]


def exit_in_handler(store_url: str, body: bytes, headers: dict[str, str], ledger: str) -> None:
    """Claim the event with a short lease, then die inside the handler (``os._exit``)."""
    from datetime import timedelta

    receiver = Receiver(SECRET, store=store_from_url(store_url), lease=timedelta(seconds=5))

    @receiver.on("run.completed")
    def dies(event: Any) -> None:
        ledger_append(ledger, f"started {event.data.run_id} {os.getpid()}")
        os._exit(3)  # no release, no finally: the worker is gone

    receiver.handle(body, headers)
    raise RuntimeError("the handler returned")


if __name__ == "__main__":
    import sys

    hang_in_handler(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
