"""Deferred handlers on Celery: ``Receiver(queue=CeleryQueue(celery_app, **task_options))``.

Building the receiver registers two tasks on ``celery_app``: the worker task, which calls
``receiver.run_deferred(key, handler_id)``, and a sweep task for Celery beat. So a worker
started with ``celery -A module worker`` on the module that builds the receiver finds them.

``task_options`` are Celery task options, honoured as given. For "never lose, run once"::

    CeleryQueue(
        celery_app,
        acks_late=True,                  # a job is acknowledged after it ran, not before
        reject_on_worker_lost=True,      # a killed pool process: its job goes back to the queue
        autoretry_for=(Exception,),      # a handler that raises is retried ...
        max_retries=5,                   # ... five times, then the entry is ``failed``
        retry_backoff=True,              # 1 s, 2 s, 4 s ... (capped by retry_backoff_max)
    )

(``reject_on_worker_lost`` is the task option of the app setting
``task_reject_on_worker_lost``.) Running twice is prevented by the journal, not by the
broker: the handler's own lease (``Receiver(lease=...)``, longer than the slowest handler)
stops a redelivered job while the first still runs, and an ``ok`` record makes any later
copy a no-op. Set the Redis broker's ``visibility_timeout`` above the lease as well.
Whatever a broker loses (an outage at delivery, a job in flight on a killed worker),
``journal.sweep()`` sends again: schedule :meth:`CeleryQueue.schedule_sweep` on beat.

The web process publishes each job while the sender waits: a broker that is down costs a
delivery Celery's publish retries (``task_publish_retry_policy``) and connection timeout
(``broker_connection_timeout``); keep both short. The delivery is answered 200 all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..deferred import DEFAULT_SWEEP_AGE
from ..errors import ConfigurationError
from ..stores.urls import redacted_url

if TYPE_CHECKING:
    from ..receiver import Receiver

__all__ = ["DEFAULT_SWEEP_TASK", "DEFAULT_TASK", "CeleryQueue"]

#: The worker task's name, unless ``name=`` says otherwise.
DEFAULT_TASK = "flymy_receiver.run_deferred"
#: The sweep task's name, unless ``sweep_name=`` says otherwise.
DEFAULT_SWEEP_TASK = "flymy_receiver.sweep"


class CeleryQueue:
    """Runs a receiver's deferred handlers on ``celery_app``'s workers.

    ``task_options`` go to the worker task as given (``autoretry_for``, ``max_retries``,
    ``default_retry_delay``, ``retry_backoff``, ``acks_late``, ``queue``...); by default the
    task keeps no result (``ignore_result=True``). ``name`` and ``sweep_name`` are the tasks'
    names. A job's arguments are the entry's key, the handler's id and the trace context.
    """

    def __init__(
        self,
        celery_app: Any,
        *,
        name: str = DEFAULT_TASK,
        sweep_name: str = DEFAULT_SWEEP_TASK,
        **task_options: Any,
    ) -> None:
        self.app = celery_app
        self.name = name
        self.sweep_name = sweep_name
        self.task_options: dict[str, Any] = {"ignore_result": True, **task_options}
        self.receiver: Receiver | None = None
        #: The registered Celery tasks (set by :meth:`bind`).
        self.task: Any = None
        self.sweep_task: Any = None

    def __repr__(self) -> str:
        return f"CeleryQueue(task={self.name!r}, broker={self.broker_url_shown!r})"

    @property
    def broker_url(self) -> str:
        """The app's broker URL (may hold credentials: show :attr:`broker_url_shown`)."""
        url = getattr(self.app.conf, "broker_url", None)
        return url if isinstance(url, str) else ""

    @property
    def broker_url_shown(self) -> str:
        """The broker URL with its credentials masked, for logs and messages."""
        return redacted_url(self.broker_url) if self.broker_url else "-"

    def bind(self, receiver: Receiver) -> None:
        """Register the worker and sweep tasks on the app, for ``receiver``."""
        if self.receiver is not None and self.receiver is not receiver:
            raise ConfigurationError("a CeleryQueue serves one receiver: make one per receiver")
        for task_name in (self.name, self.sweep_name):
            if task_name in self.app.tasks:
                raise ConfigurationError(
                    f"the Celery app already has a task named {task_name!r}: give this"
                    " receiver's queue other names (CeleryQueue(app, name=..., sweep_name=...))"
                )
        self.receiver = receiver

        def run_deferred(
            task: Any, key: str, handler_id: str, context: Mapping[str, str] | None = None
        ) -> str:
            return receiver.run_deferred(
                key, handler_id, final=_final_for(task), context=context or {}
            )

        def sweep(older_than: float = DEFAULT_SWEEP_AGE.total_seconds()) -> int:
            journal = receiver.journal
            if journal is None:  # refused at registration; a receiver without one sends none
                return 0
            return len(journal.sweep(timedelta(seconds=older_than)))

        # shared=False: these belong to this app only; lazy=False: registered now, so that
        # the options below can be read back (retries) and a worker finds them at once.
        register = self.app.task
        self.task = register(
            name=self.name, bind=True, shared=False, lazy=False, **self.task_options
        )(run_deferred)
        self.sweep_task = register(
            name=self.sweep_name, shared=False, lazy=False, ignore_result=True
        )(sweep)

    def enqueue(self, key: str, handler_id: str, context: Mapping[str, str]) -> None:
        """Send one job (raises what the broker raises; the receiver logs it)."""
        if self.task is None:
            raise ConfigurationError("this CeleryQueue is not bound to a receiver yet")
        # Celery takes a producer from the app's pool for the job and gives it back after.
        # (Keeping one per thread saved about 1 ms a job, but the producers of threads that
        # ended were never given back: a server whose threads come and go exhausted the
        # pool, and the next enqueue waited for ever.)
        self.task.apply_async(args=(key, handler_id), kwargs={"context": dict(context)})

    def schedule_sweep(
        self, every: timedelta = timedelta(minutes=5), older_than: timedelta = DEFAULT_SWEEP_AGE
    ) -> dict[str, Any]:
        """Add the sweep to the app's beat schedule (run ``celery -A module beat``); returns
        the schedule entry."""
        if every <= timedelta(0):
            raise ValueError("every must be positive")
        entry = {
            "task": self.sweep_name,
            "schedule": every.total_seconds(),
            "kwargs": {"older_than": older_than.total_seconds()},
        }
        schedule = dict(self.app.conf.beat_schedule or {})
        schedule[self.sweep_name] = entry
        self.app.conf.beat_schedule = schedule
        return entry


def _final_for(task: Any) -> Callable[[BaseException], bool]:
    """Whether the task's retry policy gives up on this exception in this run: no
    ``autoretry_for`` that matches it, or its retries used up."""
    retries = int(getattr(task.request, "retries", 0) or 0)
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    dont_autoretry_for = tuple(getattr(task, "dont_autoretry_for", ()) or ())
    retry_kwargs = getattr(task, "retry_kwargs", None) or {}
    max_retries = retry_kwargs.get("max_retries", getattr(task, "max_retries", None))

    def final(exc: BaseException) -> bool:
        if not autoretry_for or not isinstance(exc, autoretry_for):
            return True
        if dont_autoretry_for and isinstance(exc, dont_autoretry_for):
            return True
        return max_retries is not None and retries >= max_retries

    return final
