"""Waking waiters in other processes through PostgreSQL: ``NOTIFY`` on one channel per schema,
sent by the store's own statements, and one ``LISTEN``ing connection per receiver."""

from __future__ import annotations

import hashlib
import select
from typing import TYPE_CHECKING, Any

import psycopg

from ..errors import StoreUnavailable
from .postgres_pool import GRACE, WATCHDOG
from .postgres_schema import quote

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = ["PostgresNotifier", "channel"]


class PostgresNotifier:
    """Ended deliveries announced with ``NOTIFY`` on one channel per schema (the payload
    is the run id); a subscriber is one dedicated connection, outside the pool, that
    ``LISTEN``s for every waiter of its receiver.

    The store's own statements announce: the completion, the failure, an ignored event and
    a deferred handler's last run each ``NOTIFY`` in the statement that settles the entry
    (no round trip of its own), so :meth:`publish` has nothing left to send."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self.channel = store._channel

    def __repr__(self) -> str:
        return f"PostgresNotifier(channel={self.channel!r})"

    def publish(self, run_id: str) -> None:
        """Nothing to do: the statement that settled the run's entry announced it."""

    def subscribe(self) -> _PostgresSubscription:
        """Connect and ``LISTEN``; return once listening."""
        store = self._store
        conn = store._conn.listen_connection()
        subscription = _PostgresSubscription(conn, store)
        try:
            subscription.run(f"LISTEN {quote(self.channel)}")
        except BaseException:
            subscription.close()
            raise
        return subscription


class _PostgresSubscription:
    def __init__(self, conn: psycopg.Connection[Any], store: PostgresStore) -> None:
        self._conn = conn
        self._store = store
        self._arrived: list[str] = []
        conn.add_notify_handler(lambda notify: self._arrived.append(notify.payload))

    def get(self, timeout: float) -> list[str] | None:
        if not self._arrived:
            try:
                readable, _, _ = select.select([self._conn.fileno()], [], [], timeout)
            except (OSError, ValueError, psycopg.Error) as exc:
                raise StoreUnavailable(f"postgres: {type(exc).__name__}") from None
            if readable:
                # Something arrived: a statement makes psycopg read it (on every version),
                # handing each notification to the handler above.
                self.run("SELECT 1")
        arrived, self._arrived = self._arrived, []
        return None if "" in arrived else arrived

    def run(self, statement: str) -> None:
        """One statement on the listening connection, bounded like every other call."""
        conn = self._conn
        try:
            guard = WATCHDOG.arm(conn.fileno(), self._store.timeout + GRACE)
            try:
                conn.execute(statement)
            finally:
                WATCHDOG.disarm(guard)
        except psycopg.Error as exc:
            raise StoreUnavailable(self._store._conn.describe(exc, None)) from None

    def close(self) -> None:
        self._conn.close()


def channel(schema: str) -> str:
    """The notification channel of a schema: a name of at most 63 bytes."""
    name = "flymy_awaiting" if schema == "public" else f"flymy_awaiting:{schema}"
    if len(name.encode("utf-8")) > 63:
        name = "flymy_awaiting:" + hashlib.sha256(schema.encode("utf-8")).hexdigest()[:32]
    return name
