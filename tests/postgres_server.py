"""A throwaway PostgreSQL cluster on a free 127.0.0.1 port, for the store and adapter tests.

``initdb`` makes a cluster in a temporary directory; ``postgres`` runs it in its own process
group (as the ``postgres`` OS user when the tests run as root, since PostgreSQL refuses to run
as root), listening on 127.0.0.1 only, with its Unix socket inside the temporary directory,
trust authentication and ``fsync=off``. It can be stopped (``pg_ctl stop -m immediate``, then
SIGKILL of its process group by PID), started again on the same port with the same data,
and frozen with SIGSTOP to play a stalled server.

The binaries come from ``pg_config --bindir`` or the Debian layout
``/usr/lib/postgresql/<version>/bin``. A missing PostgreSQL fails the test in CI (``CI=true``)
and skips it locally.

Fixtures (registered for the whole suite in tests/conftest.py):

- ``postgres_server``: one cluster for the session (``.url``, ``.port``, ``.create_database()``,
  ``.stop()``, ``.start()``, ``.freeze()``, ``.thaw()``);
- ``postgres_url``: the URL of a fresh, empty database for one test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.servers import free_port

#: The OS user that runs the cluster when the tests run as root.
OS_USER = "postgres"
#: The database superuser made by initdb (trust authentication, no password).
DB_USER = "postgres"


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        path = Path(candidate)
        if all((path / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def require_postgres() -> Path:
    """The binaries' directory; fail in CI, skip locally when PostgreSQL is missing."""
    bindir = postgres_bindir()
    problem = None
    if bindir is None:
        problem = "PostgreSQL (initdb, pg_ctl, postgres) is not installed"
    elif os.geteuid() == 0 and _os_user() is None:
        problem = f"running as root, but there is no {OS_USER!r} OS user to run PostgreSQL"
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem}; it is required in CI", pytrace=False)
        pytest.skip(problem)
    assert bindir is not None
    return bindir


def _os_user() -> tuple[int, int] | None:
    import pwd

    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


class PostgresServer:
    """One PostgreSQL cluster that can be stopped, started again and frozen."""

    def __init__(self, port: int | None = None) -> None:
        self.bindir = require_postgres()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.url = self.database_url("postgres")
        self.tmp = Path(tempfile.mkdtemp(prefix="flymy-pg-"))
        self.data = self.tmp / "data"
        self.socket_dir = self.tmp / "sock"
        self.log_path = self.tmp / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: tuple[int, int] | None = _os_user() if os.geteuid() == 0 else None
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    # -- running things as the cluster's owner -------------------------------------------

    def _run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, **self._user_kwargs()
        )
        if out.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed:\n{out.stdout}\n{out.stderr}")
        return out

    def _user_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self.tmp, "env": self._env()}
        if self._as is not None:
            kwargs.update(user=self._as[0], group=self._as[1], extra_groups=[])
        return kwargs

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", PGUSER=DB_USER)
        if self._as is not None:
            env["HOME"] = str(self.tmp)
        return env

    def _chown(self, path: Path) -> None:
        if self._as is not None:
            os.chown(path, *self._as)

    def _initdb(self) -> None:
        self._chown(self.tmp)
        self.socket_dir.mkdir()
        self._chown(self.socket_dir)
        argv = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", DB_USER]
        argv += ["-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C"]
        self._run(argv, timeout=120)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            # Fast, and still durable across a crash of the server's processes (the outage
            # tests kill them); only a crash of the machine could lose commits.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres_server.py\n")
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")

    # -- the server's life -----------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Start the server (again, on the same port and data) and wait until it answers."""
        if self.running:
            return
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped together by PID
                **self._user_kwargs(),
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.log_path.read_text(errors="replace")[-4000:]
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start:\n{output}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        argv = [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)]
        argv += ["-U", DB_USER, "-d", "postgres", "-t", "2"]
        return subprocess.run(argv, timeout=10, env=self._env(), check=False).returncode == 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop at once (``pg_ctl stop -m immediate``), then SIGKILL by PID what is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.thaw(proc)
        backends = _children(proc.pid)
        if proc.poll() is None:
            argv = [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data)]
            argv += ["-m", "immediate", "-w", "-t", "10"]
            with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
                self._run(argv, timeout=20)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in backends:  # backends left behind by a postmaster gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash of the server would."""
        if self.proc is not None:
            self._signal_all(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.stop()

    def freeze(self) -> None:
        """SIGSTOP the postmaster and every backend: a server that stalls, TCP still open."""
        if self.proc is not None:
            self._signal_all(self.proc.pid, signal.SIGSTOP)

    def thaw(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Undo :meth:`freeze`."""
        proc = proc or self.proc
        if proc is not None:
            self._signal_all(proc.pid, signal.SIGCONT)

    @staticmethod
    def _signal_all(postmaster: int, sig: int) -> None:
        # Each backend makes itself a process-group leader, so the postmaster's group does not
        # hold them: they are found as its children. The postmaster goes first, so that it
        # starts no new backend meanwhile.
        with contextlib.suppress(ProcessLookupError):
            os.kill(postmaster, sig)
        for pid in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def destroy(self) -> None:
        """Stop the server and remove its data."""
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- databases -------------------------------------------------------------------------

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server (no password: trust authentication)."""
        return f"postgresql://{DB_USER}@{self.host}:{self.port}/{name}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` and return what it printed (tuples only, unaligned)."""
        argv = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", self.host, "-p", str(self.port), "-U", DB_USER, "-d", database, "-c", sql]
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=self._env(), check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name by default) and return its URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting whoever is still in it."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _children(parent: int) -> list[int]:
    """The PIDs of the processes whose parent is ``parent`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(parent):
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started cluster, stopped by PID and removed when the block ends."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One cluster for the whole session; tests keep apart with fresh databases."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database for this test (the server is restarted if a
    previous test left it stopped or frozen)."""
    postgres_server.thaw()
    postgres_server.start()
    return postgres_server.create_database()
