"""This checkout's ``Receiver.handle`` against an earlier revision's, in one process.

The earlier package is taken from git (``git archive``) into a temporary directory under
another name (its modules import each other relatively), so both run side by side on the
same signed bodies, interleaved in short rounds whose order alternates: a busy machine
slows both alike, and the per-round ratio is the result. Each receiver has the default
``MemoryStore`` and one no-op ``run.completed`` handler, the journal on (``--journal off``
to compare without it).

    python -m benchmarks.bench_regress 333e7a0          # 1 KB and 100 KB, about a minute
    python -m benchmarks.bench_regress 333e7a0 --opcodes  # Python opcodes per delivery

``--opcodes`` counts the Python bytecode instructions one delivery executes (a count, the
same on any machine), per function, for both: where the time went, without the noise.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.payloads import SECRET, SIZES, distinct_bodies

ROOT = Path(__file__).resolve().parent.parent


def load_revision(revision: str, into: Path) -> ModuleType:
    """The ``flymy_receiver`` package of ``revision``, imported as ``flymy_at_<rev>``."""
    name = "flymy_at_" + "".join(c if c.isalnum() else "_" for c in revision)
    archive = into / "package.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "flymy_receiver"], stdout=out, check=True
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / "flymy_receiver").rename(into / name)
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def receiver(package: ModuleType, journal: bool) -> Any:
    r = package.Receiver(secret=SECRET, journal=journal)

    @r.on("run.completed")
    def noop(event: Any) -> None:
        pass

    return r


def compare(packages: dict[str, ModuleType], label: str, journal: bool, rounds: int) -> None:
    output = SIZES[label]()
    size = len(distinct_bodies(output, 1)[0].body)
    per_round = max(50, min(1000, 5_000_000 // size))  # 1 KB: 1,000 a round; 100 KB: 50
    receivers = {name: receiver(p, journal) for name, p in packages.items()}
    bodies = distinct_bodies(output, per_round * len(receivers) * (rounds + 1))
    requests = [(s.body, list(s.headers.items())) for s in bodies]
    times: dict[str, list[float]] = {name: [] for name in receivers}
    names = list(receivers)
    i = 0
    for r in range(rounds + 1):  # round 0 warms up
        for name in names if r % 2 else names[::-1]:
            handle = receivers[name].handle
            batch, i = requests[i : i + per_round], i + per_round
            started = time.perf_counter()
            for body, headers in batch:
                handle(body, headers)
            if r:
                times[name].append((time.perf_counter() - started) / per_round * 1e6)
    base, now = names
    ratios = [n / b for n, b in zip(times[now], times[base], strict=True)]
    print(
        f"| {label} | {statistics.median(times[base]):,.1f} | {statistics.median(times[now]):,.1f}"
        f" | {statistics.median(ratios):.3f} | {min(times[now]) / min(times[base]):.3f} |",
        flush=True,
    )


def opcodes(packages: dict[str, ModuleType], journal: bool) -> None:
    """Python opcodes per 1 KB delivery, in all and for the functions that run most."""
    deliveries = 100
    for name, package in packages.items():
        r = receiver(package, journal)
        bodies = distinct_bodies(SIZES["1 KB"](), 1200 + deliveries)
        requests = [(s.body, list(s.headers.items())) for s in bodies]
        for body, headers in requests[:1200]:  # a full journal, as in a long run
            r.handle(body, headers)
        counts: collections.Counter[str] = collections.Counter()
        sys.settrace(_counting(counts))
        try:
            for body, headers in requests[1200:]:
                r.handle(body, headers)
        finally:
            sys.settrace(None)
        print(f"\n{name}: {sum(counts.values()) / deliveries:,.0f} opcodes per delivery")
        for where, count in counts.most_common(12):
            print(f"  {count / deliveries:6.0f}  {where}")


def _counting(counts: collections.Counter[str]) -> Any:
    """A trace function that counts each opcode under its function's file and name."""

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        return tracer

    return tracer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare with (a commit, a tag)")
    parser.add_argument("--sizes", nargs="*", default=["1 KB", "100 KB"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--journal", choices=["on", "off"], default="on")
    parser.add_argument("--opcodes", action="store_true", help="count opcodes, do not time")
    args = parser.parse_args()
    journal = args.journal == "on"
    import flymy_receiver

    with tempfile.TemporaryDirectory() as tmp:
        packages = {args.revision: load_revision(args.revision, Path(tmp)), "now": flymy_receiver}
        if args.opcodes:
            opcodes(packages, journal)
            return
        print(f"journal {args.journal}; µs per delivery (median of {args.rounds} rounds)\n")
        print(f"| body | {args.revision} | this checkout | ratio (per round) | ratio (best) |")
        print("|---|---:|---:|---:|---:|")
        for label in args.sizes:
            compare(packages, label, journal, args.rounds)


if __name__ == "__main__":
    main()
