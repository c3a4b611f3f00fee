"""A TCP proxy in front of the test PostgreSQL server that reads the server's side of the
protocol: it counts round trips and can play a server that stalls after a commit.

- ``round_trips``: the server's ``ReadyForQuery`` messages, one per answered exchange (a
  statement in autocommit, a ``BEGIN``, a ``COMMIT``, a whole pipeline): what a delivery
  waits for, the same count on any machine.
- ``stall_after(predicate)``: the first client message for which ``predicate(data,
  in_transaction)`` is true reaches the server, which runs (and commits) it; its answer
  and everything after on that connection is withheld, as if the server had stalled right
  after committing. The client's deadline then cuts the connection.

Clients must connect with ``sslmode=disable`` (see :attr:`url`), so the stream is plain.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

from tests.servers import free_port

Predicate = Callable[[bytes, bool], bool]


class PgProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.port = free_port()
        self.round_trips = 0
        self._lock = threading.Lock()
        self._stall: Predicate | None = None
        self._listener = socket.create_server((host, self.port))
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return (
            f"postgresql://{user}@127.0.0.1:{self.port}/{database}"
            "?sslmode=disable&gssencmode=disable"
        )

    def stall_after(self, predicate: Predicate) -> None:
        """Withhold the answers from the first message that matches (once)."""
        with self._lock:
            self._stall = predicate

    def reset(self) -> None:
        with self._lock:
            self.round_trips = 0

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(10)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            link = _Link()
            threading.Thread(target=self._up, args=(client, server, link), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, link), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, link: _Link) -> None:
        """Client to server: forwarded as is; the stall's trigger is looked for here."""
        for data in _chunks(client):
            with self._lock:
                predicate = self._stall
                if predicate is not None and predicate(data, link.in_transaction):
                    self._stall = None
                    link.withhold = True
            try:
                server.sendall(data)
            except OSError:
                break
        _shut(server)

    def _down(self, server: socket.socket, client: socket.socket, link: _Link) -> None:
        """Server to client: parsed into messages, to count ReadyForQuery ('Z')."""
        buffer = b""
        for data in _chunks(server):
            if link.withhold:
                continue  # the server answered; the client never hears it
            buffer += data
            while len(buffer) >= 5:
                length = int.from_bytes(buffer[1:5], "big")
                if len(buffer) < 1 + length:
                    break
                kind, body = buffer[:1], buffer[5 : 1 + length]
                buffer = buffer[1 + length :]
                if kind == b"Z":
                    link.in_transaction = body[:1] in (b"T", b"E")
                    with self._lock:
                        self.round_trips += 1
            try:
                client.sendall(data)
            except OSError:
                break
        _shut(client)


class _Link:
    def __init__(self) -> None:
        self.in_transaction = False
        self.withhold = False


def _chunks(sock: socket.socket) -> Iterator[bytes]:
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        yield data


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def pg_proxy(target_port: int) -> Iterator[PgProxy]:
    proxy = PgProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()
