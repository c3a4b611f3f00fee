"""``flymy-receiver journal ...``: what its commands load (a store, an app's receiver) and
how they print a value; the parser is in :mod:`.journal_commands`.

The journal is read from ``--store URL`` or from an app's receiver (``--app
module:receiver``, which brings its store); what runs handlers or signs (``replay``,
``resend``, ``sweep``) needs the app. Reading commands live in :mod:`.journal_read`, the
ones that change something in :mod:`.journal_ops`. Tables are for people (the same columns
as ``manage.py flymy_journal``, from :mod:`flymy_receiver.tables`); ``--json`` prints the
same facts for scripts. Every numeric or date option is checked as parsed: a bad one is one
line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from ..describe import escape_controls
from ..stores.base import JournalStore, journals
from .options import UsageError

if TYPE_CHECKING:
    from ..receiver import Receiver

__all__ = ["MAX_LIST", "MAX_RATE", "journal_store", "load_receiver", "printable"]

#: ``--limit`` of the listing commands.
MAX_LIST = 10_000
#: ``--per-second`` of a bulk replay.
MAX_RATE = 10_000.0


def printable(value: object, limit: int = 200) -> str:
    """``value`` as one terminal-safe line: control and format characters escaped (see
    :func:`flymy_receiver.describe.escape_controls`), cut at ``limit`` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    return escape_controls(text)


def load_receiver(spec: str) -> Receiver:
    """Import ``module:attribute`` (from the current directory too) and check it is a
    :class:`~flymy_receiver.Receiver`."""
    from ..receiver import Receiver

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--app must be MODULE:RECEIVER, got {printable(spec)!r}")
    sys.path.insert(0, os.getcwd())  # like python -m: the user's own modules are importable
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except Exception as exc:  # the user's module may raise anything while importing
        raise UsageError(
            f"cannot import {printable(spec)}: {type(exc).__name__}: {printable(exc)}"
        ) from None
    if not isinstance(value, Receiver):
        raise UsageError(f"{printable(spec)} is not a flymy_receiver.Receiver")
    return value


def journal_store(args: argparse.Namespace, *, create: bool = False) -> JournalStore:
    """The journal's store: the app's (``--app``) or ``--store URL``'s.

    ``create=False`` (reading commands): a missing SQLite file is refused, not created.
    """
    if getattr(args, "app", None):
        receiver = load_receiver(args.app)
        if receiver.journal is None:
            raise UsageError(f"{printable(args.app)} keeps no journal (journal=False?)")
        return receiver.journal.store
    if not getattr(args, "store", None):
        raise UsageError("pass --store URL or --app MODULE:RECEIVER")
    from ..stores import store_from_url
    from ..stores.urls import without_credentials

    try:
        store = store_from_url(args.store, create=create)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"--store: {without_credentials(str(exc), args.store)}") from None
    if not journals(store):
        raise UsageError(f"{type(store).__name__} keeps no journal")
    return store  # type: ignore[return-value]  # checked by journals()
