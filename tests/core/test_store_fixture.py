"""``flymy_receiver_store``: an app's receiver, built at import time, gets a fresh store for
each test, so two tests posting the same run id do not see each other's records."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

APP = """
from flymy_receiver import Receiver, RunCompleted

receiver = Receiver()  # built at import, as apps do: one default store for the process
handled = []

@receiver.on("run.completed")
def save(event: RunCompleted) -> None:
    handled.append(event.data.run_id)
"""

USER_TESTS = """
import pytest
import app

@pytest.fixture(autouse=%(autouse)s)
def fresh_store(flymy_receiver_store):
    flymy_receiver_store(app.receiver)

def _post(flymy_event, flymy_signed):
    req = flymy_signed(flymy_event("run.completed", run_id="run_1"))
    return app.receiver.handle(req.body, req.headers)

def test_first_posts_run_1(flymy_event, flymy_signed):
    response = _post(flymy_event, flymy_signed)
    assert response.body == b'{"received":true}'
    assert app.receiver.journal.get("run_1").state == "handled"

def test_second_posts_run_1_too(flymy_event, flymy_signed):
    response = _post(flymy_event, flymy_signed)
    assert response.body == b'{"received":true}'  # handled again, not a duplicate
    assert len(app.receiver.journal.list()) == 1
"""


def test_two_tests_posting_the_same_run_do_not_interfere(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app=APP, test_user=USER_TESTS % {"autouse": True})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_without_the_fixture_they_do(pytester: pytest.Pytester) -> None:
    # The same tests without a fresh store: the second sees the first one's record. This
    # is what the fixture is for (and checks that the test above could fail).
    pytester.makepyfile(app=APP, test_user=USER_TESTS % {"autouse": False})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)


def test_the_receivers_own_store_is_put_back(flymy_receiver_store: object) -> None:
    from flymy_receiver import Receiver
    from flymy_receiver.stores import MemoryStore

    original = MemoryStore()
    receiver = Receiver("whsec-fixture", store=original)
    fresh = flymy_receiver_store(receiver)  # type: ignore[operator]
    assert receiver.store is fresh is not original
    assert receiver.journal is not None
    assert receiver.journal.store is fresh
    assert receiver.waiters.store is fresh
