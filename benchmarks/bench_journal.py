"""What the delivery journal costs: the same receiver with the journal on and off, in one run.

In process: ``Receiver.handle`` on an SQLite store (and the memory store, for reference),
journal on against ``journal=False``, interleaved round by round, every event distinct.
End to end: one gunicorn worker serving a Flask app with both receivers (each on its own
SQLite file, ``benchmarks/apps/journal_app.py``), the two URLs loaded in alternating rounds
by a second process, as in ``bench_e2e``.

    python -m benchmarks.bench_journal            # full run, about two minutes
    python -m benchmarks.bench_journal --quick    # a rough run, under a minute
    python -m benchmarks.bench_journal --profile  # cProfile of handle, journal on, SQLite
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.apps.common import make_receiver
from benchmarks.bench_e2e import PIN, compare
from benchmarks.payloads import SIZES, Signed, distinct_bodies
from flymy_receiver import Receiver
from flymy_receiver.stores import MemoryStore, SQLiteStore

# Rounds x events per round, per size (in process).
PLAN_FULL = {"1 KB": (30, 200), "100 KB": (20, 20)}
PLAN_QUICK = {"1 KB": (8, 100), "100 KB": (6, 10)}

JOURNAL_ON, JOURNAL_OFF = "/journal-on", "/journal-off"  # as in benchmarks/apps/journal_app.py
GUNICORN = [sys.executable, "-m", "gunicorn", "-w", "1", "--log-level", "warning"]


def _variants(directory: Path) -> dict[str, Callable[[Signed], Any]]:
    receivers: dict[str, Receiver] = {
        "SQLite, journal on": make_receiver(store=SQLiteStore(directory / "on.sqlite3")),
        "SQLite, journal off": make_receiver(
            store=SQLiteStore(directory / "off.sqlite3"), journal=False
        ),
        "memory, journal on": make_receiver(store=MemoryStore()),
        "memory, journal off": make_receiver(store=MemoryStore(), journal=False),
    }

    def variant(receiver: Receiver) -> Callable[[Signed], Any]:
        def handle(s: Signed) -> Any:
            response = receiver.handle(s.body, s.headers)
            if response.status != 200 or b"duplicate" in response.body:
                raise RuntimeError(f"handle answered {response.status} {response.body!r}")
            return response

        return handle

    return {name: variant(receiver) for name, receiver in receivers.items()}


def in_process(label: str, rounds: int, per_round: int) -> dict[str, float]:
    """Median µs per event of each variant; every variant sees every body once."""
    *bodies, warm_up = distinct_bodies(SIZES[label](), rounds * per_round + 1)
    with tempfile.TemporaryDirectory() as directory:
        variants = _variants(Path(directory))
        for handle in variants.values():
            handle(warm_up)
        names = list(variants)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            batch = bodies[r * per_round : (r + 1) * per_round]
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                handle = variants[name]
                gc.collect()
                start = time.perf_counter()
                for s in batch:
                    handle(s)
                samples[name].append((time.perf_counter() - start) / per_round * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def end_to_end(label: str, rounds: int, per_round: int) -> dict[str, float]:
    """Median requests per second of the two URLs of one gunicorn worker."""
    with tempfile.TemporaryDirectory() as directory:
        argv = [*GUNICORN, "benchmarks.apps.journal_app:app"]
        return compare(
            argv,
            {"BENCH_SQLITE_DIR": directory},
            (JOURNAL_ON, JOURNAL_OFF),
            label,
            rounds,
            per_round,
            deadline=30.0,
        )


def profile() -> None:
    import cProfile
    import pstats

    bodies = distinct_bodies(SIZES["1 KB"](), 5000)
    with tempfile.TemporaryDirectory() as directory:
        handle = _variants(Path(directory))["SQLite, journal on"]
        profiler = cProfile.Profile()
        profiler.enable()
        for s in bodies:
            handle(s)
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--profile", action="store_true", help="profile handle, journal on")
    parser.add_argument("--skip-e2e", action="store_true", help="in process only")
    args = parser.parse_args()
    if args.profile:
        profile()
        return
    started = time.monotonic()
    plan = PLAN_QUICK if args.quick else PLAN_FULL
    print("| µs per event (median) | " + " | ".join(plan) + " |")
    print("|---|" + "---:|" * len(plan))
    results = {label: in_process(label, *plan[label]) for label in plan}
    for name in next(iter(results.values())):
        print(f"| {name} | " + " | ".join(f"{results[label][name]:,.1f}" for label in plan) + " |")
    for store in ("SQLite", "memory"):
        ratios = [
            results[label][f"{store}, journal off"] / results[label][f"{store}, journal on"]
            for label in plan
        ]
        print(
            f"| {store}: off / on (speed ratio) | " + " | ".join(f"{r:.2f}" for r in ratios) + " |"
        )
    if not args.skip_e2e:
        rounds, per_round = (3, 300) if args.quick else (7, 1000)
        medians = end_to_end("1 KB", rounds, per_round)
        on, off = medians[JOURNAL_ON], medians[JOURNAL_OFF]
        print("\n| Flask (gunicorn), SQLite, 1 KB | req/s |")
        print("|---|---:|")
        print(f"| journal on | {on:,.0f} |")
        print(f"| journal off | {off:,.0f} |")
        print(f"| on / off | {on / off:.2f} (target ≥ 0.85) |")
        pinned = ", server and load pinned to separate CPUs" if PIN else ""
        print(f"\n(e2e: {rounds} rounds x {per_round} per URL{pinned})")
    mode = "quick" if args.quick else "full"
    print(f"({time.monotonic() - started:.0f} s, {mode} run)")


if __name__ == "__main__":
    main()
