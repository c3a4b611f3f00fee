"""An inspector over a real receiver and a memory store, reached through Starlette's client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import SECRET, require

require("starlette")
require("jinja2")

from starlette.testclient import TestClient  # noqa: E402

from flymy_receiver import Receiver, RunCompleted  # noqa: E402
from flymy_receiver.inspector import inspector_app  # noqa: E402
from flymy_receiver.stores import MemoryStore  # noqa: E402
from flymy_receiver.testing import make_event, signed_request  # noqa: E402

ORIGIN = "http://127.0.0.1"


@dataclass
class Crm:
    """What the handlers talk to; ``down`` makes ``save_profile`` raise."""

    down: bool = False
    saved: list[str] = field(default_factory=list)


def app_receiver(crm: Crm) -> Receiver:
    receiver = Receiver(secret=SECRET, store=MemoryStore())

    @receiver.on("run.completed")
    def save_profile(event: RunCompleted) -> None:
        if crm.down:
            raise RuntimeError("the CRM refused the profile")
        crm.saved.append(str(event.data.run_id))

    return receiver


@pytest.fixture
def crm() -> Crm:
    return Crm()


@pytest.fixture
def receiver(crm: Crm) -> Receiver:
    return app_receiver(crm)


def deliver(receiver: Receiver, name: str = "run.completed", **fields: Any) -> Any:
    """One signed delivery straight to the receiver; returns the event."""
    event = make_event(name, **fields)
    request = signed_request(event, SECRET)
    receiver.handle(request.body, request.headers)
    return event


def client_for(app: Any, **kwargs: Any) -> TestClient:
    return TestClient(app, base_url=ORIGIN, **kwargs)


@pytest.fixture
def client(receiver: Receiver) -> Iterator[TestClient]:
    with client_for(inspector_app(receiver)) as test_client:
        yield test_client


def csrf_of(client: TestClient, path: str = "/") -> str:
    """The CSRF token a page embeds in its forms."""
    page = client.get(path)
    marker = 'name="csrf_token" value="'
    start = page.text.index(marker) + len(marker)
    return page.text[start : page.text.index('"', start)]


Post = Callable[..., Any]
