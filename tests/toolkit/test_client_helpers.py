"""post_flask / post_starlette / post_django through each framework's own test client."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.testing import (
    make_event,
    post_django,
    post_flask,
    post_starlette,
    tampered_request,
)
from tests.conftest import SECRET, require


def _receiver() -> tuple[Receiver, list[str]]:
    receiver = Receiver(secret=SECRET)
    runs: list[str] = []

    @receiver.on("run.completed")
    def completed(event: RunCompleted) -> None:
        runs.append(event.data.run_id)

    return receiver, runs


def _check(post: Any, client: Any, status_of: Any, runs: list[str], path: str) -> None:
    event = make_event("run.completed")
    first = post(client, event, SECRET, path=path)
    assert status_of(first) == 200
    assert runs == [event.data.run_id]
    # A duplicate is acknowledged without running the handler again.
    assert status_of(post(client, event, SECRET, path=path)) == 200
    assert runs == [event.data.run_id]
    # A prepared (here: tampered) request is posted as it is.
    assert status_of(post(client, tampered_request(make_event(), SECRET), path=path)) == 401
    # Extra headers reach the receiver: a gzip encoding is refused.
    gzip = post(client, make_event(), SECRET, path=path, headers={"Content-Encoding": "gzip"})
    assert status_of(gzip) == 415
    assert len(runs) == 1


def test_post_flask() -> None:
    require("flask")
    import flask

    from flymy_receiver.flask import blueprint

    receiver, runs = _receiver()
    app = flask.Flask(__name__)
    app.register_blueprint(blueprint(receiver, url="/hooks/flymy"))
    _check(post_flask, app.test_client(), lambda r: r.status_code, runs, "/hooks/flymy")


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_post_starlette_and_fastapi(framework: str) -> None:
    require(framework)
    require("httpx")
    from starlette.testclient import TestClient

    from flymy_receiver.starlette import route

    receiver, runs = _receiver()
    if framework == "fastapi":
        from fastapi import FastAPI

        app: Any = FastAPI(routes=[route(receiver, "/webhooks/flymy")])
    else:
        from starlette.applications import Starlette

        app = Starlette(routes=[route(receiver, "/webhooks/flymy")])
    with TestClient(app) as client:
        _check(post_starlette, client, lambda r: r.status_code, runs, "/webhooks/flymy")


def test_post_django() -> None:
    require("django")
    from django.test import Client, override_settings
    from django.urls import path

    from flymy_receiver.django import view

    receiver, runs = _receiver()

    class Urls:
        urlpatterns: ClassVar[list[Any]] = [path("webhooks/flymy", view(receiver))]

    with override_settings(ROOT_URLCONF=Urls):
        # enforce_csrf_checks: the helper must work with CSRF protection on, as in production.
        client = Client(enforce_csrf_checks=True)
        _check(post_django, client, lambda r: r.status_code, runs, "/webhooks/flymy")
