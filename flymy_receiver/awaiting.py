"""Awaiting a run's webhook: ``await receiver.wait_for(run_id)`` and ``receiver.results(ids)``.

A :class:`Waiters` registry (one per receiver, so one per process in the usual app) keeps
the calls that wait, by run id. A call resolves with the event once a delivery of an
authentic event carrying its run id has ended after its handlers ran, whether they
succeeded or not (or no handler wanted it); at once when the journal already has such an
entry settled (``handled``, ``failed`` or ``ignored``; not ``pending``,
nor ``queued`` while deferred handlers have still to finish on a task queue's workers).

- In this process, the receiver calls :meth:`Waiters.delivered` as a delivery ends. The
  waiting event loops are woken with ``call_soon_threadsafe``, so the delivery may run in a
  worker thread or in another event loop.
- Across processes, through a shared store: a store that can announce (it offers
  ``store.notifier()``, see :class:`Notifier`; :class:`~flymy_receiver.stores.RedisStore`
  through pub/sub) gets each ended delivery's run id published, and one subscriber per
  registry listens; a store that cannot (SQLite) is polled by one thread per registry,
  which looks every waited run id up in the journal in batches, backing off while nothing
  settles. Either way the journal is read after subscribing, so no wake-up is lost between
  the check and the subscription.

A call that resolved, timed out or was cancelled leaves nothing behind; the background
thread ends once nobody has waited for a while. ``results()`` is an async generator: it
holds its waiter until it is exhausted or closed, so leave a loop early inside
``contextlib.aclosing(...)`` (or call its ``aclose()``).

A process that only waits (a script that starts runs, say) needs no secret and no handlers:
``Waiters.for_store(store)`` over the store the receivers share::

    waiters = Waiters.for_store(RedisStore("redis://127.0.0.1:6379/0"))
    event = await waiters.wait_for("run_xyz789", timeout=600, output=Lead)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import ValidationError

from .events import Event, RunCompleted, describe_validation_error
from .routing import OutputMismatch
from .stores.base import JournalStore, Store, journals
from .stores.memory import MemoryStore
from .stores.records import JournalEntry
from .stores.redis import RedisStore

__all__ = [
    "DEFAULT_TIMEOUT",
    "SETTLED_STATES",
    "Notifier",
    "RedisNotifier",
    "SettledLookup",
    "Subscription",
    "Waiters",
    "notifier_for",
]

logger = logging.getLogger("flymy_receiver")

#: Seconds ``wait_for`` and ``results`` wait unless told otherwise.
DEFAULT_TIMEOUT = 600.0
#: Journal states of an entry whose handlers have finished: a waiter resolves on these.
SETTLED_STATES = frozenset({"handled", "failed", "ignored"})

#: States whose handlers are still to run: ``pending`` (a delivery holds it) and ``queued``
#: (deferred handlers not finished on the queue's workers).
_UNSETTLED = frozenset({"pending", "queued"})

#: Polling (stores that cannot announce): every waited run is looked up this long after the
#: last look, doubling up to ``_POLL_MAX`` while nothing settles. New waiters are looked up
#: at once, on their own.
_POLL_FIRST = 0.1
_POLL_MAX = 1.0
#: How often a subscriber turns from the channel to newly registered waiters.
_TICK = 0.05
#: How long the background thread stays after the last waiter left (a later one then
#: finds it subscribed), before it closes its connection and ends.
_LINGER = 10.0
#: Run ids per batched journal lookup (SQLite allows 999 parameters in old builds).
_BATCH = 500
#: Longest pause before the background thread tries an unreachable store again.
_RETRY_MAX = 5.0


class Subscription(Protocol):
    """An open subscription to the run ids a :class:`Notifier` announces."""

    def get(self, timeout: float) -> list[str] | None:
        """Run ids announced since the last call, waiting up to ``timeout`` seconds for the
        first; ``None`` when the subscription was re-established meanwhile (announcements
        may have been missed: every waited run is then looked up again). Raises when the
        connection is lost for good; the caller subscribes again."""
        ...

    def close(self) -> None:
        """Unsubscribe and close the connection."""
        ...


@runtime_checkable
class Notifier(Protocol):
    """What a store offers through ``store.notifier()`` to wake waiters in other processes.

    ``notifier()`` is called once per receiver and must not connect yet. The receiver calls
    :meth:`publish` after a delivery's final journal write; :meth:`subscribe` is called by
    one background thread per receiver, only while someone waits.
    """

    def publish(self, run_id: str) -> None:
        """Announce that a delivery of ``run_id`` ended (blocking; may raise)."""
        ...

    def subscribe(self) -> Subscription:
        """Start listening; return once subscribed, so that nothing published later is
        missed (blocking; may raise)."""
        ...


@runtime_checkable
class SettledLookup(Protocol):
    """A journal store that can look many runs up in one query (used when polling)."""

    def journal_settled(self, run_ids: Sequence[str]) -> Mapping[str, JournalEntry]:
        """For each run id, its newest entry that is not ``pending``; others left out."""
        ...


def notifier_for(store: Store) -> Notifier | None:
    """The store's way to announce ended deliveries: ``store.notifier()`` if it offers one,
    Redis pub/sub for a :class:`~flymy_receiver.stores.RedisStore`, else ``None``."""
    offer = getattr(store, "notifier", None)
    if callable(offer):
        notifier: Notifier | None = offer()
        return notifier
    if isinstance(store, RedisStore):
        return RedisNotifier(store.client, f"{store.prefix}awaiting")
    return None


class RedisNotifier:
    """Announcements on one Redis channel (``{prefix}awaiting``); a message is a run id.

    Publishing uses the store's client. Each subscriber holds one pub/sub connection from
    the same pool, however many calls wait.
    """

    def __init__(self, client: Any, channel: str) -> None:
        self.client = client
        self.channel = channel

    def __repr__(self) -> str:
        return f"RedisNotifier(channel={self.channel!r})"

    def publish(self, run_id: str) -> None:
        """Announce that a delivery of ``run_id`` ended."""
        self.client.publish(self.channel, run_id)

    def subscribe(self, timeout: float = 5.0) -> _RedisSubscription:
        """Subscribe and wait (at most ``timeout`` seconds) for the server to confirm it."""
        pubsub = self.client.pubsub()
        try:
            pubsub.subscribe(self.channel)
            deadline = time.monotonic() + timeout
            while True:
                message = pubsub.get_message(timeout=0.1)
                if message is not None and message["type"] == "subscribe":
                    return _RedisSubscription(pubsub)
                if time.monotonic() > deadline:
                    raise TimeoutError("redis did not confirm the subscription")
        except BaseException:
            pubsub.close()
            raise


class _RedisSubscription:
    #: At most this many messages are read per call, so a flood cannot starve new waiters.
    _MAX_MESSAGES = 1000

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    def get(self, timeout: float) -> list[str] | None:
        runs: list[str] = []
        resubscribed = False
        message = self._pubsub.get_message(timeout=timeout)
        for _ in range(self._MAX_MESSAGES):
            if message is None:
                break
            if message["type"] == "message":
                data = message["data"]
                runs.append(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
            elif message["type"] == "subscribe":
                # redis-py reconnected and subscribed again by itself: a gap is possible.
                resubscribed = True
            message = self._pubsub.get_message(timeout=0.0)
        return None if resubscribed else runs

    def close(self) -> None:
        self._pubsub.close()


@dataclass(eq=False, slots=True)
class _Waiter:
    """One waiting call: its loop, what to do in that loop when a run resolves, its runs."""

    loop: asyncio.AbstractEventLoop
    wake: Callable[[str, Event], None]
    run_ids: tuple[str, ...]
    #: The registry's table it went into: a reset (after a fork) makes a new one.
    table: dict[str, dict[_Waiter, None]] | None = None


class Waiters:
    """The calls waiting for runs' webhooks, by run id: ``receiver.waiters``.

    ``len(waiters)`` is how many calls wait now and :attr:`runs` the run ids they wait
    for. ``journal`` is the store's journal (``None`` when the receiver keeps none: then
    only deliveries to this receiver are seen). Thread-safe.
    """

    def __init__(self, store: Store, journal: JournalStore | None) -> None:
        self.store = store
        self._journal = journal
        #: Announces ended deliveries to other processes; ``None`` when the store cannot
        #: (they poll) or when there is no journal to read the event from.
        self.notifier = notifier_for(store) if journal is not None else None
        # A MemoryStore is seen by this process only: its journal is read inline and nothing
        # else can deliver to it, so no background thread is needed.
        self._shared = journal is not None and not isinstance(store, MemoryStore)
        #: Seconds the background thread stays after the last waiter left.
        self.linger = _LINGER
        self._reset()

    @classmethod
    def for_store(cls, store: Store) -> Waiters:
        """Waiters over a store's journal alone, for a process that only waits: no secret,
        no receiver. It sees the deliveries that the receivers sharing ``store`` journal
        (a :class:`~flymy_receiver.stores.MemoryStore` is seen by this process only)."""
        if not journals(store):
            raise ValueError(
                f"{type(store).__name__} keeps no delivery journal: nothing to wait on"
            )
        return cls(store, store)  # type: ignore[arg-type]  # journals() said so

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._by_run: dict[str, dict[_Waiter, None]] = {}
        self._count = 0
        self._unchecked: set[str] = set()  # registered, not yet looked up by the watcher
        self._watcher: threading.Thread | None = None
        self._wake = threading.Event()

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"Waiters(waiting={self._count}, runs={len(self._by_run)})"

    @property
    def runs(self) -> frozenset[str]:
        """The run ids someone waits for now."""
        with self._lock:
            return frozenset(self._by_run)

    @property
    def watching(self) -> bool:
        """Whether the background thread (subscriber or poller) is running."""
        watcher = self._watcher
        return watcher is not None and watcher.is_alive()

    # -- waiting ----------------------------------------------------------------------

    async def wait_for(
        self,
        run_id: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        output: type[Any] | None = None,
    ) -> Event:
        """The event of ``run_id`` once its handlers finished; :class:`TimeoutError` after
        ``timeout`` seconds (``None``: no limit). ``output=Model``: a ``run.completed``
        event comes as ``RunCompleted[Model]`` (see :func:`typed_result`)."""
        event = await self._wait_for(run_id, timeout)
        return event if output is None else typed_result(event, output)

    async def _wait_for(self, run_id: str, timeout: float | None) -> Event:
        run_id = _run_key(run_id)
        limit = _check_timeout(timeout)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Event] = loop.create_future()

        def wake(_run_id: str, event: Event) -> None:
            if not future.done():
                future.set_result(event)

        def expire() -> None:
            if not future.done():
                future.set_exception(
                    TimeoutError(f"no webhook for run {run_id[:200]!r} within {timeout} s")
                )

        waiter = _Waiter(loop, wake, (run_id,))
        # A timer on the future itself: cheaper than asyncio.wait_for's wrapper, per waiter.
        timer = None if limit is None else loop.call_later(limit, expire)
        self._register(waiter)
        try:
            self._check_inline(waiter)
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            self._unregister(waiter)

    async def results(
        self,
        run_ids: Iterable[str],
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        output: type[Any] | None = None,
    ) -> AsyncIterator[Event]:
        """Each run's event once, in the order they resolve; ``timeout`` is an overall
        deadline, after which :class:`TimeoutError` says how many runs are missing.
        ``output=Model`` as for :meth:`wait_for`. The waiter is held until the iterator is
        exhausted or closed (``aclose()``, ``contextlib.aclosing``)."""
        ids = tuple(dict.fromkeys(_run_key(r) for r in run_ids))
        limit = _check_timeout(timeout)
        if not ids:
            return
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        queue: asyncio.Queue[tuple[str, Event]] = asyncio.Queue()
        waiter = _Waiter(loop, lambda run_id, event: queue.put_nowait((run_id, event)), ids)
        self._register(waiter)
        try:
            self._check_inline(waiter)
            remaining = set(ids)
            while remaining:
                if queue.empty():
                    left = None if deadline is None else deadline - loop.time()
                    try:
                        if left is not None and left <= 0:
                            raise asyncio.TimeoutError
                        run_id, event = await asyncio.wait_for(queue.get(), left)
                    except asyncio.TimeoutError:
                        raise TimeoutError(
                            f"{len(remaining)} of {len(ids)} runs had no webhook within {timeout} s"
                        ) from None
                else:
                    run_id, event = queue.get_nowait()
                if run_id in remaining:  # each run once, whatever wakes it again
                    remaining.discard(run_id)
                    yield event if output is None else typed_result(event, output)
        finally:
            self._unregister(waiter)

    # -- the receiver's hook ----------------------------------------------------------

    def delivered(self, run_id: str | None, event: Event) -> Callable[[], None] | None:
        """A delivery of ``event`` ended after its handlers ran (or none wanted it).

        Wakes this process's waiters for ``run_id`` now, and returns the blocking step that
        tells other processes, for the receiver to run like a store call (``None`` when
        there is nobody else to tell). Never raises.
        """
        if run_id is None:
            return None
        if self._by_run:
            if self._pid != os.getpid():
                self._reset()  # forked: those waiters are the parent's, their loops too
            else:
                self._notify(run_id, event)
        if self.notifier is None:
            return None
        return lambda: self._publish(run_id)

    def changed(self, run_id: str | None) -> None:
        """The journal entry of ``run_id`` changed outside a delivery (a deferred handler
        finished on a worker): its waiters, here and in other processes, look it up again
        (and resolve if it is settled). Blocking; never raises."""
        if run_id is None:
            return
        if self._by_run and self._pid == os.getpid():
            if not self._shared:  # no watcher thread: read the process-local journal now
                try:
                    self._resolve_from_journal([run_id])
                except Exception as exc:  # the waiters time out; the handler's run stands
                    logger.warning(
                        "could not read the journal entry of run %s: %r", run_id[:200], exc
                    )
            else:
                with self._lock:
                    if run_id in self._by_run:
                        self._unchecked.add(run_id)
                self._wake.set()
        if self.notifier is not None:
            self._publish(run_id)

    def _publish(self, run_id: str) -> None:
        try:
            if self.notifier is not None:
                self.notifier.publish(run_id)
        except Exception as exc:  # the delivery is answered already; waiters elsewhere time out
            logger.warning("could not announce the end of run %s's delivery: %r", run_id[:200], exc)

    # -- the registry -----------------------------------------------------------------

    def _register(self, waiter: _Waiter) -> None:
        if self._pid != os.getpid():
            self._reset()  # forked: the parent's waiters and thread are not ours
        with self._lock:
            for run_id in waiter.run_ids:
                self._by_run.setdefault(run_id, {})[waiter] = None
            waiter.table = self._by_run
            self._count += 1
            if self._shared:
                self._unchecked.update(waiter.run_ids)
                if self._watcher is None:
                    self._watcher = threading.Thread(
                        target=self._watch, name="flymy-awaiting", daemon=True
                    )
                    self._watcher.start()
        if self._shared:
            self._wake.set()

    def _unregister(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.table is not self._by_run:
                return  # registered before a reset: already forgotten
            waiter.table = None
            for run_id in waiter.run_ids:
                group = self._by_run.get(run_id)
                if group is not None:
                    group.pop(waiter, None)
                    if not group:
                        del self._by_run[run_id]
                        self._unchecked.discard(run_id)  # nobody to look it up for
            self._count -= 1

    def _notify(self, run_id: str, event: Event) -> None:
        """Wake every waiter of ``run_id``, each in its own loop; forget them."""
        with self._lock:
            group = self._by_run.pop(run_id, None)
        if not group:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Waiter]] = {}
        for waiter in group:
            by_loop.setdefault(waiter.loop, []).append(waiter)
        for loop, waiters in by_loop.items():
            # A closed loop raises RuntimeError: nobody is left to wake there.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake_all, waiters, run_id, event)

    def _check_inline(self, waiter: _Waiter) -> None:
        """A process-local journal (MemoryStore) is read at once, in the waiting loop."""
        if self._shared or self._journal is None:
            return  # shared: the watcher reads the journal, after subscribing
        for run_id in waiter.run_ids:
            entry = self._journal.journal_get(run_id)
            if entry is not None and entry.run_id == run_id and entry.state in SETTLED_STATES:
                self._notify(run_id, entry.parse())

    # -- the background thread: one subscriber or poller per registry ------------------

    def _watch(self) -> None:
        failures = 0
        while True:
            try:
                if self.notifier is not None:
                    self._listen(self.notifier)
                else:
                    self._poll()
                return  # nobody waited for a while
            except Exception as exc:  # the store or the channel failed: try again, bounded
                failures += 1
                log = logger.warning if failures == 1 else logger.debug
                log("waiting for runs' webhooks: the store failed (%r); retrying", exc)
                self._wake.wait(min(_RETRY_MAX, 0.05 * 2**failures))
                self._wake.clear()
                if self._retire():
                    return

    def _listen(self, notifier: Notifier) -> None:
        subscription = notifier.subscribe()
        try:
            everything = True  # subscribed: now read what was settled before
            idle_since: float | None = None
            while True:
                run_ids = self._take(everything)
                everything = False
                if run_ids:
                    self._resolve_from_journal(run_ids)
                if not self._by_run:
                    now = time.monotonic()
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= self.linger and self._retire():
                        return
                else:
                    idle_since = None
                announced = subscription.get(_TICK)
                if announced is None:
                    everything = True
                elif announced:
                    with self._lock:
                        waited = [r for r in dict.fromkeys(announced) if r in self._by_run]
                    if waited:
                        self._resolve_from_journal(waited)
        finally:
            subscription.close()

    def _poll(self) -> None:
        interval = _POLL_FIRST
        next_full = time.monotonic()
        idle_since: float | None = None
        while True:
            self._wake.clear()
            now = time.monotonic()
            full = now >= next_full
            run_ids = self._take(full)
            settled = self._resolve_from_journal(run_ids) if run_ids else 0
            if full:
                interval = _POLL_FIRST if settled else min(interval * 2, _POLL_MAX)
                next_full = time.monotonic() + interval
            if not self._by_run:
                idle_since = now if idle_since is None else idle_since
                if now - idle_since >= self.linger and self._retire():
                    return
                self._wake.wait(self.linger)
            else:
                idle_since = None
                self._wake.wait(max(0.0, next_full - time.monotonic()))

    def _take(self, everything: bool) -> list[str]:
        """The run ids to look up now: the new ones, or every waited one."""
        with self._lock:
            if everything:
                run_ids = list(self._by_run)
            else:
                run_ids = [r for r in self._unchecked if r in self._by_run]
            self._unchecked.clear()
        return run_ids

    def _retire(self) -> bool:
        """End the background thread unless someone waits (decided under the lock, so a
        new waiter either sees it gone and starts another, or is seen)."""
        with self._lock:
            if self._by_run:
                return False
            if self._watcher is threading.current_thread():
                self._watcher = None
            return True

    def _resolve_from_journal(self, run_ids: list[str]) -> int:
        """Look the runs up in the journal; wake the waiters of those settled."""
        found = self._lookup(run_ids)
        for run_id, entry in found.items():
            try:
                event = entry.parse()
            except Exception as exc:  # authenticated on receipt; a corrupt store row is logged
                logger.warning("could not read the journal entry of run %s: %r", run_id[:200], exc)
                continue
            self._notify(run_id, event)
        return len(found)

    def _lookup(self, run_ids: list[str]) -> dict[str, JournalEntry]:
        journal = self._journal
        found: dict[str, JournalEntry] = {}
        if journal is None:
            return found
        if isinstance(journal, SettledLookup):
            for start in range(0, len(run_ids), _BATCH):
                batch = journal.journal_settled(run_ids[start : start + _BATCH])
                # A queued entry's deferred handlers have not finished: not settled yet.
                found.update((r, e) for r, e in batch.items() if e.state not in _UNSETTLED)
            return found
        for run_id in run_ids:  # one query per run: stores should offer journal_settled
            entry = journal.journal_get(run_id)
            if entry is not None and entry.run_id == run_id and entry.state in SETTLED_STATES:
                found[run_id] = entry
        return found


def typed_result(event: Event, output: type[Any]) -> Event:
    """A ``run.completed`` event with its output validated into ``output``, as
    ``RunCompleted[output]``; any other event unchanged. Raises
    :class:`~flymy_receiver.routing.OutputMismatch` when the output does not match."""
    if not isinstance(event, RunCompleted):
        return event
    model: Any = RunCompleted[output]  # type: ignore[valid-type]  # a model given at run time
    if type(event) is model:  # already typed so (pydantic caches parametrised models)
        return event
    try:
        typed: Event = model.model_validate(event.model_dump(mode="json"))
    except ValidationError as exc:
        raise OutputMismatch(
            f"output of run {event.data.run_id[:120]} does not match {output.__name__}: "
            f"{describe_validation_error(exc)}"
        ) from None
    return typed


def _wake_all(waiters: list[_Waiter], run_id: str, event: Event) -> None:
    for waiter in waiters:
        waiter.wake(run_id, event)


def _run_key(run_id: Any) -> str:
    """Run ids are strings in events and the journal; an integer one is accepted too."""
    if isinstance(run_id, bool) or not isinstance(run_id, (str, int)):
        raise TypeError(f"a run id is a string, not {type(run_id).__name__}")
    return str(run_id)


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    seconds = float(timeout)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("timeout must be a positive number of seconds, or None")
    return seconds
