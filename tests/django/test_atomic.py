"""``on(..., atomic=True)``: with DjangoStore the handler and the record that it succeeded
commit or roll back together; refused wherever that cannot be honoured."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import ConfigurationError, Receiver, Router, RunCompleted
from flymy_receiver.stores import MemoryStore
from tests.conftest import SECRET, require
from tests.django.conftest import insert_lead, leads, request_for

WORKER = Path(__file__).with_name("crash_worker.py")


# -- refused as soon as the receiver can tell ---------------------------------------------


def test_a_store_that_cannot_is_refused_at_registration() -> None:
    receiver = Receiver(SECRET, store=MemoryStore())
    with pytest.raises(ConfigurationError, match="MemoryStore"):
        receiver.on("run.completed", atomic=True)(lambda event: None)
    assert receiver.handlers_for(_event()) == []


def test_an_async_handler_is_refused_even_on_a_plain_router() -> None:
    router = Router()

    async def save(event: RunCompleted) -> None: ...

    with pytest.raises(ConfigurationError, match="sync"):
        router.on("run.completed", atomic=True)(save)
    assert list(router.handlers()) == []


def test_including_a_router_holding_one_is_refused() -> None:
    router = Router()
    router.on("run.completed", atomic=True)(lambda event: None)
    receiver = Receiver(SECRET, store=MemoryStore())
    with pytest.raises(ConfigurationError, match="atomic=True"):
        receiver.include(router)
    with pytest.raises(ConfigurationError):
        Receiver(SECRET).include(Router(router))  # nested one level deeper
    assert receiver.handlers_for(_event()) == []


def test_registering_one_on_a_router_already_included_is_refused() -> None:
    router = Router()
    outer = Router(router)
    Receiver(SECRET, store=MemoryStore()).include(outer)
    with pytest.raises(ConfigurationError, match="MemoryStore"):
        router.on("run.completed", atomic=True)(lambda event: None)
    assert list(router.handlers()) == []
    router.on("run.completed")(lambda event: None)  # a plain one is still fine


def test_django_store_accepts_it() -> None:
    require("django")
    from flymy_receiver.django import DjangoStore

    receiver = Receiver(SECRET, store=DjangoStore())
    router = Router()
    router.on("run.completed", atomic=True)(lambda event: None)
    receiver.include(router)

    def save(event: RunCompleted) -> None: ...

    assert receiver.on("run.completed", atomic=True)(save) is save  # returned unchanged
    assert [h.atomic for h in receiver.handlers()] == [True, True]


def _event() -> Any:
    from flymy_receiver.testing import make_event

    return make_event("run.completed")


# -- the handler's writes and its record, together ----------------------------------------


def _receiver(alias: str, **options: Any) -> Receiver:
    from flymy_receiver.django import DjangoStore

    return Receiver(SECRET, store=DjangoStore(using=alias), **options)


@pytest.mark.parametrize("journal", [True, False])
def test_a_row_written_then_a_raise_leaves_no_row_and_the_retry_writes_it_once(
    alias: str, journal: bool
) -> None:
    receiver = _receiver(alias, journal=journal)
    broken = [True]

    @receiver.on("run.completed", atomic=True)
    def save(event: RunCompleted) -> None:
        insert_lead(alias, event.data.run_id)
        if broken[0]:
            raise RuntimeError("crm is down")

    body, headers = request_for("run_atomic")
    assert receiver.handle(body, headers).status == 500
    assert leads(alias) == []  # rolled back with the handler
    if journal:
        entry = receiver.journal.get("run_atomic") if receiver.journal else None
        assert entry is not None
        assert entry.state == "failed"  # the failure is recorded, outside the rollback
        [outcome] = entry.handlers.values()
        assert outcome.error == "RuntimeError: crm is down"
    broken[0] = False
    assert receiver.handle(body, headers).status == 200
    assert leads(alias) == ["run_atomic"]
    duplicate = receiver.handle(body, headers)
    assert json.loads(duplicate.body).get("duplicate") is True
    assert leads(alias) == ["run_atomic"]


def test_a_partial_failure_keeps_the_atomic_handler_done(alias: str) -> None:
    receiver = _receiver(alias)
    broken = [True]

    @receiver.on("run.completed", atomic=True)
    def save(event: RunCompleted) -> None:
        insert_lead(alias, event.data.run_id)

    @receiver.on("run.completed")
    def notify(event: RunCompleted) -> None:
        if broken[0]:
            raise RuntimeError("mail is down")

    body, headers = request_for("run_partial")
    assert receiver.handle(body, headers).status == 500
    assert leads(alias) == ["run_partial"]  # committed with its record
    broken[0] = False
    assert receiver.handle(body, headers).status == 200
    assert leads(alias) == ["run_partial"]  # not run again
    entry = receiver.journal.get("run_partial") if receiver.journal else None
    assert entry is not None
    assert entry.state == "handled"
    assert all(o.ok for o in entry.handlers.values())


def test_ahandle_runs_it_in_a_worker_thread_with_the_same_guarantee(alias: str) -> None:
    receiver = _receiver(alias)
    broken = [True]

    @receiver.on("run.completed", atomic=True)
    def save(event: RunCompleted) -> None:
        insert_lead(alias, event.data.run_id)
        if broken[0]:
            raise ValueError("bad row")

    body, headers = request_for("run_async")
    assert asyncio.run(receiver.ahandle(body, headers)).status == 500
    assert leads(alias) == []
    broken[0] = False
    assert asyncio.run(receiver.ahandle(body, headers)).status == 200
    assert leads(alias) == ["run_async"]


def test_a_replay_of_a_failed_atomic_handler_writes_once(alias: str) -> None:
    receiver = _receiver(alias)
    broken = [True]

    @receiver.on("run.completed", atomic=True)
    def save(event: RunCompleted) -> None:
        insert_lead(alias, event.data.run_id)
        if broken[0]:
            raise RuntimeError("down")

    body, headers = request_for("run_replayed")
    assert receiver.handle(body, headers).status == 500
    broken[0] = False
    assert receiver.journal is not None
    assert receiver.journal.replay("run_replayed").state == "handled"
    assert receiver.handle(body, headers).status == 200  # the sender's late retry
    assert leads(alias) == ["run_replayed"]


# -- a real process killed right after the handler's commit ---------------------------------


def test_a_process_killed_right_after_the_commit_never_runs_it_again(
    alias: str, tmp_path: Path
) -> None:
    from django.db import connections

    body, headers = request_for("run_killed")
    (tmp_path / "body.json").write_bytes(body)
    (tmp_path / "headers.json").write_text(json.dumps(headers))
    database = connections[alias].settings_dict
    config = {
        "ENGINE": database["ENGINE"],
        "NAME": database["NAME"],
        "USER": database.get("USER") or "",
        "HOST": database.get("HOST") or "",
        "PORT": database.get("PORT") or "",
    }
    (tmp_path / "database.json").write_text(json.dumps(config))

    def worker(*mode: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        return subprocess.run(
            [sys.executable, str(WORKER), str(tmp_path), *mode],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )

    killed = worker("crash")
    # os._exit from the commit hook: the row and the record are committed, nothing after.
    assert killed.returncode == 17, killed.stdout + killed.stderr
    assert leads(alias) == ["run_killed"]
    retry = worker("later")  # the sender's retry, once the dead worker's lease has run out
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert retry.stdout.strip() == "200"
    assert leads(alias) == ["run_killed"]  # never run again
    from flymy_receiver.django import DjangoStore

    entry = DjangoStore(using=alias).journal_get("run_killed")
    assert entry is not None
    assert entry.state == "handled"
    assert entry.attempts == 2


# -- a transaction that cannot commit says why (issue 22) -----------------------------------


def test_a_handler_that_leaves_the_transaction_rollback_only_is_journaled_as_such(
    alias: str,
) -> None:
    from django.db import transaction

    receiver = _receiver(alias)

    @receiver.on("run.completed", atomic=True)
    def save(event: RunCompleted) -> None:
        insert_lead(alias, event.data.run_id)
        transaction.set_rollback(True, using=alias)  # as a caught database error would

    body, headers = request_for("run_rollback_only")
    assert receiver.handle(body, headers).status == 500
    assert leads(alias) == []
    entry = receiver.journal.get("run_rollback_only") if receiver.journal else None
    assert entry is not None
    assert entry.state == "failed"
    [outcome] = entry.handlers.values()
    assert outcome.error is not None
    assert outcome.error.startswith("StoreUnavailable: the transaction was marked rollback-only")


def test_a_commit_that_fails_is_journaled_as_such(alias: str) -> None:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS flymy_test_child")
        cursor.execute("DROP TABLE IF EXISTS flymy_test_parent")
        cursor.execute("CREATE TABLE flymy_test_parent (id INTEGER PRIMARY KEY)")
        cursor.execute(
            "CREATE TABLE flymy_test_child (parent_id INTEGER REFERENCES flymy_test_parent (id)"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
    receiver = _receiver(alias)

    @receiver.on("run.completed", atomic=True)
    def save(event: RunCompleted) -> None:
        insert_lead(alias, event.data.run_id)
        with connections[alias].cursor() as cursor:  # checked only at COMMIT
            cursor.execute("INSERT INTO flymy_test_child (parent_id) VALUES (42)")

    body, headers = request_for("run_commit_fails")
    assert receiver.handle(body, headers).status == 500
    assert leads(alias) == []
    entry = receiver.journal.get("run_commit_fails") if receiver.journal else None
    assert entry is not None
    assert entry.state == "failed"
    [outcome] = entry.handlers.values()
    assert outcome.error is not None
    assert outcome.error.startswith("StoreUnavailable: commit failed"), outcome.error
    assert "IntegrityError" in outcome.error
