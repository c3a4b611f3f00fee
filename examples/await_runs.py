"""Start agent runs, then await their webhooks with ``receiver.results(run_ids)``.

    FLYMY_WEBHOOK_SECRET=whsec-dev python examples/await_runs.py --count 3 --port 8000

Starting a run is simulated: a real script would call FlyMy.AI's API and get each new run's
id back; this one makes the ids up and prints them. The webhooks arrive at
``http://127.0.0.1:PORT/webhooks/flymy``, served by this script (Starlette under uvicorn, in
the same event loop); the lead profiler's handlers (``leads.py``) store them, and the script
prints each run as its webhook is handled. Stand in for the platform, once per printed id:

    flymy-receiver send http://127.0.0.1:8000/webhooks/flymy --secret whsec-dev --run-id RUN_ID

Without ``--port`` the script serves nothing: your web app receives the webhooks (other
processes, other machines) and the script awaits them through the store they share:

    cd examples
    export FLYMY_WEBHOOK_SECRET=whsec-dev FLYMY_STORE=sqlite:///deliveries.sqlite3
    gunicorn -w 2 -b 127.0.0.1:8000 flask_app:app &
    python await_runs.py --count 3

Exits 0 once every run's webhook has been handled (or failed: the output says which), 1 if
some did not arrive within ``--timeout`` seconds, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from typing import Any

from flymy_receiver import Receiver, UnknownEvent
from flymy_receiver.stores import MemoryStore

from leads import make_receiver

PATH = "/webhooks/flymy"
START_TIMEOUT = 30.0


def start_runs(count: int) -> list[str]:
    """Stands in for the platform's "start a run" call: the ids of the runs it started."""
    return [f"run_{secrets.token_hex(6)}" for _ in range(count)]


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="start runs and await their webhooks")
    parser.add_argument("--count", type=int, default=3, help="how many runs to start (3)")
    parser.add_argument("--port", type=int, help="serve the webhook here (0: any free port)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds in all (600)")
    args = parser.parse_args(argv)
    receiver = make_receiver()
    if args.port is None and isinstance(receiver.store, MemoryStore):
        print(
            "nothing would receive the webhooks: give --port, or set FLYMY_STORE to the store"
            " your webhook app uses (sqlite:///..., redis://..., postgresql://...)",
            file=sys.stderr,
        )
        return 2
    if args.port is None:
        return await await_runs(receiver, args.count, args.timeout)
    server, serving = await serve(receiver, args.port)
    try:
        return await await_runs(receiver, args.count, args.timeout)
    finally:
        server.should_exit = True
        await serving


async def await_runs(receiver: Receiver, count: int, timeout: float) -> int:
    """Start ``count`` runs and print each as its webhook is handled."""
    run_ids = start_runs(count)
    for run_id in run_ids:
        print(f"started {run_id}", flush=True)
    began = time.monotonic()
    try:
        async for event in receiver.results(run_ids, timeout=timeout):
            run_id = event.run_id if isinstance(event, UnknownEvent) else event.data.run_id
            # The journal says how its handlers went (a store read: off the event loop).
            state = await asyncio.to_thread(handlers_state, receiver, run_id)
            elapsed = time.monotonic() - began
            print(f"{event.event} {run_id} after {elapsed:.1f} s: {state}", flush=True)
    except TimeoutError as exc:
        print(f"gave up: {exc}", flush=True)
        return 1
    print(f"all {count} runs done", flush=True)
    return 0


def handlers_state(receiver: Receiver, run_id: str) -> str:
    """``handled``, ``failed`` (a handler raised) or ``ignored`` (no handler wanted it)."""
    entry = receiver.journal.get(run_id) if receiver.journal is not None else None
    return entry.state if entry is not None else "received"


async def serve(receiver: Receiver, port: int) -> tuple[Any, asyncio.Task[None]]:
    """The webhook endpoint on 127.0.0.1, in this event loop; prints where it listens."""
    import uvicorn
    from starlette.applications import Starlette

    from flymy_receiver.starlette import route

    app = Starlette(routes=[route(receiver, PATH)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if serving.done() or time.monotonic() > deadline:
            raise SystemExit(f"could not listen on 127.0.0.1:{port}")
        await asyncio.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    print(f"receiving webhooks on http://127.0.0.1:{bound}{PATH}", flush=True)
    return server, serving


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
