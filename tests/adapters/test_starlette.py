"""The adapter contract through Starlette's and FastAPI's TestClient.

Streamed bodies go through a raw ASGI call: the TestClient reads the whole body before the
app runs, which would hide whether the adapter stops reading at the limit.
"""

from __future__ import annotations

from typing import Any

import pytest

from flymy_receiver import Receiver
from tests.conftest import require
from tests.contract import Headers, ReceiverContract, Reply, Tripwire, call_asgi

URL = "/webhooks/flymy"


class TestStarlette(ReceiverContract):
    @pytest.fixture(autouse=True)
    def _framework(self) -> None:
        require("starlette")
        require("httpx")

    def app(self, receiver: Receiver) -> Any:
        from starlette.applications import Starlette

        from flymy_receiver.starlette import route

        return Starlette(routes=[route(receiver, URL)])

    def deliver(self, receiver: Receiver, body: bytes, headers: Headers, method: str) -> Reply:
        from starlette.testclient import TestClient

        # latin-1 bytes: httpx would refuse a non-ASCII str, an HTTP server passes the bytes.
        raw = [(name, value.encode("latin-1")) for name, value in headers]
        with TestClient(self.app(receiver)) as client:
            response = client.request(method, URL, content=body, headers=raw)
        names = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status_code, response.content, names)

    def deliver_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        return call_asgi(self.app(receiver), "POST", URL, headers, body)


class TestFastAPI(TestStarlette):
    @pytest.fixture(autouse=True)
    def _fastapi(self) -> None:
        require("fastapi")

    def app(self, receiver: Receiver) -> Any:
        from fastapi import FastAPI

        from flymy_receiver.starlette import route

        app = FastAPI()
        app.router.routes.append(route(receiver, URL))
        return app
