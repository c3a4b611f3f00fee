"""Connections of :class:`~flymy_receiver.stores.postgres.PostgresStore`: the pool, the
first connection, the bounded run of one statement, and the watchdog.

- The pool (psycopg_pool) is made per process on first use, so a store built before
  gunicorn forks its workers gives each worker its own connections. Before it exists, one
  connection is opened directly: it makes or checks the tables, and when it fails (a wrong
  password, no server) the caller gets that one error, naming the cause, instead of the
  pool's background retries and a ``PoolTimeout``. Passwords never reach a message.
- A store call is one statement. On the store's own pool it runs in autocommit: one round
  trip, no ``BEGIN`` nor ``COMMIT``; the session's timeouts come with the connection. On a
  pool of the application's, the timeouts are set per transaction (``BEGIN``, the
  settings, the statement and ``COMMIT`` sent together in one pipeline: still one round
  trip). Nothing checks a connection before use: a dead one fails at once and the call is
  tried again on the next (after a server restart every pooled connection is dead).
- Every wait is bounded: ``connect_timeout``, the pool's wait, ``lock_timeout`` and
  ``statement_timeout`` on the server, ``idle_in_transaction_session_timeout``, and a
  client-side deadline: the :class:`Watchdog` cuts the connection of a server that stopped
  answering altogether, so the call fails at once and the server, when it wakes, sees the
  client gone.
- Statements are written with named placeholders (``%(key)s``) and sent with the server's
  own (``$1``): each text is turned once (:func:`native`), and its arguments are passed in
  that order. psycopg would otherwise parse a statement of more than 4 KB (the claim)
  again on every call.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from ..errors import ConfigurationError, StoreUnavailable

__all__ = ["DEFAULT_TIMEOUT", "GRACE", "WATCHDOG", "AnswerLost", "Connections", "Watchdog"]

logger = logging.getLogger("flymy_receiver")

Rows = list[tuple[Any, ...]]

#: Seconds a call may wait on the pool, to connect, on a lock or for a statement.
DEFAULT_TIMEOUT = 3.0
#: The client-side deadline of a call is its server-side timeouts plus this much.
GRACE = 1.0
#: Errors after which a statement is tried again on a fresh connection: the pooled
#: connection had died (server restarted), or the server rolled the statement back
#: (deadlock, serialization). A statement whose answer was lost may have taken effect; the
#: store's statements are written so that running one twice does no harm (a claim retried
#: with its token finds itself).
_RETRY_SQLSTATES = frozenset({None, "57P01", "57P02", "57P03", "40P01", "40001"})


_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%")


@functools.lru_cache(maxsize=256)
def native(statement: str) -> tuple[bytes, tuple[str, ...]]:
    """``statement`` with PostgreSQL's own placeholders (``$1``, one per name, however
    often it is used; ``%%`` becomes ``%``), and the names in the order of their numbers."""
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            if match.group(0) == "%":
                raise ValueError("a lone % in a statement: write %% or %(name)s")
            return "%"
        return f"${names.setdefault(name, len(names) + 1)}"

    text = _PLACEHOLDER.sub(number, statement)
    return text.encode("utf-8"), tuple(names)


def _arguments(names: tuple[str, ...], params: Mapping[str, Any] | None) -> tuple[Any, ...]:
    return tuple(params[name] for name in names) if params else ()


def _fetched(cur: psycopg.RawCursor[Any]) -> Rows:
    """The statement's rows; none for one that returns no rows. (``cur.description`` would
    tell too, but builds an object per column on every call: about 10 µs a statement.)"""
    result = cur.pgresult
    if result is not None and result.status == psycopg.pq.ExecStatus.TUPLES_OK:
        return cur.fetchall()
    return []


class AnswerLost(StoreUnavailable):
    """A statement was sent and no answer came: it may have taken effect, or may still. The
    server process that ran it is ``backend_pid``: once it is gone, the statement either
    took effect or never will."""

    def __init__(self, detail: str, backend_pid: int) -> None:
        super().__init__(detail)
        self.backend_pid = backend_pid


@dataclass
class Attempt:
    """How far one try got, to tell whether trying again is safe."""

    connected: bool = False
    cut: bool = False
    backend_pid: int = 0

    def retryable(self, exc: BaseException) -> bool:
        # Not after a cut (the server is stalled) nor a timeout (it is slow).
        return (
            self.connected
            and not self.cut
            and isinstance(exc, psycopg.OperationalError)
            and exc.sqlstate in _RETRY_SQLSTATES
        )


class Connections:
    """The connections of one store: a URL's own pool, or the application's pool."""

    def __init__(
        self,
        url_or_pool: str | ConnectionPool[Any],
        timeout: float,
        pool_size: int,
        setup: Callable[[psycopg.Cursor[Any]], None],
    ) -> None:
        self.timeout = timeout
        self.pool_size = pool_size
        self._setup = setup
        self.user_pool: ConnectionPool[Any] | None = None
        if isinstance(url_or_pool, ConnectionPool):
            self.user_pool = url_or_pool
            self.display = f"pool={url_or_pool.name!r}"
            self._password = ""
            self.conninfo = ""
            self.connect_kwargs: dict[str, Any] = {}
        elif isinstance(url_or_pool, str):
            try:
                params = conninfo_to_dict(url_or_pool)
            except psycopg.Error:
                # libpq's message may quote the string, password included.
                raise ConfigurationError(
                    "not a valid PostgreSQL URL or connection string"
                ) from None
            ports = str(params.get("port") or "0").split(",")
            if not all(p.strip().isdigit() and int(p) < 65536 for p in ports):
                raise ConfigurationError("the PostgreSQL URL's port is not a number")
            self._password = str(params.get("password") or "")
            self.display = repr(_masked(params))
            self.conninfo = url_or_pool
            self.connect_kwargs = _kwargs(params, timeout)
        else:
            raise TypeError("PostgresStore needs a postgresql:// URL or a psycopg_pool pool")
        ms = int(timeout * 1000)
        # Settings of one transaction on the application's pool (one statement: it is
        # pipelined with the rest).
        self._set_local = (
            f"SELECT set_config('statement_timeout', '{ms}', true),"
            f" set_config('lock_timeout', '{ms}', true),"
            f" set_config('idle_in_transaction_session_timeout', '{idle_ms(timeout)}', true)"
        )
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None = None
        self._pool_pid = 0
        self._ready_pid = 0  # the process that has seen the tables ready
        _ALL.add(self)

    # -- running a statement ------------------------------------------------------------

    def run(self, statement: str, params: Mapping[str, Any] | None = None) -> Rows:
        """``statement`` once (tried again on a fresh connection when that is safe); its
        rows. Any database failure becomes :class:`StoreUnavailable`."""
        if self._ready_pid != os.getpid():
            self._first_use()
        started = time.monotonic()
        # After a server restart every idle connection of the pool is dead, and each fails
        # at once on first use: try the next one (each is discarded), within the time budget.
        tries = self.pool_size + 1
        while True:
            attempt = Attempt()
            tries -= 1
            try:
                return self._attempt(statement, params, attempt)
            except psycopg.Error as exc:
                in_time = time.monotonic() - started < self.timeout
                if tries > 0 and in_time and attempt.retryable(exc):
                    continue
                if attempt.connected:
                    raise AnswerLost(self.describe(exc, attempt), attempt.backend_pid) from None
                raise StoreUnavailable(self.describe(exc, attempt)) from None

    def _attempt(self, statement: str, params: Mapping[str, Any] | None, attempt: Attempt) -> Rows:
        pool = self._pool_here()
        with pool.connection(timeout=self.timeout) as conn:
            attempt.connected = True
            attempt.backend_pid = conn.info.backend_pid
            guard = WATCHDOG.arm(conn.fileno(), self.timeout + GRACE)
            try:
                try:
                    if self.user_pool is None:
                        text, names = native(statement)
                        with psycopg.RawCursor(conn) as cur:
                            cur.execute(text, _arguments(names, params))
                            return _fetched(cur)
                    return _in_one_transaction(conn, self._set_local, statement, params)
                except BaseException:
                    _rollback_quietly(conn)
                    raise
            finally:
                if WATCHDOG.disarm(guard):
                    attempt.cut = True
                    conn.close()  # cut on purpose: the pool must not hand it out again

    # -- first use ----------------------------------------------------------------------

    def _first_use(self) -> None:
        """Make or check the tables once per process, on a connection of its own."""
        with self._lock:
            if self._ready_pid == os.getpid():
                return
            attempt = Attempt()
            try:
                if self.user_pool is not None:
                    with self.user_pool.connection(timeout=self.timeout) as conn:
                        self._set_up(conn, attempt)
                else:
                    # Opened directly, before the pool exists: a failure here is one error
                    # that says why, not the pool's retries in the background.
                    kwargs = {**self.connect_kwargs, "autocommit": False}
                    with psycopg.connect(self.conninfo, **kwargs) as conn:
                        self._set_up(conn, attempt)
            except psycopg.Error as exc:
                raise StoreUnavailable(self.describe(exc, attempt)) from None
            self._ready_pid = os.getpid()

    def _set_up(self, conn: psycopg.Connection[Any], attempt: Attempt) -> None:
        attempt.connected = True
        autocommit = conn.autocommit
        guard = WATCHDOG.arm(conn.fileno(), self.timeout + GRACE)
        try:
            try:
                if autocommit:
                    conn.autocommit = False
                with conn.cursor() as cur:
                    if self.user_pool is not None:
                        cur.execute(self._set_local)
                    self._setup(cur)
                conn.commit()
            except BaseException:
                _rollback_quietly(conn)
                raise
            finally:
                if autocommit and not conn.closed:
                    conn.autocommit = True
        finally:
            if WATCHDOG.disarm(guard):
                attempt.cut = True
                conn.close()

    def _pool_here(self) -> ConnectionPool[Any]:
        """This process's pool, made on first use (a forked worker makes its own)."""
        if self.user_pool is not None:
            return self.user_pool
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pool_pid == pid:
            return pool
        with self._lock:
            if self._pool is not None and self._pool_pid == pid:
                return self._pool
            if self._pool is not None:
                # Inherited through fork: its sockets belong to the parent, so it is neither
                # used nor closed here (closing would end the parent's sessions).
                _INHERITED.append(self._pool)
            pool = ConnectionPool(
                self.conninfo,
                kwargs=self.connect_kwargs,
                min_size=1,
                max_size=self.pool_size,
                open=False,
                timeout=self.timeout,
                name=f"flymy-{pid}",
            )
            pool.open(wait=False)
            self._pool, self._pool_pid = pool, pid
            return pool

    def listen_connection(self) -> psycopg.Connection[Any]:
        """A dedicated autocommit connection outside the pool (for ``LISTEN``)."""
        if self.user_pool is not None:
            pool = self.user_pool
            # psycopg_pool 3.3 allows either to be a function that makes it.
            info, extra = pool.conninfo, pool.kwargs
            conninfo = info() if callable(info) else info
            kwargs = dict((extra() if callable(extra) else extra) or {})
        else:
            conninfo, kwargs = self.conninfo, dict(self.connect_kwargs)
        kwargs["autocommit"] = True
        try:
            return psycopg.connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            raise StoreUnavailable(self.describe(exc, None)) from None

    def close(self) -> None:
        """Close the connections this process opened (a later call opens new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
            mine = self._pool_pid == os.getpid()
        if pool is not None and mine:
            pool.close(timeout=self.timeout)
        elif pool is not None:
            _INHERITED.append(pool)  # the parent's: collecting it would end its sessions

    def describe(self, exc: BaseException, attempt: Attempt | None) -> str:
        """A one-line account of ``exc`` without the password."""
        if attempt is not None and attempt.cut:
            text = f"no answer within {self.timeout + GRACE:g}s; the connection was cut"
        else:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            text = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
        if self._password:
            text = text.replace(self._password, "***")
        return f"postgres: {text}"

    def after_fork(self) -> None:
        self._lock = threading.Lock()


def _in_one_transaction(
    conn: psycopg.Connection[Any],
    set_local: str,
    statement: str,
    params: Mapping[str, Any] | None,
) -> Rows:
    """On a connection of the application's pool: the statement with this store's
    timeouts, in a transaction of its own, sent as one pipeline (one round trip)."""
    autocommit = conn.autocommit
    if not autocommit:
        conn.autocommit = True  # BEGIN and COMMIT are ours, in the pipeline
    text, names = native(statement)
    try:
        with conn.cursor() as control, psycopg.RawCursor(conn) as cur:
            with conn.pipeline():
                control.execute("BEGIN")
                control.execute(set_local)
                cur.execute(text, _arguments(names, params))
                control.execute("COMMIT")
            return _fetched(cur)
    finally:
        if not autocommit and not conn.closed:
            conn.autocommit = False


def _kwargs(params: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """The connection settings that bound every wait, after those of the URL."""
    ms = int(timeout * 1000)
    options = (
        f"-c statement_timeout={ms} -c lock_timeout={ms} "
        f"-c idle_in_transaction_session_timeout={idle_ms(timeout)}"
    )
    if params.get("options"):
        options += " " + str(params["options"])  # the URL's own settings win
    kwargs: dict[str, Any] = {"options": options, "autocommit": True}
    defaults = {
        "connect_timeout": str(max(2, math.ceil(timeout))),
        "application_name": "flymy_receiver",
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": str(int((timeout + GRACE) * 1000)),
    }
    for name, value in defaults.items():
        if name not in params:
            kwargs[name] = value
    return kwargs


def idle_ms(timeout: float) -> int:
    # Longer than any call (so never mid-call), short enough to free a stalled client's locks.
    return int(max(10.0, 4 * (timeout + GRACE)) * 1000)


def _masked(params: Mapping[str, Any]) -> str:
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or params.get("hostaddr") or "")
    port = f":{params['port']}" if params.get("port") else ""
    dbname = f"/{params['dbname']}" if params.get("dbname") else ""
    return f"postgresql://{user}{host}{port}{dbname}"


def _rollback_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
    except psycopg.Error:
        logger.debug("postgres rollback failed", exc_info=True)


# -- the watchdog ----------------------------------------------------------------------------


class _Guard:
    __slots__ = ("deadline", "done", "fd", "fired")

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd, self.deadline = fd, deadline
        self.done = self.fired = False


class Watchdog:
    """One thread that cuts the connection of any call past its deadline.

    Server-side timeouts cover a slow server; this covers one that stopped answering (its
    kernel still accepting our bytes): the socket is shut down, so the blocked call fails
    at once, and the server, when it wakes, sees the client gone and rolls back.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Guard]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, fd: int, seconds: float) -> _Guard:
        guard = _Guard(fd, time.monotonic() + seconds)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="flymy-postgres-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (guard.deadline, next(self._order), guard))
            if self._heap[0][2] is guard:
                self._cond.notify()
        return guard

    def disarm(self, guard: _Guard) -> bool:
        """Stop watching; True when the deadline had passed and the connection was cut."""
        with self._cond:
            guard.done = True
            return guard.fired

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                guard = heapq.heappop(self._heap)[2]
                guard.fired = True
                _cut(guard.fd)  # under the lock: the call cannot have returned it meanwhile


def _cut(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


WATCHDOG = Watchdog()
_ALL: weakref.WeakSet[Connections] = weakref.WeakSet()
#: Pools inherited through fork, kept so that collecting them never closes their sockets.
_INHERITED: list[ConnectionPool[Any]] = []
#: Hooks of other modules to run in a forked child (the store's give-up queues).
AFTER_FORK: list[Callable[[], None]] = []


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    WATCHDOG.reset()
    for connections in list(_ALL):
        connections.after_fork()
    for hook in AFTER_FORK:
        hook()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
