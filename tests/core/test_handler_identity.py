"""Handler ids: unique among the handlers an event reaches, the same in every process.

A handler's id is what the store records when it succeeds. Two handlers sharing one means a
failed handler is skipped as "done" on the retry (it never runs); an id that differs per
process means a handler that succeeded runs again after a restart (a card charged twice).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver, Router
from flymy_receiver.errors import ConfigurationError
from flymy_receiver.stores import MemoryStore, SQLiteStore, Store
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.core import identity_app

ROOT = Path(__file__).resolve().parents[2]


def router_with_a_handle(calls: list[str], label: str, fail: list[bool]) -> Router:
    """A module's router with a handler named like every other module's: ``handle``."""
    router = Router()

    @router.on("run.completed", name=f"{label}.handle")
    def handle(event: Any) -> None:
        calls.append(label)
        if fail and fail[0]:
            raise RuntimeError(f"{label} failed")

    return router


def unnamed_router() -> Router:
    router = Router()

    @router.on("run.completed")
    def handle(event: Any) -> None: ...

    return router


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(str(tmp_path / "records.sqlite3"))


def test_two_routers_with_the_same_handler_name_are_refused_without_name() -> None:
    receiver = Receiver(secret=SECRET)
    receiver.include(unnamed_router())
    with pytest.raises(ConfigurationError, match="name="):
        receiver.include(unnamed_router())
    with pytest.raises(ConfigurationError, match="name="):
        Router(unnamed_router(), unnamed_router())


def test_a_clash_registered_on_an_included_router_later_is_refused() -> None:
    receiver, outer, inner = Receiver(secret=SECRET), Router(), Router()
    outer.include(inner)
    receiver.include(outer)

    def handle(event: Any) -> None: ...

    receiver.on("run.completed")(handle)
    with pytest.raises(ConfigurationError):
        inner.on("run.completed")(handle)
    with pytest.raises(ConfigurationError):
        inner.on("*")(handle)  # the catch-all meets every event
    inner.on("run.failed")(handle)  # never in the same delivery: no clash
    assert [h.event for h in receiver.handlers()] == ["run.failed", "run.completed"]


def test_handlers_made_by_one_factory_need_their_own_names() -> None:
    def make_handler(channel: str) -> Any:
        def send(event: Any) -> None: ...

        return send

    receiver = Receiver(secret=SECRET)
    receiver.on("run.completed")(make_handler("email"))
    with pytest.raises(ConfigurationError):
        receiver.on("run.completed")(make_handler("sms"))
    receiver.on("run.completed", name="send-sms")(make_handler("sms"))
    assert len({h.id for h in receiver.handlers()}) == 2


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(functools.partial(print, end=""), id="partial"),
        pytest.param(identity_app.Notifier(), id="callable-instance"),
    ],
)
def test_a_handler_without_a_stable_name_needs_name(handler: Any) -> None:
    receiver = Receiver(secret=SECRET)
    with pytest.raises(ConfigurationError, match="name=") as info:
        receiver.on("run.completed")(handler)
    assert "0x" not in str(info.value)  # no memory address, in the message either
    receiver.on("run.completed", name="stable")(handler)
    assert [h.id for h in receiver.handlers()] == ["stable"]


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, "caf\ud800", 5])
def test_bad_names_are_refused(name: Any) -> None:
    with pytest.raises(ConfigurationError):
        Router().on("run.completed", name=name)


def test_a_failed_handler_is_retried_and_a_succeeded_one_is_not(store: Store) -> None:
    calls: list[str] = []
    fail_b = [True]
    receiver = Receiver(secret=SECRET, store=store)
    receiver.include(router_with_a_handle(calls, "a", []))
    receiver.include(router_with_a_handle(calls, "b", fail_b))
    request = signed_request(make_event("run.completed", run_id="run_ids"), SECRET)
    assert receiver.handle(request.body, request.headers).status == 500
    assert calls == ["a", "b"]
    fail_b[0] = False
    assert receiver.handle(request.body, request.headers).status == 200
    assert calls == ["a", "b", "b"]  # b ran again, a did not
    assert receiver.handle(request.body, request.headers).status == 200  # a duplicate
    assert calls == ["a", "b", "b"]


def test_ids_are_the_same_in_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "records.sqlite3")
    here = [h.id for h in identity_app.build(path).handlers()]
    script = (
        "import json, sys; from tests.core import identity_app; "
        "print(json.dumps([h.id for h in identity_app.build(sys.argv[1]).handlers()]))"
    )
    there = subprocess.run(
        [sys.executable, "-c", script, path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(there.stdout) == here
    assert here == ["charge-eur", "charge-usd", "notify", "tests.core.identity_app.audit"]


def test_a_restart_does_not_run_a_succeeded_handler_again(tmp_path: Path) -> None:
    # Two processes over one SQLite file: the first delivery fails in "notify" after both
    # charges succeeded; the retry, in a new process, must run "notify" only.
    store_path, body_path = tmp_path / "records.sqlite3", tmp_path / "body.json"
    event = make_event("run.completed", run_id="run_restart")
    body_path.write_bytes(signed_request(event, identity_app.SECRET).body)

    def deliver(fail: bool) -> dict[str, Any]:
        env = {**os.environ, "FAIL_NOTIFY": "1" if fail else "0"}
        done = subprocess.run(
            [sys.executable, "-m", "tests.core.identity_app", str(store_path), str(body_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return result

    first = deliver(fail=True)
    assert first["status"] == 500
    assert first["ran"] == ["charge:EUR", "charge:USD", "notify"]
    second = deliver(fail=False)
    assert second["status"] == 200
    assert second["ran"] == ["notify", "audit"]
