"""Peak memory of one server worker while it receives one 10 MB authentic event.

Each endpoint gets a fresh server (one worker), is warmed up with a 1 KB event, then the
worker's peak resident set is reset (``/proc/PID/clear_refs``) and one 10 MB event is posted.
The figure is the peak minus the resident set before the request: everything the request
cost, the body included, whichever allocator made it. Linux only.

    python -m benchmarks.bench_memory
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.bench_e2e import ENV, HAND, OURS, SERVERS, _bind
from benchmarks.payloads import MB, SIZES, distinct_bodies, huge_string_output, realistic_output
from tests.servers import ROOT, free_port, post, serve

BODY_SIZE = 10 * MB
BODIES = {
    "realistic 10 MB": lambda: realistic_output(BODY_SIZE),
    "10 MB string": lambda: huge_string_output(BODY_SIZE),
}


def _status(pid: int, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def _worker(pid: int, deadline: float = 10.0) -> int:
    """The process that serves requests: gunicorn's only worker, or the server itself."""
    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        if "gunicorn" not in Path(f"/proc/{pid}/cmdline").read_text():
            return pid
        time.sleep(0.05)
    raise RuntimeError("no gunicorn worker appeared")


def peak(server: str, path: str, body_kind: str) -> tuple[int, int]:
    """(peak bytes over the resident set before the request, body bytes)."""
    port = free_port()
    big = distinct_bodies(BODIES[body_kind](), 1)[0]
    small = distinct_bodies(SIZES["1 KB"](), 1)[0]
    env = {**ENV.get(server, {}), "BENCH_MAX_BODY_SIZE": str(2 * BODY_SIZE)}
    with serve(_bind(SERVERS[server], port), port, env=env, cwd=ROOT) as proc:
        pid = _worker(proc.pid)
        status, _ = post(port, small.body, small.headers, path=path)
        if status != 200:
            raise RuntimeError(f"{server} {path} warm-up answered {status}")
        before = _status(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        status, answer = post(port, big.body, big.headers, path=path, timeout=60)
        if status != 200:
            raise RuntimeError(f"{server} {path} answered {status} {answer[:200]!r}")
        return _status(pid, "VmHWM") - before, len(big.body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="*", choices=list(SERVERS))
    parser.add_argument("--bodies", nargs="*", choices=list(BODIES))
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("bench_memory reads /proc: Linux only")
    print("| server | body | ours: peak MB (x body) | hand-written: peak MB (x body) | target |")
    print("|---|---|---:|---:|---|")
    for server in args.servers or [s for s in SERVERS if "sync handler" not in s]:
        for kind in args.bodies or list(BODIES):
            cells = []
            for path in (OURS, HAND):
                grown, size = peak(server, path, kind)
                cells.append(f"{grown / MB:.1f} ({grown / size:.2f}x)")
            row = f"| {server} | {kind} | {cells[0]} | {cells[1]} | ours ≤ hand-written |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
