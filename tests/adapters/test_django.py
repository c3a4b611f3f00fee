"""The adapter contract through Django's test clients: ``view`` (sync) and ``aview`` (async)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from flymy_receiver import Receiver
from tests.conftest import require
from tests.contract import (
    Headers,
    ReceiverContract,
    Reply,
    Tripwire,
    event_body,
    signed,
    wsgi_environ,
)

URL = "/webhooks/flymy"


@pytest.fixture(autouse=True)
def _django() -> None:
    require("django")


def urlconf(view: Any) -> type:
    from django.urls import path

    return type("Urls", (), {"urlpatterns": [path(URL.lstrip("/"), view)]})


def as_reply(response: Any) -> Reply:
    names = {k.lower(): v for k, v in response.headers.items()}
    return Reply(response.status_code, response.content, names)


class DjangoContract(ReceiverContract):
    """Both views, plus what only Django has: its own upload limit."""

    def test_bigger_than_djangos_upload_limit_but_under_ours(self) -> None:
        # DATA_UPLOAD_MAX_MEMORY_SIZE guards request.body and request.POST, which the views
        # never touch: max_body_size is the one limit, and over it the answer is our 413.
        from django.test import override_settings

        body = event_body(output={"text": "z" * 8192})
        with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024):
            receiver, seen = self.build(max_body_size=len(body))
            assert self.send(receiver, body, signed(body)).status == 200
            assert len(seen.completed) == 1
            receiver, seen = self.build(max_body_size=len(body) - 1)
            reply = self.send(receiver, body, signed(body))
            self.refused(reply, seen, 413)
            assert reply.json() == {"error": "Payload too large"}


class TestDjangoView(DjangoContract):
    def send_wsgi(
        self, receiver: Receiver, environ: dict[str, Any], body: bytes, method: str
    ) -> Reply:
        from django.test import Client, override_settings

        from flymy_receiver.django import view

        content_type = environ.get("CONTENT_TYPE", "")
        with override_settings(ROOT_URLCONF=urlconf(view(receiver))):
            response = Client().generic(method, URL, body, content_type=content_type, **environ)
        return as_reply(response)

    def deliver(self, receiver: Receiver, body: bytes, headers: Headers, method: str) -> Reply:
        return self.send_wsgi(receiver, wsgi_environ(headers), body, method)

    def deliver_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        # As gunicorn passes a chunked body: no CONTENT_LENGTH, stream ended by the server.
        environ = {"CONTENT_LENGTH": "", **wsgi_environ(headers)}
        environ.update({"wsgi.input": body, "wsgi.input_terminated": True})
        return self.send_wsgi(receiver, environ, b"", "POST")


class TestDjangoAview(DjangoContract):
    def send_asgi(self, receiver: Receiver, headers: Headers, body_file: Any, method: str) -> Reply:
        from django.test import AsyncClient, override_settings

        from flymy_receiver.django import aview

        # A raw scope keeps repeated header lines apart, as an ASGI server does; Django then
        # joins them with a comma. Values are latin-1 bytes, as a server passes them.
        scope = {
            "method": method,
            "path": URL,
            "server": ("127.0.0.1", "80"),
            "scheme": "http",
            "query_string": "",
            "headers": [(b"host", b"testserver")]
            + [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers],
            "_body_file": body_file,
        }
        with override_settings(ROOT_URLCONF=urlconf(aview(receiver))):
            response = asyncio.run(AsyncClient().request(**scope))
        return as_reply(response)

    def deliver(self, receiver: Receiver, body: bytes, headers: Headers, method: str) -> Reply:
        from django.test.client import FakePayload

        if not any(name.lower() == "content-length" for name, _ in headers):
            headers = [*headers, ("Content-Length", str(len(body)))]
        return self.send_asgi(receiver, headers, FakePayload(body), method)

    def deliver_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        return self.send_asgi(receiver, headers, body, "POST")


@pytest.mark.parametrize("make_view", ["view", "aview"])
def test_a_refusal_is_logged_once_not_again_by_django_request(
    make_view: str, caplog: pytest.LogCaptureFixture
) -> None:
    from django.test import AsyncClient, Client, override_settings

    from flymy_receiver import django as adapter

    receiver = Receiver(secret="whsec-once")
    body = event_body()
    headers = {"X-FlyMyAI-Signature": "0" * 64}
    caplog.set_level(logging.INFO)
    with override_settings(ROOT_URLCONF=urlconf(getattr(adapter, make_view)(receiver))):
        if make_view == "view":
            response = Client().post(URL, body, content_type="application/json", headers=headers)
        else:
            response = asyncio.run(
                AsyncClient().post(URL, body, content_type="application/json", headers=headers)
            )
    assert response.status_code == 401
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == ["flymy_receiver"]
