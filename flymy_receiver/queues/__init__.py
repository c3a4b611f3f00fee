"""Task queues that run deferred handlers on their own workers (DESIGN section 10).

A deferred handler (``@receiver.on(..., defer=True)``) is acknowledged to the sender as soon
as its journal entry is durable; the journal is the outbox. A job carries only the entry's
key and the handler's id (plus the trace context), never the body. This package holds the
protocol; each queue lives in its own module (``celery``, ``django``) and imports its
framework only when used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..receiver import Receiver

__all__ = ["Queue"]


@runtime_checkable
class Queue(Protocol):
    """What a receiver needs from a task queue.

    ``bind`` is called once, when the receiver is built with ``queue=``: register the worker
    task (whose body calls ``receiver.run_deferred(key, handler_id, final=..., context=...)``)
    and remember the receiver. ``enqueue`` sends one job; an exception from it never fails a
    delivery (the entry stays ``queued`` and ``journal.sweep()`` sends it again).
    """

    def bind(self, receiver: Receiver) -> None: ...

    def enqueue(self, key: str, handler_id: str, context: Mapping[str, str]) -> None: ...
