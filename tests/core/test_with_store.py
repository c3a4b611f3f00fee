"""``Receiver.with_store``: the same handlers, secrets and settings over another journaling
store (what the inspector needs with ``--app`` and ``--store``), and ``Receiver.sign``."""

from __future__ import annotations

from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted, sign
from flymy_receiver.stores import MemoryStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET


def test_with_store_journals_in_the_other_store_with_the_same_handlers() -> None:
    ran: list[str] = []
    app = Receiver(SECRET, store=MemoryStore(), on_failure=lambda entry: None)

    @app.on("run.completed")
    def save(event: RunCompleted) -> None:
        ran.append(event.data.run_id)

    other = MemoryStore()
    inspected = app.with_store(other)
    req = signed_request(make_event(run_id="run_over"), SECRET)
    assert inspected.handle(req.body, req.headers).status == 200
    assert ran == ["run_over"]
    assert inspected.journal is not None
    assert inspected.journal.store is other
    assert inspected.journal.get("run_over") is not None
    assert app.journal is not None
    assert app.journal.get("run_over") is None  # the app's own store is untouched
    assert app.store is not other
    assert inspected.waiters.store is other
    assert inspected.on_failure is app.on_failure


def test_with_store_refuses_a_store_without_a_journal() -> None:
    class Bare:
        blocking = False

        def claim(self, key: str, lease: float) -> Any: ...

    with pytest.raises(ValueError, match="keeps no delivery journal"):
        Receiver(SECRET).with_store(Bare())  # type: ignore[arg-type]


def test_sign_uses_the_first_secret() -> None:
    receiver = Receiver([SECRET, "whsec-older"])
    assert receiver.sign(b"{}") == sign(b"{}", SECRET)
