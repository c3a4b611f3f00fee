"""A body the stores could not record is refused before any store sees it, with every store.

Before: a lone surrogate escape in a body that also held a run of 19 digits went to a
fallback parser that accepted it; the memory store then answered 200 with a string nothing
can encode, and SQLite and Redis 503 forever (the key cannot be encoded).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.signature import SIGNATURE_HEADER, sign
from flymy_receiver.testing import make_event
from tests.stores.backends import BACKENDS, Backend, make_backend

SECRET = "whsec-strict-bodies"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from make_backend(request.param, request, tmp_path)


def body_with(run_id: str, text: str) -> bytes:
    payload = make_event("run.completed", run_id="@id", output={"url": "@text"})
    raw = json.dumps(payload.model_dump(mode="json"))
    return raw.replace('"@id"', run_id).replace('"@text"', text).encode()


@pytest.mark.parametrize(
    ("run_id", "text"),
    [
        pytest.param(
            '"run_\\ud83d"', '"https://x.example/status/1234567890123456789"', id="run-id"
        ),
        pytest.param(
            '"run_ok"', '"https://x.example/status/1234567890123456789 \\ud83d"', id="output"
        ),
        pytest.param('"run_\\udc00"', "12345678901234567890123", id="next-to-a-big-int"),
    ],
)
def test_a_lone_surrogate_is_a_400_with_every_store(
    backend: Backend, run_id: str, text: str
) -> None:
    receiver = Receiver(secret=SECRET, store=backend.store)
    calls: list[Any] = []
    receiver.on("run.completed")(calls.append)
    body = body_with(run_id, text)
    for _ in range(2):  # and the retry is the same 400, never a 503
        response = receiver.handle(body, {SIGNATURE_HEADER: sign(body, SECRET)})
        assert response.status == 400, response.body
    assert calls == []
    # The same body without the surrogate is delivered and recorded by this store.
    clean = body_with('"run_clean"', text.replace(" \\ud83d", ""))
    assert receiver.handle(clean, {SIGNATURE_HEADER: sign(clean, SECRET)}).status == 200
    assert len(calls) == 1
