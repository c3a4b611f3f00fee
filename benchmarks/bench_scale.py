"""What a store's operations cost as its journal grows: 10^3, 10^5 and 10^6 entries.

For each size the journal is filled directly with SQL (a mix of states, agents and events
over 30 days, the idempotency records to match), then timed: one delivery through
``Receiver.handle`` (one handler, a fresh event), ``journal.get`` by key and by run id, a
filtered list page of 50 found with the keyset cursor (``state="failed"``, or one agent's
entries, ``before`` an entry deep in the list), the inspector's list (the newest 100
summaries, no filter), and pruning 2 000 expired entries. The last column is the 10^6
figure over the 10^3 one (issue 21: within 1.5x; a list page under 50 ms at 10^6).

    python -m benchmarks.bench_scale                   # SQLite, 10^3, 10^5, 10^6
    python -m benchmarks.bench_scale --quick           # stops at 10^5
    python -m benchmarks.bench_scale --store postgres  # a throwaway PostgreSQL cluster
    python -m benchmarks.bench_scale --store django    # DjangoStore on SQLite

SQLite is filled with the schema of ``flymy_receiver.stores.sqlite_schema``. PostgreSQL and
Django are filled by cloning one entry that the store itself journaled, column by column
as the database describes its table (``benchmarks/scale_targets.py``), so they follow
whatever schema those stores create.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.apps.common import make_receiver
from benchmarks.payloads import distinct_bodies, small_output
from benchmarks.scale_targets import TARGETS, Target
from flymy_receiver import Receiver
from flymy_receiver.stores.base import JournalStore, journals

SIZES_FULL = (1_000, 100_000, 1_000_000)
SIZES_QUICK = (1_000, 100_000)
EXPIRED = 2_000  # entries pruned in the prune figure, whatever the journal's size
OPERATIONS = (
    "delivery",
    "get (key)",
    "get (run id)",
    "failed page (keyset)",
    "agent page (keyset)",
    "inspector list (100)",
    f"prune ({EXPIRED:,} expired)",
)


Operation = Callable[[int], Any]


def prepare(target: Target, size: int, repeats: int) -> dict[str, Operation]:
    """The timed operations on ``target`` (of ``size`` entries), each called with the index
    of the call (0 .. repeats-1), so that every call uses its own event, key or cursor."""
    if not journals(target.store):
        raise RuntimeError(f"{target.store!r} keeps no journal")
    store: JournalStore = target.store  # type: ignore[assignment]
    rng = random.Random(size)
    receiver: Receiver = make_receiver(store=store)
    deliveries = distinct_bodies(small_output(), repeats + 10)
    for signed in deliveries[:10]:  # warm: connections, statement caches, the receiver
        receiver.handle(signed.body, signed.headers)

    def deliver(i: int) -> None:
        signed = deliveries[10 + i]
        response = receiver.handle(signed.body, signed.headers)
        if response.status != 200:
            raise RuntimeError(f"delivery answered {response.status} {response.body!r}")

    picks = [rng.randrange(size) for _ in range(repeats)]

    def get_key(i: int) -> None:
        if store.journal_get(target.key(picks[i])) is None:
            raise RuntimeError(f"no entry {target.key(picks[i])}")

    def get_run(i: int) -> None:
        if store.journal_get(target.run_id(picks[i])) is None:
            raise RuntimeError(f"no entry for {target.run_id(picks[i])}")

    # Cursors anywhere in the failed entries, and in one agent's, with a full page after
    # them: what paging back reads.
    failed = store.journal_list(state="failed", limit=size)
    failed_cursors = [failed[rng.randrange(max(1, len(failed) - 50))].key for _ in picks]
    agent = store.journal_list(agent_id="agent_7", limit=size)
    agent_cursors = [agent[rng.randrange(max(1, len(agent) - 50))].key for _ in picks]

    def failed_page(i: int) -> None:
        store.journal_list(state="failed", before=failed_cursors[i], limit=50)

    def agent_page(i: int) -> None:
        store.journal_list(agent_id="agent_7", before=agent_cursors[i], limit=50)

    def inspector(i: int) -> None:
        store.journal_list(limit=100)

    def prune(i: int) -> None:  # timed from here: the expired entries are added untimed
        target.prune()

    calls = (deliver, get_key, get_run, failed_page, agent_page, inspector, prune)
    return dict(zip(OPERATIONS, calls, strict=True))


def interleaved(
    targets: dict[int, Target], operations: dict[int, dict[str, Operation]], repeats: int
) -> dict[int, dict[str, float]]:
    """Median microseconds per size and operation, the sizes taking turns in rounds (10
    calls of each operation per turn), so that a machine busy for a while slows every size
    alike. Prunes: 3 per size, each after adding :data:`EXPIRED` expired entries."""
    times: dict[int, dict[str, list[float]]] = {n: {op: [] for op in OPERATIONS} for n in targets}
    prune = OPERATIONS[-1]
    for start in range(0, repeats, 10):
        for size, ops in operations.items():
            for name, call in ops.items():
                if name == prune:
                    continue
                for i in range(start, min(start + 10, repeats)):
                    began = time.perf_counter()
                    call(i)
                    times[size][name].append(time.perf_counter() - began)
    for round_ in range(3):
        for size, target in targets.items():
            target.add_expired(EXPIRED)
            began = time.perf_counter()
            operations[size][prune](round_)
            times[size][prune].append(time.perf_counter() - began)
    return {
        size: {name: statistics.median(found) * 1e6 for name, found in by_op.items()}
        for size, by_op in times.items()
    }


def _fmt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def report(results: dict[int, dict[str, float]]) -> str:
    sizes = sorted(results)
    head = ["operation", *(f"{n:,} entries" for n in sizes), f"{sizes[-1]:,} / {sizes[0]:,}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name in OPERATIONS:
        row = [_fmt(results[n][name]) for n in sizes]
        ratio = results[sizes[-1]][name] / results[sizes[0]][name]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="stop at 10^5 entries")
    parser.add_argument("--store", choices=sorted(TARGETS), default="sqlite")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per figure")
    args = parser.parse_args(argv)
    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    results: dict[int, dict[str, float]] = {}
    target_type = TARGETS[args.store]
    with tempfile.TemporaryDirectory(prefix="flymy-scale-") as directory:
        # Stores that can live side by side are measured in turns; one that shares a
        # database between sizes (Django's) is measured size after size.
        groups = [sizes] if target_type.side_by_side else [(size,) for size in sizes]
        for group in groups:
            targets, operations = {}, {}
            with ExitStack() as group_stack:
                for size in group:
                    target = group_stack.enter_context(target_type(Path(directory) / f"n{size}"))
                    started = time.perf_counter()
                    target.fill(size)
                    took = time.perf_counter() - started
                    print(f"{args.store}: {size:,} entries filled in {took:.1f} s", flush=True)
                    targets[size] = target
                    operations[size] = prepare(target, size, args.repeats)
                results.update(interleaved(targets, operations, args.repeats))
    print()
    print(f"{args.store}, median of {args.repeats} calls (prune: of 3), sizes in turns")
    print(report(results))


if __name__ == "__main__":
    main()
