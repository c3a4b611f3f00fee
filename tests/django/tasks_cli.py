"""A Django project in one file for tests/django/test_tasks_queue.py: a receiver with deferred
handlers on ``DjangoTasksQueue`` and ``DjangoStore``, the database backend of Django's tasks,
and the commands the test runs in separate processes.

``python tests/django/tasks_cli.py COMMAND ...`` with ``FLYMY_TEST_DATABASE`` (the database
settings, JSON) and ``FLYMY_TEST_DIR`` (where the handlers leave and find marker files):

- ``setup``: migrate (the app's tables and the tasks' jobs) and create the leads table;
- ``deliver RUN_ID MODE``: one signed delivery through the receiver; prints the answer and
  the deferred handlers' states read right after it, as JSON;
- ``deliver-then-die RUN_ID MODE``: the same, but the process ends (``os._exit(3)``) right
  after the store's ``complete`` commits, before the receiver sends any job itself;
- ``worker``: the tasks framework's database worker (``manage.py db_worker``);
- ``state RUN_ID``: the entry and the leads of that run, as JSON;
- ``sweep``: ``journal.sweep(older_than=0)``; prints how many jobs it sent again.

The handlers act on ``output["mode"]``: ``slow`` waits for ``RUN_ID.release`` (after writing
``RUN_ID.started``) and then writes a lead; ``atomic`` writes a lead in an ``atomic=True``
deferred handler, and while ``RUN_ID.hold`` exists it waits there, inside its transaction,
for the test to kill it; ``commit_exit`` writes its lead and ends the process the moment its
transaction (lead and record) commits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import django
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LEADS = "flymy_test_leads"
#: The lease of a deferred handler: a killed worker's handler runs again after it.
LEASE = timedelta(seconds=3)


def configure() -> None:
    if settings.configured:
        return
    installed = ["flymy_receiver.django", "django_tasks_db"]
    if importlib.util.find_spec("django.tasks") is None:  # before Django 6: the backport
        installed.insert(1, "django_tasks")
    settings.configure(
        SECRET_KEY="tests-only-not-secret",
        INSTALLED_APPS=installed,
        DATABASES={"default": json.loads(os.environ["FLYMY_TEST_DATABASE"])},
        TASKS={"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}},
        FLYMY_RECEIVER="tests.django.tasks_cli:receiver",
        USE_TZ=True,
        LOGGING_CONFIG=None,
    )
    django.setup()


configure()

from django.db import connection, transaction  # noqa: E402

from flymy_receiver import Receiver, RunCompleted  # noqa: E402
from flymy_receiver.django import DjangoStore  # noqa: E402
from flymy_receiver.queues.django import DjangoTasksQueue  # noqa: E402
from tests.conftest import SECRET  # noqa: E402

FOLDER = Path(os.environ.get("FLYMY_TEST_DIR", "."))

receiver = Receiver(
    SECRET,
    store=DjangoStore(),
    queue=DjangoTasksQueue(attempts=2, retry_delay=timedelta(0)),
    lease=LEASE,
)


def _mode(event: RunCompleted) -> str:
    output = event.data.output
    return str(output.get("mode")) if isinstance(output, dict) else ""


def _insert_lead(run_id: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {LEADS} (run_id) VALUES (%s)", [run_id])  # noqa: S608


def _wait_for(path: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@receiver.on("run.completed", defer=True)
def slow(event: RunCompleted) -> None:
    if _mode(event) != "slow":
        return
    run_id = event.data.run_id
    (FOLDER / f"{run_id}.started").write_text(str(os.getpid()))
    _wait_for(FOLDER / f"{run_id}.release")
    _insert_lead(run_id)


@receiver.on("run.completed", defer=True, atomic=True)
def atomic_effect(event: RunCompleted) -> None:
    mode = _mode(event)
    if mode not in ("atomic", "commit_exit"):
        return
    run_id = event.data.run_id
    _insert_lead(run_id)
    if (FOLDER / f"{run_id}.hold").exists():  # killed here: the lead is not committed
        (FOLDER / f"{run_id}.started").write_text(str(os.getpid()))
        _wait_for(FOLDER / f"{run_id}.release")
    if mode == "commit_exit":
        transaction.on_commit(lambda: os._exit(17))


def _entry_state(run_id: str) -> dict[str, object]:
    assert receiver.journal is not None
    entry = receiver.journal.get(run_id)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {LEADS} WHERE run_id = %s", [run_id])  # noqa: S608
        leads = cursor.fetchone()[0]
    if entry is None:
        return {"state": None, "leads": leads}
    return {
        "state": entry.state,
        "handlers": {
            name.rpartition(".")[2]: {"state": o.state, "attempts": o.attempts}
            for name, o in entry.handlers.items()
        },
        "history": [a.outcome for a in entry.history],
        "leads": leads,
    }


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "setup":
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {LEADS} (run_id VARCHAR(200) NOT NULL)")
    elif command == "deliver":
        from flymy_receiver.testing import make_event, signed_request

        run_id, mode = argv[1], argv[2]
        event = make_event("run.completed", run_id=run_id, output={"mode": mode})
        request = signed_request(event, SECRET)
        response = receiver.handle(request.body, request.headers)
        answer = {"status": response.status, "body": json.loads(response.body)}
        print(json.dumps({"answer": answer, "entry": _entry_state(run_id)}))
    elif command == "deliver-then-die":  # killed between the commit and the queue's send
        from flymy_receiver.testing import make_event, signed_request

        store = receiver.store
        complete = store.complete

        def complete_then_die(*args: object, **kwargs: object) -> None:
            complete(*args, **kwargs)  # type: ignore[arg-type]
            os._exit(3)

        store.complete = complete_then_die  # type: ignore[method-assign]
        event = make_event("run.completed", run_id=argv[1], output={"mode": argv[2]})
        request = signed_request(event, SECRET)
        receiver.handle(request.body, request.headers)
        return 1  # never reached
    elif command == "worker":
        from django.core.management import call_command

        call_command("db_worker", interval=0.1, startup_delay=False, verbosity=0)
    elif command == "state":
        print(json.dumps(_entry_state(argv[1])))
    elif command == "sweep":
        assert receiver.journal is not None
        print(len(receiver.journal.sweep(older_than=timedelta(0))))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    # Run the module under its own name, so that the handlers' ids are the ones the worker
    # finds through FLYMY_RECEIVER (not "__main__.slow").
    from tests.django import tasks_cli

    sys.exit(tasks_cli.main(sys.argv[1:]))
