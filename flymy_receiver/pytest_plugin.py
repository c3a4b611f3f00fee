"""pytest fixtures for testing FlyMy.AI webhook handlers (loaded through ``pytest11``).

``flymy_secret`` is the secret tests sign with (also set as ``FLYMY_WEBHOOK_SECRET`` for the
test, so ``Receiver()`` picks it up); override the fixture to use your app's own.
``flymy_event`` is :func:`~flymy_receiver.testing.make_event`; ``flymy_signed`` signs an
event with ``flymy_secret``. Imports no web framework, and nothing until a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["flymy_event", "flymy_secret", "flymy_signed"]

#: The secret the fixtures sign with unless ``flymy_secret`` is overridden.
TEST_SECRET = "whsec-flymy-receiver-tests"  # noqa: S105 - a test value, not a real secret


@pytest.fixture
def flymy_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """The webhook secret for this test, also exported as ``FLYMY_WEBHOOK_SECRET``."""
    from .signature import SECRET_ENV_VAR

    monkeypatch.setenv(SECRET_ENV_VAR, TEST_SECRET)
    return TEST_SECRET


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
