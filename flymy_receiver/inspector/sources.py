"""What the inspector looks at: a receiver's journal, or a journaling store on its own.

``inspect --app module:receiver`` brings the app's receiver (its handlers, needed to replay,
and its secret, needed to sign a test event or a resend); ``inspect --store URL`` reads a
store alone, read-only. With both, the app's receiver is used over the store given, through
the public :meth:`Receiver.with_store <flymy_receiver.Receiver.with_store>`.
"""

from __future__ import annotations

from ..receiver import Receiver
from ..stores.base import Store

__all__ = [
    "receiver_over",
]


def receiver_over(receiver: Receiver, store: Store) -> Receiver:
    """The app's receiver (handlers, secrets, settings) journaling in ``store`` instead.

    Kept for existing callers: it is :meth:`Receiver.with_store`. Raises
    :class:`ValueError` when ``store`` keeps no journal.
    """
    return receiver.with_store(store)
