"""Deferred handlers on Django's tasks framework: ``Receiver(queue=DjangoTasksQueue())``.

``django.tasks`` on Django 6, the ``django_tasks`` backport before it (extra
``django-tasks``). A job is the task :data:`TASK_PATH` with the entry's key, the handler's
id, the trace context and the attempt's number; its worker (``manage.py db_worker`` for the
database backend) finds the receiver through the ``FLYMY_RECEIVER = "module:receiver"``
setting the Django app already reads (or ``flymy_receiver.django.register``), and calls
``receiver.run_deferred(key, handler_id, final=..., context=...)``.

Django's tasks have no retry policy of their own: a handler that raises is enqueued again
after ``retry_delay``, up to ``attempts`` runs in all; the last failure makes the entry
``failed`` (replayable). What a worker killed mid-handler leaves behind, the handler's lease
running out and ``journal.sweep()`` (``manage.py flymy_journal sweep``) send again.

With the database backend (``django_tasks_db``) writing to the same database as the
receiver's :class:`~flymy_receiver.django.DjangoStore`, the jobs are rows written in the
claim's own transaction: :meth:`DjangoStore.complete` enqueues the deferred handlers it
leaves ``queued`` before it commits, so the entry and its jobs commit together and nothing
waits for a sweep (:attr:`DjangoTasksQueue.in_store_transaction` says so; the receiver then
sends no job of its own).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..receiver import Receiver

__all__ = ["TASK_PATH", "DjangoTasksQueue"]

logger = logging.getLogger("flymy_receiver")

#: The task's import path, as the tasks framework records it in each job.
TASK_PATH = "flymy_receiver.queues.django.run_deferred_job"
#: What the database backends of the tasks framework are called (Django 6 or the backport,
#: and the backport's older built-in one): ``(backend module, its job model)``.
_DATABASE_BACKENDS = (
    ("django_tasks_db.backend", "django_tasks_db.models"),
    ("django_tasks.backends.database.backend", "django_tasks.backends.database.models"),
)


class DjangoTasksQueue:
    """Runs a receiver's deferred handlers as Django tasks.

    Takes no argument for the usual case. ``attempts`` is how many times a failing handler
    runs in all, ``retry_delay`` the wait before each retry (where the backend supports
    ``run_after``); ``backend``, ``queue_name`` and ``priority`` choose where jobs go, as in
    ``Task.using()``.
    """

    def __init__(
        self,
        *,
        attempts: int = 3,
        retry_delay: timedelta = timedelta(seconds=30),
        backend: str = "default",
        queue_name: str = "default",
        priority: int = 0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if retry_delay < timedelta(0):
            raise ValueError("retry_delay must not be negative")
        self.attempts = attempts
        self.retry_delay = retry_delay
        self.backend = backend
        self.queue_name = queue_name
        self.priority = priority
        self.receiver: Receiver | None = None
        self._writes_to: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"DjangoTasksQueue(backend={self.backend!r}, queue_name={self.queue_name!r})"

    # -- the queue protocol ---------------------------------------------------------------

    def bind(self, receiver: Receiver) -> None:
        """Remember ``receiver``; with a :class:`DjangoStore`, offer it the in-transaction
        enqueue (used when the jobs live in its database, see :attr:`in_store_transaction`)."""
        from ..django.store import DjangoStore

        self.receiver = receiver
        if isinstance(receiver.store, DjangoStore):
            receiver.store.transactional_queue = self

    def enqueue(self, key: str, handler_id: str, context: Mapping[str, str]) -> None:
        """Send the first run's job."""
        self._send(key, handler_id, dict(context), 1, None)

    # -- the in-transaction enqueue --------------------------------------------------------

    @property
    def in_store_transaction(self) -> bool:
        """Whether the bound receiver's store writes the jobs in the claim's transaction
        (then the receiver must not send them again after ``complete``)."""
        from ..django.store import DjangoStore

        store = self.receiver.store if self.receiver is not None else None
        if not isinstance(store, DjangoStore):
            return False
        try:
            return self.writes_to(store.using)
        except Exception as exc:  # a misconfigured backend: the receiver sends the jobs
            logger.warning("DjangoTasksQueue: cannot tell where jobs are written: %r", exc)
            return False

    def writes_to(self, using: str) -> bool:
        """Whether this queue's jobs are rows of the database ``using`` (the database
        backend of the tasks framework, routed there)."""
        # Settings do not change while the process runs: decided once per database.
        known = self._writes_to.get(using)
        if known is None:
            known = self._writes_to[using] = self._decide_writes_to(using)
        return known

    def _decide_writes_to(self, using: str) -> bool:
        from django.db import router

        backend = _tasks().task_backends[self.backend]
        for backend_module, models_module in _DATABASE_BACKENDS:
            try:
                database_backend = importlib.import_module(backend_module).DatabaseBackend
            except (ImportError, AttributeError):
                continue
            if isinstance(backend, database_backend):  # then its app is installed
                model = importlib.import_module(models_module).DBTaskResult
                return bool(router.db_for_write(model) == using)
        return False

    # -- jobs -----------------------------------------------------------------------------

    def _send(
        self,
        key: str,
        handler_id: str,
        context: dict[str, str],
        attempt: int,
        delay: timedelta | None,
    ) -> None:
        options: dict[str, Any] = {"backend": self.backend, "queue_name": self.queue_name}
        if self.priority:
            options["priority"] = self.priority
        task = _task()
        if delay and task.using(**options).get_backend().supports_defer:
            options["run_after"] = datetime.now(timezone.utc) + delay
        task.using(**options).enqueue(key, handler_id, context, attempt)

    def _run(self, key: str, handler_id: str, context: dict[str, str], attempt: int) -> None:
        receiver = self.receiver
        if receiver is None:  # pragma: no cover - _job binds it first
            raise ConfigurationError("DjangoTasksQueue is not bound to a receiver")
        final = attempt >= self.attempts
        try:
            receiver.run_deferred(key, handler_id, final=final, context=context)
        except LookupError:
            raise  # an unknown handler or a missing entry: retrying cannot help
        except Exception:
            if not final:  # Django's tasks do not retry: send the next attempt
                try:
                    self._send(key, handler_id, context, attempt + 1, self.retry_delay)
                except Exception as exc:  # the sweep sends it again
                    logger.warning(
                        "could not send the retry of deferred handler %s of %s: %r",
                        handler_id[:200],
                        key[:200],
                        exc,
                    )
            raise


