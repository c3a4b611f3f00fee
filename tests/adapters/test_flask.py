"""The adapter contract through Flask's test client."""

from __future__ import annotations

import pytest

from flymy_receiver import Receiver
from tests.conftest import require
from tests.contract import Headers, ReceiverContract, Reply, Tripwire, wsgi_environ


@pytest.fixture(autouse=True)
def _flask() -> None:
    require("flask")


def open_app(receiver: Receiver, method: str, environ: dict[str, object], body: bytes) -> Reply:
    import flask

    from flymy_receiver.flask import blueprint

    app = flask.Flask(__name__)
    app.testing = True  # an exception in the view fails the test instead of becoming a 500
    app.register_blueprint(blueprint(receiver, url="/webhooks/flymy"))
    # Headers go in as environ keys, as a WSGI server passes them: werkzeug's client would
    # refuse a CR in a header value, which a server strips or passes through as given.
    response = app.test_client().open(
        "/webhooks/flymy", method=method, data=body, environ_overrides=environ
    )
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Reply(response.status_code, response.get_data(), headers)


class TestFlask(ReceiverContract):
    def deliver(self, receiver: Receiver, body: bytes, headers: Headers, method: str) -> Reply:
        return open_app(receiver, method, wsgi_environ(headers), body)

    def deliver_stream(self, receiver: Receiver, body: Tripwire, headers: Headers) -> Reply:
        # gunicorn de-chunks a body and marks the stream as terminated by the server.
        environ = {"CONTENT_LENGTH": "", **wsgi_environ(headers)}
        environ.update({"wsgi.input": body, "wsgi.input_terminated": True})
        return open_app(receiver, "POST", environ, b"")
