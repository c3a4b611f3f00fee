"""A TCP proxy on 127.0.0.1 that delays every message by a fixed time, to count round trips.

A store's cost per delivery is its round trips, not Python: put this proxy between the store
and its server and every message waits ``delay`` seconds in each direction, so one round trip
costs ``2 * delay`` more. Two ways to read the count, both independent of the machine:

- by time: ``(time with delay - time without) / (2 * delay)`` per delivery;
- directly: :attr:`LatencyProxy.bursts` counts the request bursts, i.e. each time a
  connection's client sends after having last received (or first sends). A pipeline or one
  script call is one burst however many bytes or commands it carries; a client that waits for
  an answer before sending again starts a new burst.

    with LatencyProxy("127.0.0.1", 6379, delay=0.005) as proxy:
        store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0")
        proxy.reset()
        ...  # one delivery
        print(proxy.bursts)

One thread runs every connection through ``selectors``; chunks are forwarded in order, each
``delay`` after it arrived (delays overlap: a burst of chunks costs one delay, not one per
chunk, as on a real network).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["LatencyProxy"]

_CHUNK = 256 * 1024


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client's socket, the server's, and who spoke last."""

    client: socket.socket
    server: socket.socket
    last_from_client: bool = False
    closed: bool = False
    pending: int = 0  # chunks scheduled and not yet sent
    half_closed: set[socket.socket] = field(default_factory=set)


class LatencyProxy:
    """Forwards 127.0.0.1:``port`` to ``host``:``target_port``, delaying each message."""

    def __init__(self, host: str, target_port: int, delay: float = 0.0) -> None:
        self.target = (host, target_port)
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        # (due, order, destination socket, data, pair): sent in due order, ties in arrival order.
        self._due: list[tuple[float, int, socket.socket, bytes, _Pair]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._bursts = 0
        self._stop = threading.Event()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="latency-proxy", daemon=True)

    # -- the public face ----------------------------------------------------------------

    @property
    def bursts(self) -> int:
        """Request bursts since the last :meth:`reset` (see the module docstring)."""
        with self._lock:
            return self._bursts

    def reset(self) -> None:
        with self._lock:
            self._bursts = 0

    def set_delay(self, delay: float) -> None:
        """Delay the messages that arrive from now on by ``delay`` seconds."""
        self.delay = delay

    def start(self) -> LatencyProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wakeup_w.send(b"x")
        self._thread.join(10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wakeup_w.close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            timeout = None
            if self._due:
                timeout = max(0.0, self._due[0][0] - time.monotonic())
            for key, _ in self._selector.select(timeout):
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                elif sock is self._wakeup_r:
                    self._wakeup_r.recv(64)
                else:
                    self._read(sock, key.data)  # type: ignore[arg-type]
            self._send_due()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        server = socket.create_connection(self.target, timeout=10)
        for sock in (client, server):
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, server)
        self._selector.register(client, selectors.EVENT_READ, pair)
        self._selector.register(server, selectors.EVENT_READ, pair)

    def _read(self, sock: socket.socket, pair: _Pair) -> None:
        try:
            data = sock.recv(_CHUNK)
        except OSError:
            data = b""
        from_client = sock is pair.client
        destination = pair.server if from_client else pair.client
        if not data:  # one side closed: close the other once what is pending was sent
            self._selector.unregister(sock)
            pair.half_closed.add(sock)
            self._schedule(destination, b"", pair)
            return
        if from_client and not pair.last_from_client:
            with self._lock:
                self._bursts += 1
        pair.last_from_client = from_client
        self._schedule(destination, data, pair)

    def _schedule(self, destination: socket.socket, data: bytes, pair: _Pair) -> None:
        pair.pending += 1
        due = time.monotonic() + self.delay
        heapq.heappush(self._due, (due, next(self._order), destination, data, pair))

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            _, _, destination, data, pair = heapq.heappop(self._due)
            pair.pending -= 1
            if pair.closed:
                continue
            if not data:
                self._close(pair)
                continue
            try:
                destination.sendall(data)
            except OSError:
                self._close(pair)

    def _close(self, pair: _Pair) -> None:
        pair.closed = True
        for sock in (pair.client, pair.server):
            if sock not in pair.half_closed:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
            sock.close()
