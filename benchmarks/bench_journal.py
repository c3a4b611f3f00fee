"""What the delivery journal costs: the same receiver with the journal on and off, in one run.

In process: ``Receiver.handle`` on an SQLite store (and the memory store, for reference),
journal on against ``journal=False``, interleaved round by round, every event distinct.
End to end: one gunicorn worker serving a Flask app with both receivers (each on its own
SQLite file, ``benchmarks/apps/journal_app.py``), the two URLs loaded in alternating rounds
by a second process, as in ``bench_e2e``.

    python -m benchmarks.bench_journal            # full run, about two minutes
    python -m benchmarks.bench_journal --quick    # a rough run, under a minute
    python -m benchmarks.bench_journal --only e2e # end to end only
    python -m benchmarks.bench_journal --profile  # cProfile of handle, journal on, SQLite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.apps.common import make_receiver
from benchmarks.bench_core import interleaved
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
        return interleaved(variants, bodies, rounds, per_round)


def end_to_end(label: str, rounds: int, per_round: int) -> dict[str, float]:
    """Requests per second of the two URLs of one gunicorn worker: the median of each, and
    the median of the per-round ratios (each round loads both URLs back to back, so a busy
    moment of the machine slows both sides of one ratio)."""
    with tempfile.TemporaryDirectory() as directory:
        argv = [*GUNICORN, "benchmarks.apps.journal_app:app"]
        samples = compare(
            argv,
            {"BENCH_SQLITE_DIR": directory},
            (JOURNAL_ON, JOURNAL_OFF),
            label,
            rounds,
            per_round,
            deadline=30.0,
        )
    on, off = samples[JOURNAL_ON], samples[JOURNAL_OFF]
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    cpu_on, cpu_off = samples[f"{JOURNAL_ON} cpu"], samples[f"{JOURNAL_OFF} cpu"]
    return {
        "on": statistics.median(on),
        "off": statistics.median(off),
        "ratio": statistics.median(ratios),
        "lowest": min(ratios),
        "highest": max(ratios),
        "cpu on": statistics.median(cpu_on),
        "cpu off": statistics.median(cpu_off),
        "cpu ratio": statistics.median(b / a for a, b in zip(cpu_on, cpu_off, strict=True)),
    }


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


def in_process_table(plan: dict[str, tuple[int, int]]) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--profile", action="store_true", help="profile handle, journal on")
    parser.add_argument("--only", choices=["process", "e2e"], help="one of the two parts")
    args = parser.parse_args()
    if args.profile:
        profile()
        return
    started = time.monotonic()
    if args.only != "e2e":
        in_process_table(PLAN_QUICK if args.quick else PLAN_FULL)
    if args.only != "process":
        rounds, per_round = (4, 300) if args.quick else (15, 500)
        result = end_to_end("1 KB", rounds, per_round)
        print("\n| Flask (gunicorn), SQLite, 1 KB | req/s |")
        print("|---|---:|")
        print(f"| journal on | {result['on']:,.0f} |")
        print(f"| journal off | {result['off']:,.0f} |")
        print(
            f"| on / off, median of the rounds | {result['ratio']:.2f} "
            f"(rounds {result['lowest']:.2f} to {result['highest']:.2f}; target ≥ 0.85) |"
        )
        print(
            f"| server CPU µs per request, on / off | {result['cpu on']:,.0f} / "
            f"{result['cpu off']:,.0f}: capacity ratio {result['cpu ratio']:.2f} |"
        )
        pinned = ", server and load pinned to separate CPUs" if PIN else ""
        print(f"\n(e2e: {rounds} rounds x {per_round} per URL{pinned})")
    mode = "quick" if args.quick else "full"
    print(f"({time.monotonic() - started:.0f} s, {mode} run)")


if __name__ == "__main__":
    main()
