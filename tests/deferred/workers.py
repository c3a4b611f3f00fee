"""Real Celery worker processes for the deferred-handler tests, stopped by PID.

A worker is ``python -m celery -A <module> worker`` in its own session (so it and any pool
children stop together), its output kept in a file; it counts as started once it logs that
it is ready. In CI a worker that does not start is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from tests.servers import ROOT, stop

#: Seconds a worker may take to say it is ready (it imports Celery and the app).
START_TIMEOUT = 60.0


class Worker:
    """One ``celery worker`` process (``--pool=solo`` unless told otherwise)."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        log: Path,
        *,
        module: str = "tests.deferred.celery_app",
        pool: str = "solo",
        concurrency: int = 1,
        cwd: Path = ROOT,
        extra_path: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.log = log
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            module,
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname={name}@localhost",
        ]
        path = os.pathsep.join([str(ROOT), *extra_path, os.environ.get("PYTHONPATH", "")])
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env, "PYTHONPATH": path}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while " ready." not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.output()[-4000:]
                self.stop()
                raise RuntimeError(f"celery worker {self.name} did not start:\n{output}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the worker's whole process group, as an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@contextlib.contextmanager
def running_workers(count: int, env: Mapping[str, str], logs: Path) -> Iterator[list[Worker]]:
    """``count`` started workers, stopped by PID when the block ends."""
    workers: list[Worker] = []
    try:
        for number in range(count):
            worker = Worker(f"w{number + 1}", env, logs / f"worker-{number + 1}.log")
            worker.start()
            workers.append(worker)
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def wait_until(
    check: Callable[[], object], timeout: float = 30.0, what: str = "the condition"
) -> object:
    """Poll ``check`` (bounded) until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
