"""Registering handlers for event names, and finding the ones an event should reach.

A handler's id is what the idempotency store records when it succeeds, so that a retry skips
it: it must name the same handler in every process and after every restart, and no two
handlers an event can reach may share one. It is ``name=`` when given, else the function's
``module.qualname``. Renaming a handler (or its module) changes its identity: for events in
flight at the deploy, a handler renamed after it succeeded runs once more. A registration
whose id is ambiguous (a second handler with the same id for the same event, directly or
through ``include()``) or cannot be derived stably (a ``functools.partial``, a callable
instance) is refused with a :class:`~flymy_receiver.errors.ConfigurationError` that asks for
``name=``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import functools
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import FrameType
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigurationError
from .events import RunCompleted, RunFailed, UnknownEvent, describe_validation_error

__all__ = ["CATCH_ALL", "KNOWN_EVENTS", "Handler", "OutputMismatch", "Router"]

logger = logging.getLogger("flymy_receiver")

F = TypeVar("F", bound=Callable[..., Any])
AnyEvent = Any  # RunCompleted[Any] | RunFailed | UnknownEvent, kept loose for handler types

# Bumped by every registration on any router, so that each router's flattened handler list
# (``handlers_for`` runs on every delivery) is rebuilt only after something changed.
_generation = [0]

#: Register a handler under this name to receive every authentic event, known or not.
CATCH_ALL = "*"
#: Handler ids are stored with each event's records: keep them short.
MAX_HANDLER_ID_LENGTH = 200
#: The event names the platform sends today, and the class each arrives as. Registering for
#: another name needs ``known=False`` (the platform may add events): a typo would otherwise
#: leave every real event unhandled, quietly.
KNOWN_EVENTS: Mapping[str, type[Any]] = {"run.completed": RunCompleted, "run.failed": RunFailed}


class OutputMismatch(Exception):
    """A run's output does not match the output model a handler asked for."""


class Handler:
    """One registered handler, with its filters and its typed-output model.

    The model is resolved when the handler is built: an annotation that cannot be resolved
    is a :class:`~flymy_receiver.errors.ConfigurationError` then, never an untyped event
    later. ``localns`` holds the names of the scope that defined the handler (an app
    factory's imports and models), for annotations written under
    ``from __future__ import annotations``.
    """

    __slots__ = (
        "_is_async",
        "_model",
        "agent_id",
        "agent_name",
        "atomic",
        "deferred",
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
        localns: Mapping[str, Any] | None = None,
        atomic: bool = False,
        deferred: bool = False,
    ) -> None:
        self.func = func
        self.atomic = atomic
        self.deferred = deferred
        self.event = event
        self.agent_id = agent_id
        self.agent_name = agent_name
        self.output = output
        self.id = id
        _check_signature(func, id)
        self._model = _resolve_model(func, output, id, localns or {}, event)
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
        return self._model

    def typed_event(self, event: AnyEvent, raw: Any) -> AnyEvent:
        """The event as this handler wants it: with ``data.output`` validated if asked."""
        model = self._model
        if model is None or not isinstance(event, RunCompleted):
            return event
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            raise OutputMismatch(
                f"output of run {event.data.run_id} does not match "
                f"{model.__name__}: {describe_validation_error(exc)}"
            ) from None

    def meets(self, other: Handler) -> bool:
        """Whether one event can reach both handlers (their ids must then differ)."""
        return self.event == other.event or CATCH_ALL in (self.event, other.event)


