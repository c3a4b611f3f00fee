"""Fixtures of the deferred-handler tests: a real redis-server as Celery's broker, the
app's directory, and the receiver the test process (the "web process") delivers through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

require("celery")

from tests.deferred.celery_app import build  # noqa: E402  (needs celery, checked above)
from tests.stores.redis_server import redis_server, redis_url  # noqa: E402

__all__ = ["redis_server", "redis_url"]


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """What a worker process needs to build the same app as the test."""
    return {"FLYMY_TEST_DIR": str(tmp_path), "FLYMY_TEST_BROKER": redis_url}


@pytest.fixture
def web(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    """The test process's receiver, on the same store and broker as the workers."""
    app, receiver = build(tmp_path, redis_url)
    yield receiver
    app.close()
