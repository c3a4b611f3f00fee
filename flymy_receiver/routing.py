"""Registering handlers for event names, and finding the ones an event should reach."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigurationError
from .events import RunCompleted, UnknownEvent, describe_validation_error

__all__ = ["CATCH_ALL", "Handler", "OutputMismatch", "Router"]

logger = logging.getLogger("flymy_receiver")

F = TypeVar("F", bound=Callable[..., Any])
AnyEvent = Any  # RunCompleted[Any] | RunFailed | UnknownEvent, kept loose for handler types

# Bumped by every registration on any router, so that each router's flattened handler list
# (``handlers_for`` runs on every delivery) is rebuilt only after something changed.
_generation = [0]

#: Register a handler under this name to receive every authentic event, known or not.
CATCH_ALL = "*"


class OutputMismatch(Exception):
    """A run's output does not match the output model a handler asked for."""


class Handler:
    """One registered handler, with its filters and its typed-output model."""

    __slots__ = (
        "_is_async",
        "_model",
        "_resolved",
        "agent_id",
        "agent_name",
        "atomic",
        "event",
        "func",
        "id",
        "output",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        event: str,
        *,
        agent_id: str | None,
        agent_name: str | None,
        output: type[Any] | None,
        id: str,
        atomic: bool = False,
    ) -> None:
        self.func = func
        self.atomic = atomic
        self.event = event
        self.agent_id = agent_id
        self.agent_name = agent_name
        self.output = output
        self.id = id
        self._model: type[BaseModel] | None = None
        self._resolved = False
        # Asked on every delivery; inspect's check walks the function's wrappers each time.
        self._is_async = inspect.iscoroutinefunction(func)

    @property
    def is_async(self) -> bool:
        return self._is_async

    def accepts(self, event: AnyEvent) -> bool:
        if self.event != CATCH_ALL and self.event != event.event:
            return False
        if self.agent_id is None and self.agent_name is None:
            return True
        data = event.data
        if isinstance(event, UnknownEvent):
            agent_id, agent_name = data.get("agent_id"), data.get("agent_name")
        else:
            agent_id, agent_name = data.agent_id, data.agent_name
        return (self.agent_id is None or self.agent_id == agent_id) and (
            self.agent_name is None or self.agent_name == agent_name
        )

    def model(self) -> type[BaseModel] | None:
        """The parametrised ``RunCompleted[Output]`` this handler wants, if any."""
        if not self._resolved:
            self._model = self._resolve_model()
            self._resolved = True
        return self._model

    def typed_event(self, event: AnyEvent, raw: Any) -> AnyEvent:
        """The event as this handler wants it: with ``data.output`` validated if asked."""
        model = self.model()
        if model is None or not isinstance(event, RunCompleted):
            return event
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise OutputMismatch(
                f"output of run {event.data.run_id} does not match "
                f"{model.__name__}: {describe_validation_error(exc)}"
            ) from None

    def _resolve_model(self) -> type[BaseModel] | None:
        if self.output is not None:
            return RunCompleted[self.output]  # type: ignore[name-defined]
        try:
            hints = typing.get_type_hints(self.func)
        except Exception:  # an annotation that cannot be resolved at module level
            params = list(inspect.signature(self.func).parameters.values())
            if params and params[0].annotation is not inspect.Parameter.empty:
                logger.warning(
                    "cannot resolve the annotations of handler %s; its event output stays "
                    "untyped (pass output=Model to on() instead)",
                    self.id,
                )
            return None
        hints.pop("return", None)
        first = next(iter(hints.values()), None)
        metadata = getattr(first, "__pydantic_generic_metadata__", None)
        if (
            metadata
            and metadata.get("origin") is RunCompleted
            and metadata.get("args")
            and metadata["args"][0] is not Any
        ):
            return typing.cast("type[BaseModel]", first)
        return None


