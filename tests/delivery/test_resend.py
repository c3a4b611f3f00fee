"""Sending a stored delivery to another app: ``journal.resend`` signs it afresh and POSTs
it to a real local server; ``journal.curl`` gives a command that, run, is accepted by a
receiver; neither the secret nor a signature ever appears in a command or an error."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted, sign
from flymy_receiver.journal import Journal
from flymy_receiver.resend import ResendFailed
from flymy_receiver.signature import SECRET_ENV_VAR, SIGNATURE_HEADER
from flymy_receiver.stores import MemoryStore
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET

STAGING_SECRET = "whsec-staging-app-secret"


class Staging:
    """A real HTTP server running a receiver (another app), answering what it answers."""

    def __init__(self, status_override: int | None = None) -> None:
        self.receiver = Receiver(STAGING_SECRET, store=MemoryStore())
        self.got: list[str] = []
        self.receiver.on("run.completed")(lambda e: self.got.append(e.data.run_id))
        self.status_override = status_override
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                answer = outer.receiver.handle(body, list(self.headers.items()))
                status = outer.status_override or answer.status
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/flymy"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def staging() -> Iterator[Staging]:
    server = Staging()
    yield server
    server.close()


def _journaled(run_id: str, secret: str = STAGING_SECRET) -> Journal:
    """A production receiver whose journal holds ``run_id`` (signed with ``secret``)."""
    receiver = Receiver(secret, store=MemoryStore())
    receiver.on("run.completed")(lambda event: None)
    req = signed_request(make_event("run.completed", run_id=run_id), secret)
    assert receiver.handle(req.body, req.headers).status == 200
    assert receiver.journal is not None
    return receiver.journal


def test_resend_posts_the_stored_body_signed_afresh(staging: Staging) -> None:
    journal = _journaled("run_to_staging")
    assert journal.resend("run_to_staging", staging.url) == 200
    assert staging.got == ["run_to_staging"]
    assert journal.resend("run_to_staging", staging.url) == 200  # a duplicate there


def test_resend_returns_the_status_whatever_it_is(staging: Staging) -> None:
    journal = _journaled("run_other_secret", secret=SECRET)  # staging has another secret
    assert journal.resend("run_other_secret", staging.url) == 401
    staging.status_override = 500
    assert _journaled("run_500").resend("run_500", staging.url) == 500


def test_resend_to_an_unreachable_url_is_a_clear_error_without_the_secret() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    journal = _journaled("run_nowhere")
    with pytest.raises(ResendFailed) as caught:
        journal.resend("run_nowhere", f"http://user:hunter2@127.0.0.1:{port}/hook", timeout=5)
    message = str(caught.value)
    assert message.startswith(f"could not reach http://user:***@127.0.0.1:{port}/hook: ")
    assert "hunter2" not in message
    assert STAGING_SECRET not in message
    with pytest.raises(ValueError, match="not an http"):
        journal.resend("run_nowhere", "file:///etc/passwd")
    with pytest.raises(KeyError):
        journal.resend("run_unknown", "http://127.0.0.1:1/")


def test_copy_as_curl_gives_a_command_that_the_receiver_accepts(staging: Staging) -> None:
    if None in [shutil.which(tool) for tool in ("curl", "bash", "openssl")]:
        pytest.fail("curl, bash and openssl are needed to run the copied command")
    output = {"note": 'it\'s "quoted" $HOME `ls` \\ and ünïcode\nnewline'}
    receiver = Receiver(STAGING_SECRET, store=MemoryStore())
    receiver.on("run.completed")(lambda event: None)
    req = signed_request(
        make_event("run.completed", run_id="run_curl", output=output), STAGING_SECRET
    )
    assert receiver.handle(req.body, req.headers).status == 200
    assert receiver.journal is not None
    command = receiver.journal.curl("run_curl", staging.url)
    assert STAGING_SECRET not in command
    assert sign(req.body, STAGING_SECRET) not in command  # the command computes it
    assert SIGNATURE_HEADER in command
    env = {"PATH": os.environ["PATH"], SECRET_ENV_VAR: STAGING_SECRET}
    result = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"received":true}'
    assert staging.got == ["run_curl"]


def test_resend_and_curl_need_a_body() -> None:
    journal = _journaled("run_body")

    class NoBody:
        def __getattr__(self, name: str) -> Any:
            return getattr(journal.store, name)

        def journal_get(self, key: str) -> Any:
            import dataclasses

            entry = journal.store.journal_get(key)
            return dataclasses.replace(entry, body=None, body_dropped=True)

    dropped = Journal(NoBody(), journal.receiver)  # type: ignore[arg-type]
    with pytest.raises(LookupError, match="was dropped"):
        dropped.curl("run_body", "http://127.0.0.1:9/")


def test_the_handlers_of_the_resending_app_do_not_run() -> None:
    ran: list[str] = []
    receiver = Receiver(STAGING_SECRET, store=MemoryStore())

    @receiver.on("run.completed")
    def here(event: RunCompleted) -> None:
        ran.append(event.data.run_id)

    req = signed_request(make_event("run.completed", run_id="run_once"), STAGING_SECRET)
    receiver.handle(req.body, req.headers)
    staging = Staging()
    try:
        assert receiver.journal is not None
        assert receiver.journal.resend("run_once", staging.url) == 200
    finally:
        staging.close()
    assert ran == ["run_once"]  # resending runs nothing here
