"""Requests per second through real servers: this library's adapter against a hand-written
handler on the same server, in alternating rounds.

Each server (gunicorn + Flask, gunicorn + Django, uvicorn + Starlette; one worker each)
serves both endpoints; the load comes from a second process on 127.0.0.1, a fixed number of
requests per round with a deadline, every request a distinct signed event.

    python -m benchmarks.bench_e2e            # full run, about a minute
    python -m benchmarks.bench_e2e --quick    # a rough run, under 30 seconds
    python -m benchmarks.bench_e2e --durable  # PostgresStore against a hand-written durable
                                              # endpoint, with and without 1 ms store latency
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.load import raw_request, run_load
from benchmarks.payloads import SIZES, distinct_bodies
from tests.servers import ROOT, free_port, serve

OURS, HAND = "/webhooks/flymy", "/hand"

SERVERS: dict[str, list[str]] = {
    "Flask (gunicorn)": [
        sys.executable, "-m", "gunicorn", "-w", "1", "--log-level", "warning",
        "benchmarks.apps.flask_app:app",
    ],
    "Django (gunicorn)": [
        sys.executable, "-m", "gunicorn", "-w", "1", "--log-level", "warning",
        "benchmarks.apps.django_app:application",
    ],
    "Starlette (uvicorn)": [
        sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--log-level", "warning",
        "--no-access-log", "benchmarks.apps.starlette_app:app",
    ],
}  # fmt: skip
SERVERS["Starlette (uvicorn), sync handler"] = SERVERS["Starlette (uvicorn)"]
ENV = {"Starlette (uvicorn), sync handler": {"BENCH_HANDLER": "sync"}}
# Like for like: our sync handler runs in a worker thread, so the hand-written endpoint it is
# compared with runs its handler in Starlette's thread pool too.
BASELINE = {"Starlette (uvicorn), sync handler": "/hand-sync"}
TARGET = {"Starlette (uvicorn), sync handler": "≥ 0.9"}


# With two or more CPUs, the server runs on the first and the load on the second, so the two
# do not take turns on one core (which made the ratio move by ±0.2 between runs).
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
PIN = len(_CPUS) >= 2 and shutil.which("taskset") is not None
SERVER_CPU, LOAD_CPU = (_CPUS[0], _CPUS[1]) if PIN else (None, None)


def _bind(argv: list[str], port: int) -> list[str]:
    if "uvicorn" in argv:
        argv = [*argv[:3], "--port", str(port), *argv[3:]]
    else:
        argv = [*argv[:3], "-b", f"127.0.0.1:{port}", *argv[3:]]
    return ["taskset", "-c", str(SERVER_CPU), *argv] if PIN else argv


Result = tuple[int, float, list[int]]


def _load_in_child(port: int, requests: list[bytes], deadline: float) -> Result:
    """Run one round of load from a forked process, so the load has its own interpreter."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        if LOAD_CPU is not None:
            os.sched_setaffinity(0, {LOAD_CPU})
        send.send(run_load(port, requests, deadline=deadline))

    process = context.Process(target=child)
    process.start()
    try:
        if not receive.poll(deadline + 15):
            raise RuntimeError("the load process did not answer in time")
        result: Result = receive.recv()
        return result
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def measure(name: str, label: str, rounds: int, per_round: int, deadline: float) -> dict[str, Any]:
    """Median requests per second of both endpoints on one server."""
    hand_path = BASELINE.get(name, HAND)
    samples = compare(
        SERVERS[name], ENV.get(name), (OURS, hand_path), label, rounds, per_round, deadline
    )
    ours, hand = statistics.median(samples[OURS]), statistics.median(samples[hand_path])
    return {"ours": ours, "hand": hand, "ratio": ours / hand}


def compare(
    argv: list[str],
    env: dict[str, str] | None,
    paths: tuple[str, ...],
    label: str,
    rounds: int,
    per_round: int,
    deadline: float,
    database: int | None = None,
) -> dict[str, list[float]]:
    """Requests per second of the endpoints ``paths`` of one server, one sample per round
    each (round ``r`` of every endpoint ran back to back, in an order reversed every other
    round). Also, under
    ``"<path> cpu"``, the server's CPU microseconds per request in each round (Linux): what
    a busy machine disturbs least; with ``database`` (the PID of a PostgreSQL postmaster),
    the CPU microseconds per request of it and its server processes under ``"<path> db"``."""
    port = free_port()
    signed = distinct_bodies(SIZES[label](), (rounds + 1) * per_round * len(paths))
    batches = [signed[i : i + per_round] for i in range(0, len(signed), per_round)]
    samples: dict[str, list[float]] = {key: [] for p in paths for key in (p, f"{p} cpu", f"{p} db")}
    with serve(_bind(argv, port), port, env=env, cwd=ROOT) as server:
        for r in range(rounds + 1):  # round 0 warms every endpoint up, and is not counted
            order = paths if r % 2 == 0 else paths[::-1]
            for i, path in enumerate(order):
                batch = batches[len(paths) * r + i]
                requests = [raw_request(path, s) for s in batch]
                cpu_before = _cpu_seconds(server.pid)
                db_before = _tree_cpu(database) if database else {}
                answered, seconds, unexpected = _load_in_child(port, requests, deadline)
                cpu = _cpu_seconds(server.pid) - cpu_before
                db = _cpu_since(db_before, _tree_cpu(database)) if database else 0.0
                if unexpected or answered != len(requests):
                    raise RuntimeError(
                        f"{argv[2:4]} {path}: {answered}/{len(requests)} answered, "
                        f"unexpected statuses {sorted(set(unexpected))}"
                    )
                if r:
                    samples[path].append(answered / seconds)
                    samples[f"{path} cpu"].append(cpu / answered * 1e6)
                    samples[f"{path} db"].append(db / answered * 1e6)
    return samples