def _check_signature(func: Callable[..., Any], handler_id: str) -> None:
    """Refuse a handler that cannot be called with exactly one argument, the event."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    try:
        signature.bind(None)
    except TypeError:
        raise ConfigurationError(
            f"handler {handler_id} cannot be called with one event: its signature is"
            f" {str(signature)[:200]}. A handler takes exactly one argument, the event"
            " (give any other parameter a default)"
        ) from None


def _arrives_as(event: str) -> type[Any] | None:
    """The class an event of this name reaches a handler as (``None`` for ``*``)."""
    if event == CATCH_ALL:
        return None
    return KNOWN_EVENTS.get(event, UnknownEvent)


def _classes_of(hint: Any) -> list[type[Any]] | None:
    """The classes an annotation allows, or ``None`` when it cannot be told (``Any``, a
    ``TypeVar``, a protocol...): only a plain class or a union of them is checked."""
    if hint is Any or hint is None:
        return None
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        classes: list[type[Any]] = []
        for arg in args:
            if arg is type(None):
                continue
            inner = _classes_of(arg)
            if inner is None:
                return None
            classes.extend(inner)
        return classes
    metadata = getattr(hint, "__pydantic_generic_metadata__", None)
    if metadata and metadata.get("origin") is not None:
        return [metadata["origin"]]
    if isinstance(hint, type) and not getattr(hint, "_is_protocol", False):
        return [hint]
    return None


def _check_annotation(hint: Any, event: str, handler_id: str, annotation: Any) -> None:
    """Refuse an annotation that contradicts the event (``RunFailed`` on ``run.completed``):
    the handler would fail at every delivery, never at start-up."""
    arrival = _arrives_as(event)
    classes = _classes_of(hint)
    if arrival is None or classes is None:
        return
    if any(issubclass(arrival, cls) for cls in classes):
        return
    raise ConfigurationError(
        f"handler {handler_id} is registered for {event!r} but its event is annotated"
        f" {_shown(annotation)}: {event!r} events arrive as {arrival.__name__}. Register it"
        " for the event it expects, or annotate the event it gets"
    )


def _check_event_name(event: str, known: bool) -> None:
    """Refuse an event name the platform does not send, unless ``known=False``."""
    if not known or event == CATCH_ALL or event in KNOWN_EVENTS:
        return
    names = [*KNOWN_EVENTS, CATCH_ALL]
    close = difflib.get_close_matches(event, list(KNOWN_EVENTS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigurationError(
        f"unknown event name {event[:100]!r}: {hint}The platform sends"
        f" {', '.join(repr(n) for n in names[:-1])} ({CATCH_ALL!r} for every event). For an"
        " event it may add later, register with on(..., known=False)"
    )


def _resolve_model(
    func: Callable[..., Any],
    output: type[Any] | None,
    handler_id: str,
    localns: Mapping[str, Any],
    event: str = CATCH_ALL,
) -> type[BaseModel] | None:
    if output is not None:
        return RunCompleted[output]  # type: ignore[valid-type]  # a model given at run time
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: no annotation to read
        return None
    if not params or params[0].annotation is inspect.Parameter.empty:
        return None
    annotation = params[0].annotation
    # get_type_hints on a stand-in resolves this one annotation (strings and forward
    # references inside it) as it would for the handler, from the handler's globals and the
    # names of the scope that defined it; the other annotations do not matter here.
    probe = _annotation_probe(annotation)
    try:
        hint = typing.get_type_hints(probe, globalns=_globals_of(func), localns=dict(localns))
    except Exception as exc:
        raise ConfigurationError(
            f"cannot resolve the annotation {_shown(annotation)} of handler {handler_id}: "
            f"{type(exc).__name__}: {exc}. Import or define what it names before the handler "
            "is registered, or pass output=Model to on()"
        ) from None
    first = hint.get("event")
    _check_annotation(first, event, handler_id, annotation)
    metadata = getattr(first, "__pydantic_generic_metadata__", None)
    if (
        metadata
        and metadata.get("origin") is RunCompleted
        and metadata.get("args")
        and metadata["args"][0] is not Any
    ):
        return typing.cast("type[BaseModel]", first)
    return None


def _annotation_probe(annotation: Any) -> Callable[..., None]:
    def probe(event: Any) -> None: ...

    probe.__annotations__ = {"event": annotation}
    return probe


def _shown(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return repr(text or str(annotation))[:120]


def _unwrapped(func: Any) -> Any:
    while isinstance(func, functools.partial):
        func = func.func
    func = inspect.unwrap(func)
    return func.__func__ if inspect.ismethod(func) else func


def _globals_of(func: Callable[..., Any]) -> dict[str, Any]:
    """The module namespace a handler's annotations were written in."""
    target = _unwrapped(func)
    namespace = getattr(target, "__globals__", None)
    if namespace is None:  # a callable instance: its class's __call__
        namespace = getattr(_unwrapped(type(target).__call__), "__globals__", None)
    if namespace is None:
        module = sys.modules.get(getattr(target, "__module__", None) or "")
        namespace = vars(module) if module is not None else {}
    return typing.cast("dict[str, Any]", namespace)


def _closure_names(func: Callable[..., Any]) -> dict[str, Any]:
    """The variables a function closes over, by name (empty cells left out)."""
    target = _unwrapped(func)
    code, cells = getattr(target, "__code__", None), getattr(target, "__closure__", None)
    if code is None or not cells:
        return {}
    names = {}
    for name, cell in zip(code.co_freevars, cells, strict=False):
        try:
            names[name] = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
    return names