class Router:
    """A set of handlers. ``Router(*others)`` and :meth:`include` merge routers.

    Handlers run in registration order; an included router's handlers run at the place
    where it was included, including handlers registered on it later.
    """

    def __init__(self, *others: Router) -> None:
        self._entries: list[Handler | Router] = []
        self._flat: list[Handler] = []
        self._flat_generation = -1
        self._included_by: list[Router] = []
        for other in others:
            self.include(other)

    def on(
        self,
        event: str,
        *,
        agent_id: str | None = None,
        agent_name: str | None = None,
        output: type[Any] | None = None,
        atomic: bool = False,
    ) -> Callable[[F], F]:
        """Register the decorated function for ``event`` (``"*"`` for every event).

        ``agent_id``/``agent_name`` restrict it to one agent's runs; ``output`` validates
        ``data.output`` of ``run.completed`` into that model (the same as annotating the
        parameter as ``RunCompleted[Model]``). ``atomic=True`` runs a sync handler in one
        database transaction with the record that it succeeded (needs a store that can, such
        as ``DjangoStore``; refused with ``ConfigurationError`` otherwise). Returns the
        function unchanged.
        """
        if not isinstance(event, str) or not event:
            raise TypeError("event must be a non-empty event name, or '*'")

        def register(func: F) -> F:
            if not callable(func):
                raise TypeError("a handler must be callable")
            handler = Handler(
                func,
                event,
                agent_id=agent_id,
                agent_name=agent_name,
                output=output,
                id=self._handler_id(func, event),
                atomic=atomic,
            )
            self._check(handler)
            _generation[0] += 1
            self._entries.append(handler)
            return func

        return register

    def include(self, router: Router) -> None:
        """Add ``router``'s handlers (present and future) after the ones registered so far."""
        if router is self or self in router._walk_routers():
            raise ValueError("including this router would create a cycle")
        for handler in router.handlers():
            self._check(handler)
        _generation[0] += 1
        self._entries.append(router)
        router._included_by.append(self)

    def handlers(self) -> Iterator[Handler]:
        """Every registered handler, in the order they run."""
        for entry in self._entries:
            if isinstance(entry, Router):
                yield from entry.handlers()
            else:
                yield entry

    def handlers_for(self, event: AnyEvent) -> list[Handler]:
        """The handlers that ``event`` reaches, in order."""
        if self._flat_generation != _generation[0]:  # something was registered somewhere
            self._flat = list(self.handlers())
            self._flat_generation = _generation[0]
        return [handler for handler in self._flat if handler.accepts(event)]

    def dispatch(self, event: AnyEvent) -> list[str]:
        """Run the handlers ``event`` reaches, now, in order; return the ids of those that ran.

        For unit tests of handlers: no HTTP, no signature, no idempotency store. Async
        handlers run to completion. Raises what a handler raises, and
        :class:`OutputMismatch` when the output does not match a handler's model.
        """
        raw = event.model_dump(mode="json")
        ran: list[str] = []
        for handler in self.handlers_for(event):
            result = handler.func(handler.typed_event(event, raw))
            if inspect.isawaitable(result):
                run_coroutine(result)
            ran.append(handler.id)
        return ran

    async def adispatch(self, event: AnyEvent) -> list[str]:
        """The async twin of :meth:`dispatch`, for tests that already run an event loop."""
        raw = event.model_dump(mode="json")
        ran: list[str] = []
        for handler in self.handlers_for(event):
            result = handler.func(handler.typed_event(event, raw))
            if inspect.isawaitable(result):
                await result
            ran.append(handler.id)
        return ran

    def _check(self, handler: Handler) -> None:
        """Refuse a handler that this router, or one including it, cannot run as asked."""
        if handler.atomic and handler.is_async:
            raise ConfigurationError(
                f"handler {handler.id}: atomic=True needs a sync handler (a database "
                "transaction cannot span an await)"
            )
        for parent in self._included_by:
            parent._check(handler)

    def _walk_routers(self) -> Iterator[Router]:
        for entry in self._entries:
            if isinstance(entry, Router):
                yield entry
                yield from entry._walk_routers()

    def _handler_id(self, func: Callable[..., Any], event: str) -> str:
        base = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
        taken = {h.id for h in self.handlers() if h.event == event}
        if base not in taken:
            return base
        n = 2
        while f"{base}#{n}" in taken:
            n += 1
        return f"{base}#{n}"


_THREAD_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def run_coroutine(coroutine: Any) -> Any:
    """Run an async handler from sync code, even when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    global _THREAD_POOL
    if _THREAD_POOL is None:
        _THREAD_POOL = concurrent.futures.ThreadPoolExecutor(4, "flymy-async-handler")
    return _THREAD_POOL.submit(asyncio.run, coroutine).result()
