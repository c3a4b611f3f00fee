"""Deferred handlers: what the sender waits for, what the web process sustains, how long a
job waits for its worker.

Real processes on 127.0.0.1: a redis-server as Celery's broker, the Flask app of
``benchmarks/apps/deferred_app.py`` on gunicorn, a ``celery worker`` for the queue lag.

1. Time to the sender's answer with a handler that takes 2 s, inline against deferred
   (p50/p99; gunicorn with threads, so that slow requests do not queue behind each other).
2. Deliveries per second acknowledged: one deferred handler against one inline no-op handler
   (gunicorn, one sync worker, alternating rounds; target ≥ 0.8).
3. Queue lag: from sending the delivery to the deferred handler's start on an idle worker.

    python -m benchmarks.bench_deferred            # about two minutes
    python -m benchmarks.bench_deferred --quick    # under a minute
    BENCH_STORE=postgresql://... python -m benchmarks.bench_deferred   # a PostgreSQL store
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from benchmarks.load import raw_request, run_load
from benchmarks.payloads import SIGNATURE_HEADER, Signed, distinct_bodies, small_output
from tests.servers import ROOT, free_port, gunicorn, serve

APP = "benchmarks.apps.deferred_app:app"


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def timed_posts(port: int, path: str, bodies: Sequence[Signed], threads: int) -> list[float]:
    """Seconds from sending each request to its whole answer (every answer a 200)."""

    def one(signed: Signed) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            started = time.perf_counter()
            conn.request(
                "POST",
                path,
                body=signed.body,
                headers={SIGNATURE_HEADER: signed.signature, "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"{path}: status {response.status}")
        return elapsed

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, bodies))


def answer_times(env: dict[str, str], inline: int, deferred: int) -> dict[str, list[float]]:
    port = free_port()
    argv = gunicorn(APP, port, workers=2)
    argv[-1:-1] = ["--threads", "4", "--log-level", "warning"]
    warm = 24  # every thread of both workers has published once, and run a slow handler
    bodies = distinct_bodies(small_output(), inline + deferred + 2 * warm)
    with serve(argv, port, env=env, cwd=ROOT):
        timed_posts(port, "/deferred-slow", bodies[:warm], 8)
        timed_posts(port, "/inline-slow", bodies[warm : 2 * warm], 8)
        rest = bodies[2 * warm :]
        # Four senders at a time: gunicorn's eight threads never make a request queue.
        return {
            "inline": timed_posts(port, "/inline-slow", rest[:inline], 4),
            "deferred": timed_posts(port, "/deferred-slow", rest[inline:], 4),
        }


def throughput(env: dict[str, str], rounds: int, per_round: int) -> dict[str, list[float]]:
    port = free_port()
    argv = gunicorn(APP, port, workers=1)
    argv[-1:-1] = ["--log-level", "warning"]
    signed = distinct_bodies(small_output(), (rounds + 1) * per_round * 2)
    batches = [signed[i : i + per_round] for i in range(0, len(signed), per_round)]
    samples: dict[str, list[float]] = {"/inline-noop": [], "/deferred": []}
    with serve(argv, port, env=env, cwd=ROOT):
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            paths = ["/inline-noop", "/deferred"] if r % 2 == 0 else ["/deferred", "/inline-noop"]
            for i, path in enumerate(paths):
                requests = [raw_request(path, s) for s in batches[2 * r + i]]
                answered, seconds, unexpected = run_load(port, requests, deadline=60)
                if unexpected or answered != len(requests):
                    raise RuntimeError(f"{path}: {answered} answered, {sorted(set(unexpected))}")
                if r:
                    samples[path].append(answered / seconds)
    return samples


def queue_lag(env: dict[str, str], directory: Path, count: int) -> list[float]:
    """Seconds from sending each delivery to its deferred handler's start (one idle worker,
    a delivery every 50 ms)."""
    from tests.deferred.workers import Worker, wait_until

    port = free_port()
    argv = gunicorn(APP, port, workers=1)
    argv[-1:-1] = ["--log-level", "warning"]
    worker = Worker(
        "bench", env, directory / "worker.log", module="benchmarks.apps.deferred_app:celery_app"
    )
    warm = 10  # the first jobs open the worker's store and broker connections: not counted
    bodies = distinct_bodies(small_output(), count + warm)
    sent: dict[str, float] = {}
    with serve(argv, port, env=env, cwd=ROOT):
        worker.start()
        try:
            timed_posts(port, "/deferred", bodies[:warm], 1)
            for signed in bodies[warm:]:
                run_id = orjson.loads(signed.body)["data"]["run_id"]
                sent[run_id] = time.time()
                timed_posts(port, "/deferred", [signed], 1)
                time.sleep(0.05)
            wait_until(
                lambda: len(_started(directory)) >= count + warm, timeout=120, what="the jobs"
            )
        finally:
            worker.stop()
    started = _started(directory)
    return [started[run_id] - at for run_id, at in sent.items() if run_id in started]


def _started(directory: Path) -> dict[str, float]:
    path = directory / "started.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(path, timeout=30)
    try:
        return {str(r): float(a) for r, a in db.execute("SELECT run_id, at FROM started")}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument(
        "--store", choices=("sqlite", "postgres"), default="sqlite", help="the journal's store"
    )
    args = parser.parse_args()
    from tests.stores.redis_server import RedisServer

    inline, deferred, rounds, per_round, lag = (
        (16, 100, 3, 300, 60) if args.quick else (40, 400, 5, 600, 200)
    )
    store = os.environ.get("BENCH_STORE", "sqlite")
    postgres = None
    if args.store == "postgres" and store == "sqlite":  # a throwaway cluster of our own
        from tests.postgres_server import PostgresServer

        postgres = PostgresServer()
        postgres.start()
        store = postgres.create_database("bench_deferred")
    broker = RedisServer()
    broker.start()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            env = {"BENCH_DIR": tmp, "BENCH_BROKER": broker.url, "BENCH_STORE": store}
            times = answer_times(env, inline, deferred)
            print("| handler of 2 s | answers | p50 | p99 |")
            print("|---|---:|---:|---:|")
            for name, values in times.items():
                print(
                    f"| {name} | {len(values)} | {percentile(values, 0.5) * 1000:,.1f} ms"
                    f" | {percentile(values, 0.99) * 1000:,.1f} ms |",
                    flush=True,
                )
            samples = throughput(env, rounds, per_round)
            inline_rate = statistics.median(samples["/inline-noop"])
            deferred_rate = statistics.median(samples["/deferred"])
            print("\n| gunicorn, 1 sync worker | deliveries/s acknowledged |")
            print("|---|---:|")
            print(f"| inline no-op handler | {inline_rate:,.0f} |")
            print(f"| one deferred handler | {deferred_rate:,.0f} |")
            print(f"| ratio (target ≥ 0.8) | {deferred_rate / inline_rate:.2f} |", flush=True)
            broker.client().flushdb()  # the jobs of the throughput rounds: nobody runs them
            lags = queue_lag(env, directory, lag)
            print("\n| queue lag, delivery to the worker's start | jobs | p50 | p99 |")
            print("|---|---:|---:|---:|")
            p50, p99 = percentile(lags, 0.5) * 1000, percentile(lags, 0.99) * 1000
            print(f"| one idle worker (solo pool) | {len(lags)} | {p50:,.1f} ms | {p99:,.1f} ms |")
    finally:
        broker.stop()
        if postgres is not None:
            postgres.destroy()
    shown = "SQLite" if store == "sqlite" else "PostgreSQL"
    print(
        f"\n({time.monotonic() - started:.0f} s, store {shown}, Redis broker, Python "
        f"{sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