def _derived_id(func: Callable[..., Any]) -> str:
    """A handler's default id, ``module.qualname``; refuses what has no stable name."""
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(qualname, str) or not qualname:
        kind = "a functools.partial" if isinstance(func, functools.partial) else "a callable"
        raise ConfigurationError(
            f"{kind} without a __qualname__ has no name that is the same in every process: "
            "register it with on(..., name='a-stable-name')"
        )
    module = getattr(func, "__module__", None)
    return f"{module}.{qualname}" if isinstance(module, str) and module else qualname


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError("a handler name must be a non-empty string")
    if len(name) > MAX_HANDLER_ID_LENGTH:
        raise ConfigurationError(
            f"a handler name must be at most {MAX_HANDLER_ID_LENGTH} characters"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError("a handler name must be valid UTF-8 text") from None
    return name


class Router:
    """A set of handlers. ``Router(*others)`` and :meth:`include` merge routers.

    Handlers run in registration order; an included router's handlers run at the place
    where it was included, including handlers registered on it later.
    """

    def __init__(self, *others: Router) -> None:
        self._entries: list[Handler | Router] = []
        self._parents: list[Router] = []  # the routers this one was included in
        self._flat: list[Handler] = []
        self._flat_generation = -1
        for other in others:
            self.include(other)

    def on(
        self,
        event: str,
        *,
        agent_id: str | None = None,
        agent_name: str | None = None,
        output: type[Any] | None = None,
        name: str | None = None,
        atomic: bool = False,
        defer: bool = False,
        known: bool = True,
    ) -> Callable[[F], F]:
        """Register the decorated function for ``event`` (``"*"`` for every event).

        ``agent_id``/``agent_name`` restrict it to one agent's runs; ``output`` validates
        ``data.output`` of ``run.completed`` into that model (the same as annotating the
        parameter as ``RunCompleted[Model]``). ``name`` is the handler's id, recorded when it
        succeeds so that a retry skips it (default ``module.qualname``; renaming changes
        it). ``atomic=True`` runs a sync handler in one database transaction with the record
        that it succeeded (needs a store that can, such as ``DjangoStore``; refused with
        ``ConfigurationError`` otherwise). ``defer=True`` acknowledges the delivery once it is
        journaled and runs the handler on a task queue's worker (needs ``Receiver(queue=...)``
        and a store other processes share; see :mod:`flymy_receiver.deferred`). An event name
        the platform does not send is refused with a "did you mean" unless ``known=False``
        (for events it may add), and so are an annotation that contradicts the event and a
        handler that cannot take exactly one argument. Returns the function unchanged.
        """
        if not isinstance(event, str) or not event:
            raise TypeError("event must be a non-empty event name, or '*'")
        _check_event_name(event, known)
        if name is not None:
            name = _checked_name(name)

        def register(func: F) -> F:
            if not callable(func):
                raise TypeError("a handler must be callable")
            # The scope that defines the handler (an app factory) holds the names its
            # annotations may use: under decorator syntax, it is the caller of register().
            frame: FrameType | None = sys._getframe(1)
            localns = {**(frame.f_locals if frame is not None else {}), **_closure_names(func)}
            del frame  # no reference cycle through the frame
            handler = Handler(
                func,
                event,
                agent_id=agent_id,
                agent_name=agent_name,
                output=output,
                id=name if name is not None else _derived_id(func),
                localns=localns,
                atomic=atomic,
                deferred=defer,
            )
            self._refuse_clashes([handler])
            self._check(handler)
            _generation[0] += 1
            self._entries.append(handler)
            return func

        return register

    def include(self, router: Router) -> None:
        """Add ``router``'s handlers (present and future) after the ones registered so far.

        Raises :class:`~flymy_receiver.errors.ConfigurationError` when one of its handlers
        has the id of a handler already here for the same event.
        """
        if router is self or self in router._walk_routers():
            raise ValueError("including this router would create a cycle")
        handlers = list(router.handlers())
        self._refuse_clashes(handlers)
        for handler in handlers:
            self._check(handler)
        _generation[0] += 1
        router._parents.append(self)
        self._entries.append(router)

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
        for parent in self._parents:
            parent._check(handler)

    def _walk_routers(self) -> Iterator[Router]:
        for entry in self._entries:
            if isinstance(entry, Router):
                yield entry
                yield from entry._walk_routers()

    def _roots(self) -> list[Router]:
        """The outermost routers this one is part of (itself when it is not included)."""
        roots: list[Router] = []
        pending, seen = [self], set()
        while pending:
            router = pending.pop()
            if id(router) in seen:
                continue
            seen.add(id(router))
            if router._parents:
                pending.extend(router._parents)
            elif router not in roots:
                roots.append(router)
        return roots

    def _refuse_clashes(self, new: Iterable[Handler]) -> None:
        """Refuse handlers whose id an event would share with another handler it reaches."""
        new = list(new)
        for root in self._roots():
            present = list(root.handlers())
            for position, handler in enumerate(new):
                for other in [*present, *new[:position]]:
                    if other.id == handler.id and other.meets(handler):
                        raise ConfigurationError(
                            f"two handlers for {handler.event!r} would share the id "
                            f"{handler.id!r}: give one of them on(..., name='...') (the id "
                            "records which handlers of an event succeeded, so it must be "
                            "unique)"
                        )


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
