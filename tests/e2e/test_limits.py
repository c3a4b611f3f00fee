"""Size and encoding limits through each real server, with hand-written HTTP.

The example apps run with ``FLYMY_MAX_BODY_SIZE`` = 64 KiB. A request that announces more is
sent with only its headers and a few bytes: an answer can only come back if the server did
not wait for the body. A chunked body over the limit is sent without its final chunk, so
the stream never ends: again, only a server that stops reading at the limit can answer.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket

import pytest

from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.e2e.conftest import MAX_BODY_SIZE, Server

pytestmark = pytest.mark.e2e

#: Bounds every wait: a server that waits for a body we never send fails the test here.
TIMEOUT = 20.0


def exchange(server: Server, head: dict[str, str], data: bytes) -> tuple[int, bytes]:
    """Send a request line, ``head`` and ``data`` as they are; return the status and body."""
    lines = ["POST /webhooks/flymy HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in head.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        try:
            body = response.read()
        except ConnectionResetError:  # closed on a body it did not read: the status counts
            body = b""
    assert SECRET.encode() not in body
    return response.status, body


def chunked(data: bytes, size: int = 8192, *, final: bool = True) -> bytes:
    """``data`` in chunked transfer coding; ``final=False`` leaves the stream open."""
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + (b"0\r\n\r\n" if final else b"")


def padded_event(size: int) -> tuple[str, bytes, dict[str, str]]:
    """A valid signed run.completed whose body is exactly ``size`` bytes."""
    event = make_event("run.completed")
    raw = event.model_dump(mode="json")
    base = len(signed_request(raw, SECRET).body)
    raw["data"]["output"]["background"] += "x" * (size - base)
    request = signed_request(raw, SECRET)
    assert len(request.body) == size
    return event.data.run_id, request.body, request.headers


def test_content_length_over_the_limit_is_413_before_the_body_is_sent(server: Server) -> None:
    head = {
        "Content-Type": "application/json",
        "X-FlyMyAI-Signature": "0" * 64,
        "Content-Length": str(100 * MAX_BODY_SIZE),
    }
    status, body = exchange(server, head, b'{"event": "run.completed"')
    assert status == 413
    assert json.loads(body) == {"error": "Payload too large"}


def test_a_chunked_body_over_the_limit_is_413_and_reading_stops(server: Server) -> None:
    head = {"Content-Type": "application/json", "X-FlyMyAI-Signature": "0" * 64}
    head["Transfer-Encoding"] = "chunked"
    status, body = exchange(server, head, chunked(b"x" * (MAX_BODY_SIZE + 16384), final=False))
    assert status == 413
    assert json.loads(body) == {"error": "Payload too large"}


def test_a_signed_chunked_delivery_is_handled(server: Server) -> None:
    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    head = {**request.headers, "Transfer-Encoding": "chunked"}
    assert exchange(server, head, chunked(request.body, 64))[0] == 200
    assert len(server.rows("leads", event.data.run_id)) == 1


def test_a_body_of_exactly_the_limit_is_handled(server: Server) -> None:
    run_id, body, headers = padded_event(MAX_BODY_SIZE)
    assert exchange(server, {**headers, "Content-Length": str(len(body))}, body)[0] == 200
    assert len(server.rows("leads", run_id)) == 1


@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_one_byte_over_the_limit_is_413_even_when_signed(server: Server, transfer: str) -> None:
    run_id, body, headers = padded_event(MAX_BODY_SIZE + 1)
    if transfer == "chunked":
        status, _ = exchange(server, {**headers, "Transfer-Encoding": "chunked"}, chunked(body))
    else:
        status, _ = exchange(server, {**headers, "Content-Length": str(len(body))}, body)
    assert status == 413
    assert server.rows("leads", run_id) == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP "])
def test_a_compressed_body_is_415(server: Server, encoding: str) -> None:
    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    data = gzip.compress(request.body)
    head = {**request.headers, "Content-Encoding": encoding, "Content-Length": str(len(data))}
    status, body = exchange(server, head, data)
    assert (status, json.loads(body)) == (415, {"error": "Unsupported content encoding"})
    assert server.rows("leads", event.data.run_id) == []


def test_identity_encoding_is_accepted(server: Server) -> None:
    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    head = {**request.headers, "Content-Encoding": "identity"}
    head["Content-Length"] = str(len(request.body))
    assert exchange(server, head, request.body)[0] == 200
    assert len(server.rows("leads", event.data.run_id)) == 1
