"""``send`` to a wrong address says what is likely wrong: path, trailing slash, APPEND_SLASH."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flymy_receiver.cli import main

#: path -> (status, extra headers, body) the fake server answers a POST with.
ANSWERS: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/missing": (404, {}, b"<h1>Not Found</h1>"),
    "/webhooks/flymy": (301, {"Location": "/webhooks/flymy/"}, b""),
    "/moved": (308, {"Location": "https://example.test/moved"}, b""),
    "/temporary": (307, {"Location": "/webhooks/flymy/"}, b""),
    "/get-only": (405, {}, b"Method Not Allowed"),
    "/django-debug": (500, {}, b"<title>RuntimeError at /django-debug</title>"),
    "/handler-failed": (500, {}, b'{"error":"Handler failed"}'),
    "/not-found-json": (404, {}, b'{"error":"no such thing"}'),
}


class _Answer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, headers, body = ANSWERS[self.path]
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("/missing", "nothing answers at /missing: check the path"),
        ("/webhooks/flymy", "301 to /webhooks/flymy/: the URL likely needs its trailing slash"),
        ("/temporary", "APPEND_SLASH"),
        ("/moved", "308 to https://example.test/moved: the server redirects"),
        ("/get-only", "/get-only does not take POST"),
        ("/django-debug", "RuntimeError about APPEND_SLASH"),
    ],
)
def test_a_wrong_address_gets_a_hint(
    port: int, path: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["send", f"http://127.0.0.1:{port}{path}", "--secret", "s", "--count", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert hint in err
    assert err.count("hint:") == 1  # once, not once per event


@pytest.mark.parametrize("path", ["/handler-failed", "/not-found-json"])
def test_the_receivers_own_answers_get_no_path_hint(
    port: int, path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", f"http://127.0.0.1:{port}{path}", "--secret", "s"]) == 1
    assert "hint:" not in capsys.readouterr().err
