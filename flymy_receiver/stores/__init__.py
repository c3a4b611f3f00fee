"""Idempotency stores: where the receiver remembers which events were handled.

``MemoryStore`` (the default) serves one process; ``SQLiteStore`` the worker processes of one
machine; ``RedisStore`` and ``PostgresStore`` many machines. All follow the contract in
:mod:`.base`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .base import Claim, ClaimState, JournalStore, Store
from .memory import MemoryStore
from .records import HandlerOutcome, JournalEntry, NewEntry, Refusal
from .urls import redacted_url

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


def store_from_url(url: str) -> Store:
    """Build a store from a URL, for configuration by environment variable.

    ``memory://`` -> :class:`MemoryStore`; ``sqlite:///relative/path.sqlite3`` or
    ``sqlite:////absolute/path.sqlite3`` -> :class:`SQLiteStore`; ``redis://...`` or
    ``rediss://...`` -> :class:`RedisStore`; ``postgresql://...`` or ``postgres://...``
    -> :class:`PostgresStore`. A URL that cannot be used is a
    :class:`~flymy_receiver.errors.ConfigurationError` (a ``ValueError``) whose message shows
    the URL through :func:`redacted_url`, never its password.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a store URL must be a string, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(f"not a store URL (expected scheme://...): {redacted_url(url)!r}")
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise ConfigurationError("sqlite store URL needs a path: sqlite:///deliveries.sqlite3")
        return SQLiteStore(path)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(f"{scheme}://{rest}")  # libpq knows the scheme in lower case
    raise ConfigurationError(
        f"unknown store scheme {scheme[:20]!r} in {redacted_url(url)!r}: "
        "use memory://, sqlite:///, redis:// or postgresql://"
    )
