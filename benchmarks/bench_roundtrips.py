"""Store round trips per delivery, counted through a latency-injecting proxy.

A durable delivery's cost is its round trips to the store. Redis and PostgreSQL are reached
through :class:`benchmarks.latency_proxy.LatencyProxy`, which delays every message by a fixed
time in each direction; two figures per case, which should agree:

- ``bursts``: request bursts the proxy saw per delivery (a pipeline or a script call is one);
- ``by time``: ``(time per delivery with the delay - without) / (2 * delay)``.

SQLite has no network: its figure is the commits per delivery (``COMMIT`` statements and
writes outside a transaction, counted with ``sqlite3``'s trace callback).

Each case is ``Receiver.handle`` with 1 and with 2 no-op handlers, every event distinct, after
one warm-up delivery (connections made, scripts loaded, tables created).

    python -m benchmarks.bench_roundtrips                  # every store
    python -m benchmarks.bench_roundtrips --only redis     # one store (redis, postgres, sqlite)
    python -m benchmarks.bench_roundtrips --delay 0.01 --deliveries 30

Redis and PostgreSQL are throwaway servers started here (``redis-server``; ``initdb`` and
``postgres`` through ``tests/postgres_server.py``), stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.latency_proxy import LatencyProxy
from flymy_receiver import Receiver
from flymy_receiver.stores import Store
from flymy_receiver.testing import make_event, signed_request

SECRET = "whsec-roundtrips"


@dataclass
class Figure:
    store: str
    handlers: int
    bursts: float | None
    by_time: float | None
    note: str = ""


def _receiver(store: Store, handlers: int) -> Receiver:
    receiver = Receiver(SECRET, store=store)
    for i in range(handlers):
        # Distinct functions: a handler's id is its qualified name.
        def handler(event: Any, _i: int = i) -> None:
            pass

        handler.__qualname__ = f"handler_{i}"
        receiver.on("run.completed")(handler)
    return receiver


def _deliveries(count: int) -> list[Any]:
    tag = uuid.uuid4().hex[:8]
    return [
        signed_request(make_event("run.completed", run_id=f"run_{tag}_{i}"), SECRET)
        for i in range(count)
    ]


def _deliver_all(receiver: Receiver, requests: list[Any]) -> float:
    """Seconds per delivery."""
    start = time.perf_counter()
    for req in requests:
        response = receiver.handle(req.body, req.headers)
        if response.status != 200 or b"duplicate" in response.body:
            raise RuntimeError(f"handle answered {response.status} {response.body!r}")
    return (time.perf_counter() - start) / len(requests)


def _through_proxy(
    name: str,
    make_store: Callable[[int], Store],
    target_port: int,
    delay: float,
    deliveries: int,
) -> list[Figure]:
    figures = []
    for handlers in (1, 2):
        with LatencyProxy("127.0.0.1", target_port) as proxy:
            store = make_store(proxy.port)
            receiver = _receiver(store, handlers)
            _deliver_all(receiver, _deliveries(1))  # warm up
            # Without delay, then with: interleaved rounds, the median of each.
            plain, delayed, bursts = [], [], []
            for _ in range(3):
                proxy.set_delay(0.0)
                plain.append(_deliver_all(receiver, _deliveries(deliveries)))
                proxy.set_delay(delay)
                proxy.reset()
                delayed.append(_deliver_all(receiver, _deliveries(deliveries)))
                bursts.append(proxy.bursts / deliveries)
            by_time = (statistics.median(delayed) - statistics.median(plain)) / (2 * delay)
            figures.append(Figure(name, handlers, statistics.median(bursts), by_time))
            with contextlib.suppress(Exception):
                close = getattr(store, "close", None)
                if callable(close):
                    close()
                client = getattr(store, "client", None)
                if client is not None:
                    client.close()
    return figures


@contextlib.contextmanager
def _redis_server() -> Iterator[int]:
    from tests.stores.redis_server import running_redis

    with running_redis() as server:
        yield server.port


def bench_redis(delay: float, deliveries: int) -> list[Figure]:
    from flymy_receiver.stores import RedisStore

    with _redis_server() as port:
        return _through_proxy(
            "Redis",
            lambda proxy_port: RedisStore(f"redis://127.0.0.1:{proxy_port}/0"),
            port,
            delay,
            deliveries,
        )


def bench_postgres(delay: float, deliveries: int) -> list[Figure]:
    from flymy_receiver.stores import PostgresStore
    from tests.postgres_server import running_postgres

    with running_postgres() as server:

        def make(proxy_port: int) -> Store:
            url = server.url.replace(f":{server.port}/", f":{proxy_port}/")
            return PostgresStore(url, schema=f"b_{uuid.uuid4().hex[:12]}")

        return _through_proxy("PostgreSQL", make, server.port, delay, deliveries)


def bench_sqlite(deliveries: int) -> list[Figure]:
    from flymy_receiver.stores import SQLiteStore

    figures = []
    with tempfile.TemporaryDirectory() as directory:
        for handlers in (1, 2):
            store = SQLiteStore(Path(directory) / f"h{handlers}.sqlite3")
            receiver = _receiver(store, handlers)
            _deliver_all(receiver, _deliveries(1))  # warm up: the tables exist
            commits = 0
            in_transaction = False

            def trace(sql: str) -> None:
                nonlocal commits, in_transaction
                word = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
                if word == "BEGIN":
                    in_transaction = True
                elif word in ("COMMIT", "END"):
                    in_transaction = False
                    commits += 1
                elif word == "ROLLBACK":
                    in_transaction = False
                elif word in ("INSERT", "UPDATE", "DELETE", "REPLACE") and not in_transaction:
                    commits += 1  # autocommit: a write is its own transaction

            store._connection().set_trace_callback(trace)  # this thread's connection
            _deliver_all(receiver, _deliveries(deliveries))
            note = f"{commits / deliveries:g} commits"
            figures.append(Figure("SQLite", handlers, None, None, note))
            store.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.01, help="seconds per message")
    parser.add_argument("--deliveries", type=int, default=20, help="per round (3 rounds)")
    parser.add_argument("--only", choices=["redis", "postgres", "sqlite"], action="append")
    args = parser.parse_args()
    only = set(args.only or ["redis", "postgres", "sqlite"])
    figures: list[Figure] = []
    if "redis" in only:
        figures += bench_redis(args.delay, args.deliveries)
    if "postgres" in only:
        figures += bench_postgres(args.delay, args.deliveries)
    if "sqlite" in only:
        figures += bench_sqlite(args.deliveries)
    print(f"round trips per delivery (delay {args.delay * 1000:g} ms per message each way)")
    print(f"{'store':<12}{'handlers':>9}{'bursts':>9}{'by time':>9}  note")
    for f in figures:
        bursts = f"{f.bursts:.2f}" if f.bursts is not None else "-"
        by_time = f"{f.by_time:.2f}" if f.by_time is not None else "-"
        print(f"{f.store:<12}{f.handlers:>9}{bursts:>9}{by_time:>9}  {f.note}")


if __name__ == "__main__":
    main()
