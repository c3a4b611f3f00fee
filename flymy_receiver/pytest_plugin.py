"""pytest fixtures for testing FlyMy.AI webhook handlers (loaded through ``pytest11``).

When pytest starts with no ``FLYMY_WEBHOOK_SECRET`` set, the plugin sets it to
:data:`TEST_SECRET` for the session, so an app that builds ``Receiver()`` at import time can
be imported by a test module (``from app import app`` at the top) with no setup.
``flymy_secret`` is that secret (whatever ``FLYMY_WEBHOOK_SECRET`` holds, yours if you set
it); ``flymy_event`` is :func:`~flymy_receiver.testing.make_event`; ``flymy_signed`` signs an
event with ``flymy_secret``; ``flymy_receiver_store`` gives a receiver a fresh in-memory
store for one test, so that tests posting the same run id do not see each other's records.
Imports no web framework, and nothing until a fixture is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .signature import SECRET_ENV_VAR as _SECRET_ENV_VAR

if TYPE_CHECKING:
    from .receiver import Receiver
    from .stores.base import Store

__all__ = ["TEST_SECRET", "flymy_event", "flymy_receiver_store", "flymy_secret", "flymy_signed"]

#: The secret tests use when ``FLYMY_WEBHOOK_SECRET`` is not set.
TEST_SECRET = "whsec-flymy-receiver-tests"  # noqa: S105 - a test value, not a real secret
_SET_BY_PLUGIN = "_flymy_receiver_set_secret"


def pytest_configure(config: pytest.Config) -> None:
    """Export :data:`TEST_SECRET` for the session unless a secret is already set.

    Runs after the environment and the top ``conftest.py`` files are read, so a secret
    set there (``os.environ["FLYMY_WEBHOOK_SECRET"] = ...``) wins.
    """
    if not os.environ.get(_SECRET_ENV_VAR):
        os.environ[_SECRET_ENV_VAR] = TEST_SECRET
        setattr(config, _SET_BY_PLUGIN, True)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Take back the secret the plugin set (an in-process pytest run must not leak it)."""
    if getattr(config, _SET_BY_PLUGIN, False):
        os.environ.pop(_SECRET_ENV_VAR, None)


@pytest.fixture
def flymy_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """The webhook secret for this test: ``FLYMY_WEBHOOK_SECRET`` (the plugin's
    :data:`TEST_SECRET` unless you set one), exported for the test."""
    secret = os.environ.get(_SECRET_ENV_VAR) or TEST_SECRET
    monkeypatch.setenv(_SECRET_ENV_VAR, secret)  # back, if an earlier test removed it
    return secret


@pytest.fixture
def flymy_event() -> Callable[..., Any]:
    """Factory: ``flymy_event("run.completed", output={...})`` -> a typed event."""
    from .testing import make_event

    return make_event


@pytest.fixture
def flymy_signed(flymy_secret: str) -> Callable[..., Any]:
    """Factory: ``flymy_signed(event, headers=None)`` -> a ``SignedRequest`` signed with
    ``flymy_secret`` (pass ``secret=`` to sign with another one)."""
    from .testing import SignedRequest, signed_request

    def build(
        event: Any, *, secret: str | bytes | None = None, headers: dict[str, str] | None = None
    ) -> SignedRequest:
        return signed_request(event, secret or flymy_secret, headers=headers)

    return build


@pytest.fixture
def flymy_receiver_store() -> Iterator[Callable[..., Any]]:
    """Factory: ``flymy_receiver_store(receiver)`` gives ``receiver`` (your app's, built at
    import time) a fresh :class:`~flymy_receiver.stores.MemoryStore` for this test, journal
    and waiters included, and returns it; the receiver's own store is put back after the
    test. Pass ``store=`` to use another one. Use it in an autouse fixture::

        @pytest.fixture(autouse=True)
        def fresh_store(flymy_receiver_store):
            flymy_receiver_store(app.receiver)
    """
    from .stores.memory import MemoryStore

    swapped: list[tuple[Receiver, Store]] = []

    def fresh(receiver: Receiver, store: Store | None = None) -> Store:
        new = store if store is not None else MemoryStore()
        swapped.append((receiver, receiver.store))
        receiver._use_store(new)
        return new

    yield fresh
    for receiver, original in reversed(swapped):
        receiver._use_store(original)
