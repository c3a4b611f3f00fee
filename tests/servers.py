"""Start real servers on 127.0.0.1 for end-to-end tests, and always stop them by PID."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def serve(
    argv: list[str],
    port: int,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` (which must listen on 127.0.0.1:``port``) until the block ends.

    The process gets its own session so that it and its workers are stopped together by
    its PID; its output is kept in a temporary file and shown if it fails to start.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(EXAMPLES), full_env.get("PYTHONPATH", "")) if p
    )
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not _listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-4000:]
                    raise RuntimeError(f"server {argv[:3]} did not start:\n{output}")
                time.sleep(0.05)
            proc.log = log  # type: ignore[attr-defined]
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a master that exited


def server_log(proc: subprocess.Popen[bytes]) -> str:
    """Everything the server printed so far."""
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    text: str = log.read().decode(errors="replace")
    log.seek(0, os.SEEK_END)
    return text


def post(
    port: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    path: str = "/webhooks/flymy",
    method: str = "POST",
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """One real HTTP request to 127.0.0.1:``port``; returns the status and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


PYTHON = sys.executable


def gunicorn(app: str, port: int, workers: int = 2) -> list[str]:
    """The command line of a gunicorn serving ``app`` on 127.0.0.1:``port``."""
    from gunicorn.config import KNOWN_SETTINGS

    argv = [PYTHON, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{port}"]
    argv += ["--timeout", "30", "--graceful-timeout", "5"]
    if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS):
        # gunicorn 24+ opens a control socket in $HOME by default, one for every server.
        argv.append("--no-control-socket")
    return [*argv, app]


def uvicorn(app: str, port: int) -> list[str]:
    """The command line of a uvicorn serving ``app`` on 127.0.0.1:``port``."""
    argv = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)]
    if app.startswith("django_project"):
        argv += ["--lifespan", "off"]  # Django does not speak the lifespan protocol
    return [*argv, app]


def django_example_env(tmp: Path, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus a fresh, migrated database for the Django example (``DJANGO_DB``)."""
    full = {**env, "DJANGO_DB": str(tmp / "django.sqlite3")}
    run_env = {**os.environ, **full, "PYTHONPATH": os.pathsep.join((str(ROOT), str(EXAMPLES)))}
    subprocess.run(
        [PYTHON, str(EXAMPLES / "django_project" / "manage.py"), "migrate", "--noinput", "-v0"],
        env=run_env,
        cwd=EXAMPLES,
        check=True,
        timeout=120,
    )
    return full
