"""A worker process for tests/django/test_atomic.py: delivers one event to an atomic handler.

``crash_worker.py DIR crash`` ends the process with ``os._exit(17)`` the moment the handler's
transaction commits (a commit hook): its row and its record are committed, nothing after.
``crash_worker.py DIR later`` delivers it again an hour later (past the dead worker's lease)
and prints the status. DIR holds body.json, headers.json and database.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import django
from django.conf import settings


def main() -> int:
    folder, mode = Path(sys.argv[1]), sys.argv[2]
    settings.configure(
        SECRET_KEY="tests-only-not-secret",
        INSTALLED_APPS=["flymy_receiver.django"],
        DATABASES={"default": json.loads((folder / "database.json").read_text())},
        USE_TZ=True,
    )
    django.setup()
    from django.db import connection, transaction

    from flymy_receiver import Receiver, RunCompleted
    from flymy_receiver.django import DjangoStore
    from tests.conftest import SECRET
    from tests.django.conftest import LEADS

    offset = 3600.0 if mode == "later" else 0.0
    store = DjangoStore(clock=lambda: time.time() + offset)
    receiver = Receiver(SECRET, store=store)

    @receiver.on("run.completed", atomic=True)
    def save(event: RunCompleted) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {LEADS} (run_id) VALUES (%s)", [event.data.run_id])  # noqa: S608
        if mode == "crash":
            transaction.on_commit(lambda: os._exit(17))

    body = (folder / "body.json").read_bytes()
    headers = json.loads((folder / "headers.json").read_text())
    response = receiver.handle(body, headers)
    print(response.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
