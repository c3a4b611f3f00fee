"""What the admin does to journal entries, and how it says what happened.

Replaying runs the application's handlers, so it needs the application's receiver (see
:mod:`~flymy_receiver.django.registry`); resolving runs nothing, so without a receiver it
goes straight to the entries' own :class:`~flymy_receiver.django.DjangoStore`. Each result
is told as it is: a replay that ran no handler, or whose handler failed again, never reads
as a success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigurationError, EventInFlight, StoreUnavailable
from ..journal import Journal
from .registry import SETTING, configured_receiver

if TYPE_CHECKING:
    from ..stores.records import JournalEntry

__all__ = ["NO_RECEIVER", "Told", "journal_for_replay", "journal_for_resolve", "replay", "resolve"]

NO_RECEIVER = (
    "No receiver is configured, so entries cannot be replayed: set "
    f'{SETTING} = "myapp.webhooks:receiver" in settings, or call '
    "flymy_receiver.django.register(receiver) where the receiver is built."
)
NO_JOURNAL = "The configured receiver keeps no journal (journal=False)."
#: A resolution's note is kept to this many characters.
NOTE_LENGTH = 2000


class Refused(Exception):
    """An operation that cannot start; the message says why, for the page."""


@dataclass(frozen=True, slots=True)
class Told:
    """What an operation did to one entry: ``level`` is ``"success"``, ``"warning"`` or
    ``"error"``; ``state`` the entry's state after it (``""`` when it did not run)."""

    level: str
    text: str
    state: str = ""


def journal_for_replay() -> Journal:
    """The configured receiver's journal; :class:`Refused` when there is none."""
    try:
        receiver = configured_receiver()
    except ConfigurationError as exc:
        raise Refused(str(exc)) from None
    if receiver is None:
        raise Refused(NO_RECEIVER)
    if receiver.journal is None:
        raise Refused(NO_JOURNAL)
    return receiver.journal


def journal_for_resolve(using: str) -> Journal:
    """The configured receiver's journal if there is one, else the entries' own store."""
    try:
        return journal_for_replay()
    except Refused:
        from .store import DjangoStore

        return Journal(DjangoStore(using=using))


def replay(journal: Journal, key: str, *, force: bool = False) -> Told:
    """Replay one entry and say what the replay did."""
    name = _name(key)
    try:
        entry = journal.replay(key, force=force)
    except EventInFlight:
        return Told("error", f"{name} is being handled right now: try again in a moment.")
    except KeyError:
        return Told("error", f"{name} is not in the configured receiver's journal.")
    except LookupError:  # its body was dropped by the journal's byte limit
        return Told("error", f"{name} cannot be replayed: the journal did not keep its body.")
    except StoreUnavailable:
        return Told("error", f"{name} was not replayed: the store failed.")
    return Told(*_replayed(entry), entry.state)


def resolve(journal: Journal, key: str, note: str) -> Told:
    """Mark one entry ``resolved`` with ``note``."""
    name = _name(key)
    note = note.strip()[:NOTE_LENGTH]
    if not note:
        return Told("error", "Say why the entry is resolved: the note is kept with it.")
    try:
        entry = journal.resolve(key, note=note)
    except KeyError:
        return Told("error", f"{name} is not in the journal.")
    except StoreUnavailable:
        return Told("error", f"{name} was not resolved: the store failed.")
    return Told(
        "success", f"{name} is resolved: it is kept, and never replayed in bulk.", entry.state
    )


def _replayed(entry: JournalEntry) -> tuple[str, str]:
    name = _name(entry.run_id or entry.key)
    last = entry.history[-1] if entry.history else None
    if last is not None and last.outcome == "no_handler":
        return "warning", (
            f"Replayed {name}, but no handler ran (none registered for {entry.event[:100]} "
            f"now, or their filters changed): the entry stays {entry.state}."
        )
    if entry.state == "handled":
        return "success", f"Replayed {name}: every handler succeeded; the entry is handled."
    if entry.state == "queued":
        return "success", f"Replayed {name}: its deferred handlers were sent to the queue."
    if entry.state == "failed":
        failed = [n for n, o in entry.handlers.items() if o.state == "failed"]
        which = f" ({', '.join(n[:100] for n in failed[:3])})" if failed else ""
        return "warning", f"Replayed {name}: a handler failed again{which}; it is still failed."
    return "warning", f"Replayed {name}: the entry is {entry.state}."


def _name(key: str) -> str:
    from .display import printable

    return printable(key[:100] + ("…" if len(key) > 100 else ""))
