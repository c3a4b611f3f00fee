"""See a webhook arrive: run the Flask example under gunicorn and post signed events to it.

    pip install -e '.[flask]' gunicorn
    python examples/demo.py

The server listens on a free 127.0.0.1 port and writes to a temporary LEADS_DB. The demo
sends what the platform would send (a run.completed, the same delivery again, a run.failed)
and one forged request, prints each answer and the server's own output, then stops the
server. It exits 0 only if every answer was the expected one.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from flymy_receiver.testing import make_event, signed_request

HERE = Path(__file__).resolve().parent
SECRET = "whsec-demo-only"
START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 15.0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="flymy-demo-") as tmp:
        port = free_port()
        env = {
            **os.environ,
            "FLYMY_WEBHOOK_SECRET": SECRET,
            "FLYMY_STORE": "memory://",  # one worker below, so memory is enough
            "LEADS_DB": str(Path(tmp, "leads.sqlite3")),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [sys.executable, "-m", "gunicorn", "--workers", "1"]
        argv += ["--bind", f"127.0.0.1:{port}", *no_control_socket(), "flask_app:app"]
        print("$ python", " ".join(argv[1:]))
        with open(Path(tmp, "server.log"), "w+b") as log:
            server = subprocess.Popen(
                argv, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its workers
            )  # fmt: skip
            try:
                if not wait_until_listening(port, server):
                    print("the server did not start:")
                    print(log_text(log))
                    return 1
                ok = send_events(port)
            finally:
                stop(server)
            print("\n--- server output ---")
            print(log_text(log))
        print("--- rows in LEADS_DB ---")
        with contextlib.closing(sqlite3.connect(env["LEADS_DB"])) as db:
            for table in ("leads", "failures"):
                try:
                    rows = db.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
                except sqlite3.OperationalError:  # no handler ran, so no table either
                    rows = []
                for row in rows:
                    print(table, row)
    print("\ndemo", "succeeded" if ok else "FAILED")
    return 0 if ok else 1


def send_events(port: int) -> bool:
    completed = signed_request(make_event("run.completed"), SECRET)
    failed = signed_request(make_event("run.failed"), SECRET)
    forged = signed_request(make_event("run.completed"), "not-the-secret")
    cases = [
        ("run.completed", completed, 200),
        ("the same delivery again", completed, 200),
        ("run.failed", failed, 200),
        ("a forged signature", forged, 401),
    ]
    ok = True
    for label, request, expected in cases:
        try:
            status, body = post(port, request.body, request.headers)
        except OSError as exc:
            print(f"POST {label:<24} -> no answer ({exc})")
            ok = False
            continue
        mark = "ok" if status == expected else f"UNEXPECTED, wanted {expected}"
        print(f"POST {label:<24} -> {status} {body.decode(errors='replace')}  [{mark}]")
        ok = ok and status == expected
    return ok


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request("POST", "/webhooks/flymy", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def no_control_socket() -> list[str]:
    """Newer gunicorn opens a control socket in the home folder; the demo needs none."""
    from gunicorn.config import KNOWN_SETTINGS

    if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS):
        return ["--no-control-socket"]
    return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, server: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and server.poll() is None:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group by its PID, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


def log_text(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace").rstrip()


if __name__ == "__main__":
    sys.exit(main())
