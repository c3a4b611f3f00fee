"""The stores ``bench_scale`` measures, each filled straight through SQL.

A target is a context manager with ``store``, ``fill(n)`` (entries ``0 .. n-1``: key
``target.key(i)``, run id ``target.run_id(i)``; 90 % handled, 5 % failed, 3 % ignored, 1 %
stalled, 1 % resolved; agents ``agent_0`` .. ``agent_12``; received over the last 30 days),
``add_expired(k)`` (k entries whose retention has ended) and ``prune()``.

SQLite is written with the store's own schema. PostgreSQL and Django clone one entry that
the store journaled itself, column by column as the database describes the table: a column
this file does not know is copied as it is (and named on the console), so a schema change
in those stores needs no change here unless such a column must differ per entry.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from benchmarks.payloads import SECRET, distinct_bodies, small_output
from flymy_receiver import Receiver
from flymy_receiver.stores import SQLiteStore, Store

DAY = 86_400.0
#: SQL for the state of entry ``i`` (an integer expression substituted for ``{i}``).
STATE = (
    "CASE WHEN {i} % 100 < 90 THEN 'handled' WHEN {i} % 100 < 95 THEN 'failed' "
    "WHEN {i} % 100 < 98 THEN 'ignored' WHEN {i} % 100 < 99 THEN 'pending' ELSE 'resolved' END"
)
EVENT = "CASE WHEN {i} % 5 = 0 THEN 'run.failed' ELSE 'run.completed' END"
AGENT = "'agent_' || ({i} % 13)"
HANDLERS = '{"app.handler": {"ok": true, "error": null, "traceback": null, "at": 0, "state": "ok"}}'
HISTORY = '[{"at": 0, "source": "sender", "status": 200, "outcome": "handled", "duration": 0.001}]'


class Target:
    """One store under measurement (see the module docstring)."""

    store: Store
    #: Whether targets of several sizes can be open at once (their own databases).
    side_by_side = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._expired = 0

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def key(i: int) -> str:
        return f"run.completed:scale_{i}"

    @staticmethod
    def run_id(i: int) -> str:
        return f"scale_{i}"

    def fill(self, n: int) -> None:
        raise NotImplementedError

    def add_expired(self, k: int) -> None:
        raise NotImplementedError

    def prune(self) -> None:
        purge = getattr(self.store, "purge", None)
        if not callable(purge):
            raise RuntimeError(f"{self.store!r} has no purge()")
        purge()

    def close(self) -> None:
        pass


class SQLiteTarget(Target):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.store = SQLiteStore(directory / "scale.sqlite3")
        self.store.journal_list(limit=1)  # the schema, created by the store

    def fill(self, n: int) -> None:
        start = time.time() - 30 * DAY
        self._insert(0, n, start, 30 * DAY / n, 60 * DAY)

    def add_expired(self, k: int) -> None:
        first = 10**9 + self._expired
        self._expired += k
        self._insert(first, k, time.time() - 90 * DAY, 1.0, DAY)

    def _insert(self, first: int, n: int, start: float, step: float, retention: float) -> None:
        """Entries ``first .. first+n-1`` with bodies, and their done records."""
        i = "(c.i)"
        db = self.store._connection()
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "WITH RECURSIVE c(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?) "  # noqa: S608 (constant text)
            "INSERT INTO flymy_journal (key, event, run_id, agent_id, agent_name, state, "
            "attempts, received_at, updated_at, retention, expires, headers, handlers, history, "
            "body_size, body_dropped, lease_until) "
            f"SELECT 'run.completed:scale_' || {i}, {EVENT.format(i=i)}, 'scale_' || {i}, "
            f"{AGENT.format(i=i)}, 'Scale Agent', {STATE.format(i=i)}, 1, "
            "round(? + (c.i - ?) * ?, 6), round(? + (c.i - ?) * ?, 6), ?, "
            "? + (c.i - ?) * ? + ?, '{}', ?, ?, 480, 0, 0 FROM c",
            (first, first + n)
            + (start, first, step) * 2
            + (retention, start, first, step, retention, HANDLERS, HISTORY),
        )
        db.execute(
            "INSERT INTO flymy_journal_bodies (id, body) SELECT id, CAST(printf("
            '\'{"event":"run.completed","data":{"run_id":"%s","output":"%s"}}\', '
            "run_id, hex(zeroblob(200))) AS BLOB) FROM flymy_journal WHERE id > "
            "coalesce((SELECT max(id) FROM flymy_journal_bodies), 0)"
        )
        db.execute(
            "INSERT OR REPLACE INTO flymy_deliveries (key, token, done, expires) "
            "SELECT key, '', 1, expires FROM flymy_journal WHERE run_id >= ? AND run_id < ?",
            (f"scale_{first}", f"scale_{first + n}"),
        )
        db.execute("UPDATE flymy_journal_size SET bytes = bytes + ? WHERE id = 0", (480 * n,))
        db.execute("COMMIT")

    def close(self) -> None:
        self.store.close()


class _CloningTarget(Target):
    """Fill by cloning one journaled entry with ``INSERT ... SELECT`` over a series."""

    table = "flymy_journal"

    def _template(self) -> None:
        receiver = Receiver(secret=SECRET, store=self.store)
        receiver.on("run.completed")(lambda event: None)
        [signed] = distinct_bodies(small_output(), 1)
        if receiver.handle(signed.body, signed.headers).status != 200:
            raise RuntimeError("the template delivery failed")
        self.template_key = f"run.completed:{_run_id_of(signed.body)}"

    def _columns(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _expressions(self, i: str, start: str, step: str, retention: str) -> dict[str, str]:
        """SQL per known column, for entry number ``i`` received at ``start + i * step``."""
        kinds = dict(self._columns())

        def at(name: str, offset: str = "") -> str:
            return self._time(f"({start} + {i} * {step}{offset})", kinds.get(name, ""))

        known = {
            "key": f"'run.completed:scale_' || {i}",
            "run_id": f"'scale_' || {i}",
            "event": EVENT.format(i=i),
            "agent_id": AGENT.format(i=i),
            "state": STATE.format(i=i),
            "attempts": "1",
            "received_at": at("received_at"),
            "updated_at": at("updated_at"),
            "expires": at("expires", f" + {retention}"),
            "lease_until": "0",
            "retention": retention,
        }
        for name, kind in kinds.items():  # digests of the run id or key (issue 22, M6)
            source = "run_id" if "run" in name else "key"
            if ("hash" in name or "digest" in name) and source in known:
                known[name] = self._digest(name, kind, known[source])
        return known

    def _time(self, seconds: str, kind: str) -> str:
        """Epoch ``seconds`` (SQL) as a column of type ``kind`` holds them."""
        raise NotImplementedError

    def _digest(self, column: str, kind: str, source: str) -> str:
        """SQL computing digest ``column`` of ``source`` as the store does."""
        raise NotImplementedError

    def _select(self, i: str, start: str, step: str, retention: str) -> tuple[str, str]:
        known = self._expressions(i, start, step, retention)
        names, values, copied = [], [], []
        for name, _ in self._columns():
            if name == "id":
                continue  # a serial or identity: the database numbers the clones
            names.append(name)
            if name in known:
                values.append(known[name])
            else:
                values.append(f"t.{name}")
                copied.append(name)
        if copied:
            print(f"  cloned as they are: {', '.join(copied)}", flush=True)
        return ", ".join(names), ", ".join(values)


def _origin(first: int, start: float, step: float) -> float:
    """When entry number 0 would be received for entry ``first`` to be received at
    ``start``: the expressions count time from entry 0, and expired entries are numbered
    from 10^9 (without this they were received decades ahead, and never expired)."""
    return start - first * step


def _run_id_of(body: bytes) -> str:
    import orjson

    return str(orjson.loads(body)["data"]["run_id"])


_CLUSTERS = contextlib.ExitStack()
_POSTGRES: list[Any] = []


class PostgresTarget(_CloningTarget):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        from flymy_receiver.stores import PostgresStore
        from tests.postgres_server import running_postgres

        if not _POSTGRES:  # one throwaway cluster for the run, a database per target
            _POSTGRES.append(_CLUSTERS.enter_context(running_postgres()))
            atexit.register(_CLUSTERS.close)
        self.url = _POSTGRES[0].create_database()
        self.store = PostgresStore(self.url, timeout=60)  # the setup lists whole journals
        self._template()

    def _sql(self, query: str, args: tuple[Any, ...] = ()) -> list[Any]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, args)  # type: ignore[arg-type]
            return list(cur.fetchall()) if cur.description else []

    def _columns(self) -> list[tuple[str, str]]:
        return [
            (str(name), str(kind))
            for name, kind in self._sql(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (self.store.schema, self.table),  # type: ignore[attr-defined]
            )
        ]

    def _time(self, seconds: str, kind: str) -> str:
        return f"to_timestamp({seconds})" if kind.startswith("timestamp") else seconds

    def _digest(self, column: str, kind: str, source: str) -> str:
        digest = f"sha256(convert_to({source}, 'UTF8'))"
        return digest if kind == "bytea" else f"encode({digest}, 'hex')"

    def fill(self, n: int) -> None:
        self._clone(0, n, time.time() - 30 * DAY, 30 * DAY / n, 60 * DAY)

    def add_expired(self, k: int) -> None:
        first = 10**9 + self._expired
        self._expired += k
        self._clone(first, k, time.time() - 90 * DAY, 1.0, DAY)

    def _clone(self, first: int, n: int, start: float, step: float, retention: float) -> None:
        schema = self.store.schema  # type: ignore[attr-defined]
        origin = _origin(first, start, step)
        names, values = self._select(
            "g.i", f"{origin!r}::float8", f"{step!r}::float8", f"{retention!r}::float8"
        )
        values = values.replace("%", "%%")  # the modulo operator, not a placeholder
        self._sql(
            f'INSERT INTO "{schema}".{self.table} ({names}) SELECT {values} '  # noqa: S608
            f'FROM "{schema}".{self.table} t, generate_series(%s::bigint, %s::bigint) AS g(i) '
            "WHERE t.key = %s",
            (first, first + n - 1, self.template_key),
        )
        self._sql(f'ANALYZE "{schema}".{self.table}')

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if callable(close):
            close()


class DjangoTarget(_CloningTarget):
    """DjangoStore on SQLite (one database file for the run, emptied between sizes)."""

    side_by_side = False

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        import django
        from django.conf import settings
        from django.core.management import call_command

        if not settings.configured:
            settings.configure(
                SECRET_KEY="benchmark-only",
                USE_TZ=True,
                INSTALLED_APPS=["django.contrib.contenttypes", "flymy_receiver.django"],
                DATABASES={
                    "default": {
                        "ENGINE": "django.db.backends.sqlite3",
                        "NAME": str(directory.parent / "django.sqlite3"),
                        "OPTIONS": {"timeout": 30},
                    }
                },
            )
            django.setup()
            call_command("migrate", verbosity=0, interactive=False)
        from django.db import connection

        from flymy_receiver.django import DjangoStore, models

        self.connection = connection
        self.table = models.JournalEntry._meta.db_table
        for model in (models.DeliveryClaim, models.HandlerRecord, models.JournalEntry):
            model.objects.all().delete()
        self.claims = models.DeliveryClaim._meta.db_table
        self.records = models.HandlerRecord._meta.db_table
        self.store = DjangoStore()
        self._template()
        self._last_id = self._sql(f"SELECT max(id) FROM {self.table}")[0][0]  # noqa: S608

    def _sql(self, query: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self.connection.cursor() as cursor:
            cursor.execute(query, args)
            return list(cursor.fetchall()) if cursor.description else []

    def _columns(self) -> list[tuple[str, str]]:
        return [
            (str(r[1]), str(r[2]).lower()) for r in self._sql(f"PRAGMA table_info({self.table})")
        ]

    def _time(self, seconds: str, kind: str) -> str:
        if "date" in kind:
            return f"strftime('%Y-%m-%d %H:%M:%f', {seconds}, 'unixepoch')"
        return seconds

    def _digest(self, column: str, kind: str, source: str) -> str:
        # As the store writes them (``run_digest``): SQLite has no SHA-256, so the store's
        # own function is registered on the connection.
        return f"{self._digest_function(column)}({source})"

    def _digest_function(self, column: str) -> str:
        """The name of a SQL function computing ``column`` as the store does."""
        from flymy_receiver.django import reading

        compute = {"run_digest": reading.run_digest}.get(column)
        if compute is None:
            raise RuntimeError(f"no known digest for column {column!r}: extend the filler")
        self.connection.ensure_connection()
        name = f"bench_{column}"
        self.connection.connection.create_function(name, 1, compute, deterministic=True)
        return name

    def fill(self, n: int) -> None:
        self._clone(0, n, time.time() - 30 * DAY, 30 * DAY / n, 60 * DAY)

    def add_expired(self, k: int) -> None:
        first = 10**9 + self._expired
        self._expired += k
        self._clone(first, k, time.time() - 90 * DAY, 1.0, DAY)

    def _clone(self, first: int, n: int, start: float, step: float, retention: float) -> None:
        origin = _origin(first, start, step)
        names, values = self._select("c.i", repr(origin), repr(step), repr(retention))
        self._sql(
            "WITH RECURSIVE c(i) AS (SELECT %s UNION ALL SELECT i + 1 FROM c WHERE i + 1 < %s) "  # noqa: S608 (names from the catalog)
            f"INSERT INTO {self.table} ({names}) SELECT {values} "
            f"FROM {self.table} t, c WHERE t.key = %s",
            (first, first + n, self.template_key),
        )
        # The idempotency records to match, as deliveries leave them: a done claim and the
        # handler's record per key, expiring with the entry.
        clones = f"FROM {self.table} WHERE id > %s"
        self._sql(
            f"INSERT OR REPLACE INTO {self.claims} (key, token, done, expires) "
            f"SELECT key, '', 1, expires {clones}",
            (self._last_id,),
        )
        self._sql(
            f"INSERT OR REPLACE INTO {self.records} (key, handler, expires) "
            f"SELECT key, 'benchmarks.handler', expires {clones}",
            (self._last_id,),
        )
        self._last_id = self._sql(f"SELECT max(id) FROM {self.table}")[0][0]  # noqa: S608


TARGETS: dict[str, type[Target]] = {
    "sqlite": SQLiteTarget,
    "postgres": PostgresTarget,
    "django": DjangoTarget,
}
