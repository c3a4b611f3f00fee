"""What the inspector looks at: an app's receiver over another store, and store URLs redacted."""

from __future__ import annotations

import pytest

from flymy_receiver import Receiver
from flymy_receiver.inspector import receiver_over
from flymy_receiver.stores import MemoryStore
from tests.inspector.conftest import Crm, app_receiver, deliver


def test_the_apps_receiver_over_another_store_replays_there() -> None:
    crm = Crm(down=True)
    app = app_receiver(crm)
    other = MemoryStore()
    inspected = receiver_over(app, other)
    deliver(inspected, run_id="run_elsewhere")
    assert app.journal is not None
    assert app.journal.get("run_elsewhere") is None
    assert inspected.journal is not None
    assert inspected.journal.get("run_elsewhere").state == "failed"  # type: ignore[union-attr]
    crm.down = False
    assert inspected.journal.replay("run_elsewhere").state == "handled"
    assert crm.saved == ["run_elsewhere"]
    assert inspected.store is other
    assert app.store is not other


def test_a_store_without_a_journal_is_refused() -> None:
    class Claims:  # the idempotency contract only
        blocking = False

    with pytest.raises(ValueError, match="keeps no delivery journal"):
        receiver_over(Receiver(secret="s"), Claims())  # type: ignore[arg-type]
