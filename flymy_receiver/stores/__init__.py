"""Idempotency stores: where the receiver remembers which events were handled.

``MemoryStore`` (the default) serves one process; ``SQLiteStore`` the worker processes of one
machine; ``RedisStore`` and ``PostgresStore`` many machines. All follow the contract in
:mod:`.base`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .base import Claim, ClaimState, JournalStore, Store
from .memory import MemoryStore
from .records import HandlerOutcome, JournalEntry, NewEntry, Refusal
from .urls import malformed_hint, redacted_url

if TYPE_CHECKING:
    from .postgres import PostgresStore
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = [
    "Claim",
    "ClaimState",
    "HandlerOutcome",
    "JournalEntry",
    "JournalStore",
    "MemoryStore",
    "NewEntry",
    "PostgresStore",
    "RedisStore",
    "Refusal",
    "SQLiteStore",
    "Store",
    "redacted_url",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that the redis and postgres extras are only needed by those
    # who use them.
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def store_from_url(url: str, *, create: bool = True) -> Store:
    """Build a store from a URL, for configuration by environment variable.

    ``memory://`` -> :class:`MemoryStore`; ``sqlite:///relative/path.sqlite3`` or
    ``sqlite:////absolute/path.sqlite3`` -> :class:`SQLiteStore`; ``redis://...`` or
    ``rediss://...`` -> :class:`RedisStore`; ``postgresql://...`` or ``postgres://...``
    -> :class:`PostgresStore`. A URL that cannot be used is a
    :class:`~flymy_receiver.errors.ConfigurationError` (a ``ValueError``) whose message shows
    the URL through :func:`redacted_url`, never its password.

    ``create=False`` is for tools that only read (``journal list``, ``inspect``): a SQLite
    file that does not exist is refused instead of created, and SQLite and PostgreSQL are
    asked not to create their tables.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a store URL must be a string, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        hint = malformed_hint(url)
        raise ConfigurationError(
            f"not a store URL (expected scheme://...): {redacted_url(url)!r}"
            + (f"; {hint}" if hint else "")
        )
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ConfigurationError("sqlite store URL needs a path: sqlite:///deliveries.sqlite3")
        if not create and not os.path.isfile(path):
            raise ConfigurationError(
                f"no SQLite database at {path[:200]!r} (relative to {os.getcwd()[:200]!r}): "
                "nothing to read, and a read-only command creates nothing; check the path "
                "(sqlite:///relative.sqlite3, sqlite:////absolute.sqlite3)"
            )
        return SQLiteStore(path, create=create)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        # libpq knows the scheme in lower case
        return PostgresStore(f"{scheme}://{rest}", create=create)
    raise ConfigurationError(
        f"unknown store scheme {scheme[:20]!r} in {redacted_url(url)!r}: "
        "use memory://, sqlite:///, redis:// or postgresql://"
    )