def _processes() -> Iterator[tuple[int, int, int, float]]:
    """Each process as (pid, parent pid, process group, user + system CPU seconds), from
    /proc (nothing where /proc is not there)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        # fields after "(comm)": state, ppid, pgrp, ...; utime and stime at 11 and 12
        yield (
            int(entry),
            int(fields[1]),
            int(fields[2]),
            (int(fields[11]) + int(fields[12])) / ticks,
        )


def _cpu_seconds(group: int) -> float:
    """User + system CPU seconds of every process in the process group ``group`` (the
    server and its workers)."""
    return sum(cpu for _, _, pgrp, cpu in _processes() if pgrp == group)


def _tree_cpu(root: int) -> dict[int, float]:
    """User + system CPU seconds of ``root`` and of each of its child processes (a
    PostgreSQL postmaster and its server processes, each of which is a session of its own)."""
    return {pid: cpu for pid, ppid, _, cpu in _processes() if root in (pid, ppid)}


def _cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`_tree_cpu` readings (a process that started in
    between counts whole; one that ended in between is lost, which a pool's long-lived
    connections make rare)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


POSTGRES_APP = [
    sys.executable, "-m", "gunicorn", "-w", "1", "--log-level", "warning",
    "benchmarks.apps.postgres_app:app",
]  # fmt: skip


NO_JOURNAL = "/webhooks/flymy-no-journal"


def durable(label: str, rounds: int, per_round: int, deadline: float) -> None:
    """Our receiver on PostgresStore, the same with ``journal=False``, and the hand-written
    durable endpoint (the same Flask server, the same database), straight and through a proxy
    that adds 0.5 ms to every message each way (1 ms per round trip: a database next door).
    Each row: requests per second, its ratio to the hand-written endpoint's, and the CPU per
    request of the application's server and of PostgreSQL's server processes."""
    from benchmarks.latency_proxy import LatencyProxy
    from tests.postgres_server import running_postgres

    endpoints = {OURS: "ours", NO_JOURNAL: "ours, journal=False", HAND: "hand-written"}
    print(
        f"| {label} bodies, PostgreSQL | endpoint | req/s | ratio to hand-written | target"
        " | app CPU µs/req | database CPU µs/req |"
    )
    print("|---|---|---:|---:|---|---:|---:|")
    with running_postgres() as server:
        for delay in (0.0, 0.0005):
            with LatencyProxy("127.0.0.1", server.port, delay=delay) as proxy:
                port = proxy.port if delay else server.port
                database = server.create_database().rpartition("/")[2]
                url = f"postgresql://postgres@127.0.0.1:{port}/{database}"
                env = {"BENCH_PG_URL": url}
                samples = compare(
                    POSTGRES_APP,
                    env,
                    tuple(endpoints),
                    label,
                    rounds,
                    per_round,
                    deadline,
                    database=server.proc.pid if server.proc else None,
                )
            med = {key: statistics.median(values) for key, values in samples.items()}
            setting = f"Flask (gunicorn), {2000 * delay:g} ms per round trip"
            for path, name in endpoints.items():
                target = "≥ 0.9" if path == OURS else "-"
                print(
                    f"| {setting} | {name} | {med[path]:,.0f} | {med[path] / med[HAND]:.2f}"
                    f" | {target} | {med[path + ' cpu']:,.0f} | {med[path + ' db']:,.0f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--size", default="1 KB", choices=list(SIZES))
    parser.add_argument("--servers", nargs="*", choices=list(SERVERS))
    parser.add_argument("--durable", action="store_true", help="PostgreSQL, durable endpoints")
    args = parser.parse_args()
    rounds, per_round = (3, 300) if args.quick else (7, 1000)
    started = time.monotonic()
    if args.durable:
        durable(args.size, rounds, per_round, deadline=60.0)
        print(f"\n({time.monotonic() - started:.0f} s, {rounds} rounds x {per_round})")
        return
    print(f"| {args.size} bodies | ours req/s | hand-written req/s | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for name in args.servers or list(SERVERS):
        result = measure(name, args.size, rounds, per_round, deadline=30.0)
        print(
            f"| {name} | {result['ours']:,.0f} | {result['hand']:,.0f} | "
            f"{result['ratio']:.2f} | {TARGET.get(name, '≥ 0.95')} |",
            flush=True,
        )
    mode = "quick" if args.quick else "full"
    pinned = f", server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU}" if PIN else ""
    print(
        f"\n({time.monotonic() - started:.0f} s, {mode} run, {rounds} rounds x {per_round}{pinned})"
    )


if __name__ == "__main__":
    main()
