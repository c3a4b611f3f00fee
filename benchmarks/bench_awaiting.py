"""How soon ``wait_for`` wakes after a webhook is handled, per store.

One receiver waits; another receiver on its own store object (as another process would
have) handles the delivery in a thread. The figure is the time from the start of that
delivery to the waiter waking, beside the delivery's own time. Through SQLite it depends on
how long the waiter had waited before (the poller backs off), so it is measured after a
short and after a long wait.

    python -m benchmarks.bench_awaiting   # Redis and PostgreSQL rows need their servers
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flymy_receiver import Receiver
from flymy_receiver.stores import MemoryStore, RedisStore, SQLiteStore
from flymy_receiver.testing import make_event, signed_request
from tests.servers import free_port, serve

SECRET = "whsec-bench"


def _receiver(store: Any) -> Receiver:
    receiver = Receiver(SECRET, store=store)

    @receiver.on("run.completed")
    def handled(event: Any) -> None:
        pass

    return receiver


async def _one(waiting: Receiver, receiving: Receiver, idle: float) -> tuple[float, float]:
    """(wake after the delivery began, the delivery's own time), in seconds."""
    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    call = asyncio.ensure_future(waiting.wait_for(event.data.run_id, timeout=60))
    await asyncio.sleep(idle)
    times: dict[str, float] = {}

    def deliver() -> None:
        times["start"] = time.perf_counter()
        receiving.handle(request.body, request.headers)
        times["end"] = time.perf_counter()

    thread = threading.Thread(target=deliver)
    thread.start()
    await call
    woke = time.perf_counter()
    await asyncio.to_thread(thread.join)
    return woke - times["start"], times["end"] - times["start"]


def _measure(name: str, pair: Callable[[], tuple[Receiver, Receiver]], idle: float, n: int) -> None:
    waiting, receiving = pair()

    async def run() -> list[tuple[float, float]]:
        await _one(waiting, receiving, 0.2)  # warm: connections, the listener started
        return [await _one(waiting, receiving, idle) for _ in range(n)]

    samples = asyncio.run(run())
    wake = sorted(s[0] for s in samples)
    own = statistics.median(s[1] for s in samples)
    p95 = wake[min(len(wake) - 1, int(len(wake) * 0.95))]
    print(
        f"| {name} | {idle:g} s | {n} | {statistics.median(wake) * 1000:.1f} ms"
        f" | {p95 * 1000:.1f} ms | {wake[-1] * 1000:.1f} ms | {own * 1000:.2f} ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    print("| store | waited before | runs | median wake | p95 | max | the delivery itself |")
    print("|---|---|---|---|---|---|---|")
    memory = MemoryStore()
    _measure("memory (one receiver)", lambda: (_receiver(memory),) * 2, 0.01, int(200 * scale))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "deliveries.sqlite3")

        def sqlite_pair() -> tuple[Receiver, Receiver]:
            return _receiver(SQLiteStore(path)), _receiver(SQLiteStore(path))

        _measure("SQLite (polled)", sqlite_pair, 0.05, max(5, int(40 * scale)))
        _measure("SQLite (polled)", sqlite_pair, 3.0, max(3, int(8 * scale)))
    _postgres(scale)
    binary = shutil.which("redis-server")
    if binary is None:
        print("(no redis-server: Redis rows skipped)")
        return
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with serve(argv, port):
        url = f"redis://127.0.0.1:{port}/0"

        def redis_pair() -> tuple[Receiver, Receiver]:
            return _receiver(RedisStore(url)), _receiver(RedisStore(url))

        _measure("Redis (pub/sub)", redis_pair, 0.05, int(100 * scale))
        _measure("Redis (pub/sub)", redis_pair, 3.0, max(3, int(8 * scale)))


def _postgres(scale: float) -> None:
    try:
        from flymy_receiver.stores import PostgresStore
        from tests.postgres_server import postgres_bindir, running_postgres
    except ImportError:
        print("(no psycopg: PostgreSQL rows skipped)")
        return
    if postgres_bindir() is None:
        print("(no PostgreSQL: its rows skipped)")
        return
    with running_postgres() as server:
        url = server.create_database()

        def postgres_pair() -> tuple[Receiver, Receiver]:
            return _receiver(PostgresStore(url)), _receiver(PostgresStore(url))

        _measure("PostgreSQL (LISTEN/NOTIFY)", postgres_pair, 0.05, int(100 * scale))
        _measure("PostgreSQL (LISTEN/NOTIFY)", postgres_pair, 3.0, max(3, int(8 * scale)))


if __name__ == "__main__":
    main()
