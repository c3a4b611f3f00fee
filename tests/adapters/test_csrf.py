"""CSRF protection on the app does not stop webhooks: they carry a signature, not a token.

Each test also posts to an ordinary view of the same app and expects CSRF to refuse it, so a
200 on the webhook means the webhook is exempt, not that protection was off.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flymy_receiver import Receiver
from tests.conftest import require
from tests.contract import SECRET, event_body, signed

URL = "/webhooks/flymy"


def receiver_and_calls() -> tuple[Receiver, list[str]]:
    receiver = Receiver(secret=SECRET)
    calls: list[str] = []

    @receiver.on("run.completed")
    def completed(event: Any) -> None:
        calls.append(event.data.run_id)

    return receiver, calls


# -- Django -----------------------------------------------------------------------------------


def django_urls(webhook: Any) -> type:
    from django.http import HttpResponse
    from django.urls import path

    def form(request: Any) -> HttpResponse:
        return HttpResponse(b"form accepted")

    patterns = [path(URL.lstrip("/"), webhook), path("form", form)]
    return type("Urls", (), {"urlpatterns": patterns})


def test_django_view_with_csrf_middleware_enforced() -> None:
    require("django")
    from django.conf import settings
    from django.test import Client, override_settings

    from flymy_receiver.django import view

    assert "django.middleware.csrf.CsrfViewMiddleware" in settings.MIDDLEWARE
    receiver, calls = receiver_and_calls()
    body = event_body(run_id="run_csrf")
    headers = dict(signed(body))
    client = Client(enforce_csrf_checks=True)
    with override_settings(ROOT_URLCONF=django_urls(view(receiver))):
        assert client.post("/form", {"a": "1"}).status_code == 403
        response = client.post(URL, body, content_type="application/json", headers=headers)
    assert response.status_code == 200
    assert calls == ["run_csrf"]


def test_django_aview_with_csrf_middleware_enforced() -> None:
    require("django")
    from django.test import AsyncClient, override_settings

    from flymy_receiver.django import aview

    receiver, calls = receiver_and_calls()
    body = event_body(run_id="run_acsrf")
    headers = dict(signed(body))
    client = AsyncClient(enforce_csrf_checks=True)

    async def run() -> tuple[int, int]:
        refused = await client.post("/form", {"a": "1"})
        response = await client.post(URL, body, content_type="application/json", headers=headers)
        return refused.status_code, response.status_code

    with override_settings(ROOT_URLCONF=django_urls(aview(receiver))):
        assert asyncio.run(run()) == (403, 200)
    assert calls == ["run_acsrf"]


# -- Flask-WTF --------------------------------------------------------------------------------


@pytest.mark.parametrize("protect", ["before-blueprint", "after-blueprint", "init-app-later"])
def test_flask_wtf_csrf_protect(protect: str) -> None:
    require("flask")
    require("flask_wtf")
    import flask
    from flask_wtf.csrf import CSRFProtect

    from flymy_receiver.flask import blueprint

    receiver, calls = receiver_and_calls()
    app = flask.Flask(__name__)
    app.config["SECRET_KEY"] = "tests-only-not-secret"

    @app.post("/form")
    def form() -> str:
        return "form accepted"

    if protect == "before-blueprint":
        CSRFProtect(app)
        app.register_blueprint(blueprint(receiver, url=URL))
    elif protect == "after-blueprint":
        app.register_blueprint(blueprint(receiver, url=URL))
        CSRFProtect(app)
    else:
        csrf = CSRFProtect()
        app.register_blueprint(blueprint(receiver, url=URL))
        csrf.init_app(app)

    body = event_body(run_id=f"run_{protect}")
    client = app.test_client()
    assert client.post("/form", data={"a": "1"}).status_code == 400
    response = client.post(URL, data=body, headers=dict(signed(body)))
    assert response.status_code == 200, response.data
    assert response.get_json() == {"received": True}
    assert calls == [f"run_{protect}"]
