"""The pytest plugin, as a user meets it: fixtures in their own test file, no conftest."""

from __future__ import annotations

import os

import pytest

from flymy_receiver import SECRET_ENV_VAR

pytest_plugins = ["pytester"]

USER_TESTS = """
from flymy_receiver import Receiver, RunCompleted, RunFailed, UnknownEvent
from flymy_receiver.testing import SignedRequest

seen = []
receiver = None

def make_receiver():
    global receiver
    receiver = Receiver()  # reads FLYMY_WEBHOOK_SECRET, set by the flymy_secret fixture

    @receiver.on("run.completed", agent_name="Sales Lead Profiler")
    def profiled(event: RunCompleted) -> None:
        seen.append(event.data.output["score"])

    return receiver

def test_fixtures_sign_what_the_receiver_accepts(flymy_secret, flymy_event, flymy_signed):
    receiver = make_receiver()
    event = flymy_event("run.completed", output={"score": 3})
    assert isinstance(event, RunCompleted)
    req = flymy_signed(event)
    assert isinstance(req, SignedRequest)
    response = receiver.handle(req.body, req.headers)
    assert response.status == 200, response.body
    assert seen == [3]

def test_event_factory_builds_each_event(flymy_event):
    assert isinstance(flymy_event("run.failed"), RunFailed)
    assert isinstance(flymy_event("run.cancelled"), UnknownEvent)
    assert flymy_event(run_id="run_1").data.run_id == "run_1"

def test_signed_with_another_secret_is_refused(flymy_secret, flymy_event, flymy_signed):
    receiver = make_receiver()
    req = flymy_signed(flymy_event(), secret="not-" + flymy_secret)
    assert receiver.handle(req.body, req.headers).status == 401

def test_secret_is_exported_for_the_test_only(flymy_secret):
    import os
    assert os.environ["FLYMY_WEBHOOK_SECRET"] == flymy_secret
"""


def test_fixtures_work_in_a_users_test_file(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_user_can_override_the_secret_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
import pytest

@pytest.fixture
def flymy_secret():
    return "whsec-my-apps-own"
"""
    )
    pytester.makepyfile(
        test_override="""
from flymy_receiver import sign

def test_signed_with_the_override(flymy_signed, flymy_event):
    req = flymy_signed(flymy_event())
    assert req.headers["X-FlyMyAI-Signature"] == sign(req.body, "whsec-my-apps-own")
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_is_registered_and_imports_no_framework(pytester: pytest.Pytester) -> None:
    # The plugin loads at every pytest start of every user: it must import no web framework
    # (the core's own pydantic is fine), and the test kit only once a fixture is used.
    pytester.makepyfile(
        test_modules="""
import sys

def test_nothing_heavy_loaded(request):
    assert request.config.pluginmanager.has_plugin("flymy_receiver")
    heavy = {"flask", "starlette", "fastapi", "django", "flymy_receiver.testing"}
    assert not heavy & set(sys.modules), heavy & set(sys.modules)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


# An app as many are written: the receiver is built when the module is imported.
IMPORT_TIME_APP = """
from flymy_receiver import Receiver, RunCompleted

receiver = Receiver()  # FLYMY_WEBHOOK_SECRET, read at import
seen = []

@receiver.on("run.completed")
def profiled(event: RunCompleted) -> None:
    seen.append(event.data.run_id)
"""

IMPORT_TIME_TESTS = """
from app import receiver, seen  # at the top of the module: imported at collection

def test_signed_by_the_fixture_is_accepted(flymy_event, flymy_signed):
    req = flymy_signed(flymy_event("run.completed", run_id="run_1"))
    assert receiver.handle(req.body, req.headers).status == 200
    assert seen == ["run_1"]

def test_the_secret_fixture_is_the_one_the_app_read(flymy_secret, flymy_event):
    from flymy_receiver.testing import signed_request
    req = signed_request(flymy_event(), flymy_secret)
    assert receiver.handle(req.body, req.headers).status == 200
"""


def test_an_app_that_builds_its_receiver_at_import_needs_no_setup(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)  # a fresh shell: no secret anywhere
    pytester.makepyfile(app=IMPORT_TIME_APP, test_app=IMPORT_TIME_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_a_secret_set_by_the_user_is_the_one_everything_uses(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    pytester.makeconftest(f"import os\nos.environ[{SECRET_ENV_VAR!r}] = 'whsec-my-apps-own'\n")
    pytester.makepyfile(
        app=IMPORT_TIME_APP,
        test_app=IMPORT_TIME_TESTS
        + "\ndef test_secret(flymy_secret):\n    assert flymy_secret == 'whsec-my-apps-own'\n",
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_session_secret_is_taken_back_at_the_end(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV_VAR, raising=False)
    pytester.makepyfile(
        test_env=f"import os\n\ndef test_set():\n    assert os.environ[{SECRET_ENV_VAR!r}]\n"
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert SECRET_ENV_VAR not in os.environ
