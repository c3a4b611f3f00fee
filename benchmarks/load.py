"""A small, bounded HTTP/1.1 load generator for 127.0.0.1.

Requests are serialised up front (each with its own signed body), sent over raw sockets by a
few threads, and reused connections are dropped whenever the server closes them (gunicorn's
sync workers close after every response). The run stops after the given requests or at the
deadline, whichever comes first, and every answer must be a 200.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

from benchmarks.payloads import SIGNATURE_HEADER, Signed


def raw_request(path: str, signed: Signed) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{SIGNATURE_HEADER}: {signed.signature}\r\nContent-Length: {len(signed.body)}\r\n\r\n"
    )
    return head.encode("ascii") + signed.body


class _Connection:
    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def request(self, data: bytes) -> int:
        """Send one request and read its whole answer; return the status."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        self.sock.sendall(data)
        while b"\r\n\r\n" not in self.buffer:
            self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            rest += self._recv_more()
        self.buffer = rest[length:]
        if close:
            self.close()
        return status

    def _recv(self) -> None:
        self.buffer += self._recv_more()

    def _recv_more(self) -> bytes:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-answer")
        return chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_load(
    port: int, requests: Sequence[bytes], *, threads: int = 4, deadline: float = 30.0
) -> tuple[int, float, list[int]]:
    """Send ``requests`` (each once); return (answered, seconds, unexpected statuses)."""
    lock = threading.Lock()
    position = 0
    answered = 0
    unexpected: list[int] = []
    stop_at = time.monotonic() + deadline

    def worker() -> None:
        nonlocal position, answered
        connection = _Connection(port, timeout=deadline)
        try:
            while time.monotonic() < stop_at:
                with lock:
                    if position >= len(requests):
                        return
                    data = requests[position]
                    position += 1
                status = connection.request(data)
                with lock:
                    answered += 1
                    if status != 200:
                        unexpected.append(status)
        finally:
            connection.close()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(deadline + 5)
    return answered, time.perf_counter() - started, unexpected