def _job(key: str, handler_id: str, context: dict[str, str], attempt: int = 1) -> None:
    """The task a worker runs: one deferred handler of one journal entry."""
    from ..django.registry import configured_receiver

    receiver = configured_receiver()
    if receiver is None:
        raise ConfigurationError(
            "DjangoTasksQueue's worker needs the receiver: settings.FLYMY_RECEIVER = \"module:"
            'receiver" (or flymy_receiver.django.register(receiver) at start-up)'
        )
    queue = getattr(receiver, "queue", None)
    if not isinstance(queue, DjangoTasksQueue):
        queue = DjangoTasksQueue()
        queue.receiver = receiver
    elif queue.receiver is None:
        queue.receiver = receiver
    queue._run(key, handler_id, dict(context), int(attempt))


# The tasks framework imports a task by the path of its function: name the function after
# the module attribute that serves the task (built on first use, see __getattr__).
_job.__name__ = _job.__qualname__ = TASK_PATH.rpartition(".")[2]
_TASK: list[Any] = []


def _tasks() -> Any:
    """``django.tasks`` (Django 6) or the ``django_tasks`` backport."""
    try:
        return importlib.import_module("django.tasks")
    except ImportError:
        pass
    try:
        return importlib.import_module("django_tasks")
    except ImportError:
        raise ConfigurationError(
            "DjangoTasksQueue needs Django's tasks framework: Django 6, or pip install"
            " 'flymy-receiver[django-tasks]' (the django_tasks backport)"
        ) from None


def _task() -> Any:
    if not _TASK:
        _TASK.append(_tasks().task()(_job))
    return _TASK[0]


def __getattr__(name: str) -> Any:
    if name == TASK_PATH.rpartition(".")[2]:
        return _task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
