"""A real ``redis-server`` on a free 127.0.0.1 port, for the store and delivery tests.

No persistence (``--save "" --appendonly no``): a killed server comes back empty, like a
cache node that was replaced. A missing binary fails the test in CI and skips it locally.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.servers import free_port, serve


def redis_binary() -> str:
    """The path of ``redis-server``; fail in CI, skip locally when it is missing."""
    path = shutil.which("redis-server")
    if path is None:
        if IN_CI:
            pytest.fail("redis-server is required in CI but is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    return path


#: A cluster node also listens on its port + 10000 (the cluster bus), so its port must be
#: 55535 or less; the kernel's free ports reach 60999.
_CLUSTER_BUS_OFFSET, _CLUSTER_PORT_MAX = 10_000, 55_535


def cluster_port() -> int:
    """A free port for a cluster node whose bus port (+10000) is free too (bounded tries)."""
    for _ in range(200):
        port = random.randint(20_000, _CLUSTER_PORT_MAX)
        with socket.socket() as node, socket.socket() as bus:
            try:
                node.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + _CLUSTER_BUS_OFFSET))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a Redis cluster node")


class RedisServer:
    """One redis-server process that can be killed and started again on the same port."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = redis_binary()
        self.extra_args = list(extra_args)
        cluster = "--cluster-enabled" in self.extra_args
        self.port = port or (cluster_port() if cluster else free_port())
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._running: contextlib.ExitStack | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", *self.extra_args]
        stack = contextlib.ExitStack()
        self.proc = stack.enter_context(serve(argv, self.port, timeout=15))
        self._running = stack

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.stop()

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()  # tests.servers.stop: by PID, then its process group
        self._running, self.proc = None, None

    def client(self, **kwargs: Any) -> Any:
        """A plain redis-py client, to look at what the store wrote."""
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, **kwargs)


@contextlib.contextmanager
def running_redis(*extra_args: str) -> Iterator[RedisServer]:
    """A started server (``extra_args`` for redis-server), stopped by PID when the block
    ends."""
    server = RedisServer(extra_args=extra_args)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the whole session; tests keep apart by using fresh keys."""
    with running_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's server, emptied before the test."""
    client = redis_server.client()
    client.flushdb()
    client.close()
    return redis_server.url
