"""A receiver whose handlers have no ``__qualname__`` of their own (a partial, a callable
instance), named with ``name=``, plus a plain function: built the same way in two processes
by ``test_handler_identity``, which checks that their ids, and so their records, match.

Run as ``python -m tests.core.identity_app STORE_PATH BODY_PATH``: delivers the body once
and prints the status and the handlers that ran, as JSON. ``FAIL_NOTIFY=1`` makes the
``notify`` handler raise.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from flymy_receiver import Receiver
from flymy_receiver.stores import SQLiteStore

SECRET = "whsec-identity-secret"
RAN: list[str] = []


def charge(event: Any, *, currency: str) -> None:
    RAN.append(f"charge:{currency}")


class Notifier:
    def __call__(self, event: Any) -> None:
        RAN.append("notify")
        if os.environ.get("FAIL_NOTIFY") == "1":
            raise RuntimeError("notification service down")


def audit(event: Any) -> None:
    RAN.append("audit")


def build(store_path: str) -> Receiver:
    receiver = Receiver(secret=SECRET, store=SQLiteStore(store_path), max_age=None)
    receiver.on("run.completed", name="charge-eur")(functools.partial(charge, currency="EUR"))
    receiver.on("run.completed", name="charge-usd")(functools.partial(charge, currency="USD"))
    receiver.on("run.completed", name="notify")(Notifier())
    receiver.on("run.completed")(audit)
    return receiver


def main() -> None:
    store_path, body_path = sys.argv[1], sys.argv[2]
    receiver = build(store_path)
    body = Path(body_path).read_bytes()
    from flymy_receiver.signature import SIGNATURE_HEADER, sign

    response = receiver.handle(body, {SIGNATURE_HEADER: sign(body, SECRET)})
    ids = [handler.id for handler in receiver.handlers()]
    print(json.dumps({"status": response.status, "ran": RAN, "ids": ids}))


if __name__ == "__main__":
    main()
