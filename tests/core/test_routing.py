"""Routers and handlers: composition, order, filters, typed output, sync and async."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from pydantic import BaseModel

from flymy_receiver import OutputMismatch, Receiver, Router, RunCompleted, RunFailed
from flymy_receiver.errors import ConfigurationError
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET


class LeadProfile(BaseModel):
    background: str
    buying_triggers: list[str]


def deliver(receiver: Receiver, event: Any) -> int:
    request = signed_request(event, SECRET)
    return receiver.handle(request.body, request.headers).status


def test_decorators_return_the_function_unchanged() -> None:
    router = Router()

    def sync(event: Any) -> None: ...

    async def coro(event: Any) -> None: ...

    assert router.on("run.completed")(sync) is sync
    assert router.on("run.failed", agent_id="a", output=LeadProfile)(coro) is coro
    assert [h.func for h in router.handlers()] == [sync, coro]


@pytest.mark.parametrize("event", ["", None, 5])
def test_event_name_must_be_a_non_empty_string(event: object) -> None:
    with pytest.raises(TypeError):
        Router().on(event)  # type: ignore[arg-type]


def test_handler_must_be_callable() -> None:
    with pytest.raises(TypeError):
        Router().on("run.completed")("not callable")  # type: ignore[type-var]


def test_order_is_registration_order_and_includes_run_in_place() -> None:
    order: list[str] = []
    receiver = Receiver(secret=SECRET)
    early, late = Router(), Router()

    @receiver.on("run.completed")
    def first(event: Any) -> None:
        order.append("first")

    receiver.include(early)

    @receiver.on("*")
    def third(event: Any) -> None:
        order.append("third")

    receiver.include(late)

    # Registered on the routers after they were included: they still run at their place.
    @early.on("run.completed")
    def second(event: Any) -> None:
        order.append("second")

    @late.on("run.completed")
    def fourth(event: Any) -> None:
        order.append("fourth")

    assert deliver(receiver, make_event("run.completed")) == 200
    assert order == ["first", "second", "third", "fourth"]


def test_router_constructor_merges_routers_in_order() -> None:
    order: list[str] = []
    a, b = Router(), Router()
    a.on("run.failed", name="a")(lambda event: order.append("a"))
    b.on("run.failed", name="b")(lambda event: order.append("b"))
    merged = Router(b, a)
    receiver = Receiver(secret=SECRET)
    receiver.include(merged)
    receiver.dispatch(make_event("run.failed"))
    assert order == ["b", "a"]


def test_include_cycles_are_refused() -> None:
    a, b = Router(), Router()
    a.include(b)
    with pytest.raises(ValueError):
        b.include(a)
    with pytest.raises(ValueError):
        a.include(a)


def test_same_function_twice_for_one_event_needs_names_then_runs_twice() -> None:
    calls: list[str] = []
    receiver = Receiver(secret=SECRET)

    def handler(event: Any) -> None:
        calls.append(event.data.run_id)

    receiver.on("run.completed")(handler)
    with pytest.raises(ConfigurationError, match="name="):
        receiver.on("run.completed")(handler)
    receiver.on("run.completed", name="handler-again")(handler)
    ids = [h.id for h in receiver.handlers()]
    assert ids == [f"{__name__}.{handler.__qualname__}", "handler-again"]
    assert deliver(receiver, make_event("run.completed", run_id="run_twice")) == 200
    assert calls == ["run_twice", "run_twice"]


@pytest.mark.parametrize(
    ("filters", "reached"),
    [
        ({"agent_id": "agent_a"}, True),
        ({"agent_id": "agent_b"}, False),
        ({"agent_name": "Profiler"}, True),
        ({"agent_name": "profiler"}, False),
        ({"agent_id": "agent_a", "agent_name": "Profiler"}, True),
        ({"agent_id": "agent_a", "agent_name": "Other"}, False),
    ],
)
@pytest.mark.parametrize("name", ["run.completed", "run.failed", "run.cancelled"])
def test_agent_filters(filters: dict[str, str], reached: bool, name: str) -> None:
    calls: list[Any] = []
    receiver = Receiver(secret=SECRET)
    receiver.on(name, **filters, known=name != "run.cancelled")(calls.append)
    receiver.on("*", **filters, name="every")(calls.append)
    event = make_event(name, agent_id="agent_a", agent_name="Profiler")
    assert deliver(receiver, event) == 200
    assert len(calls) == (2 if reached else 0)


def test_typed_output_by_annotation() -> None:
    seen: list[Any] = []
    receiver = Receiver(secret=SECRET)

    @receiver.on("run.completed")
    def profiled(event: RunCompleted[LeadProfile]) -> None:
        seen.append(event.data.output)

    assert deliver(receiver, make_event("run.completed")) == 200
    assert isinstance(seen[0], LeadProfile)
    assert seen[0].buying_triggers == ["Scaling team", "New product launch"]


def test_typed_output_by_argument_and_untyped_neighbours() -> None:
    seen: list[Any] = []
    receiver = Receiver(secret=SECRET)
    receiver.on("run.completed", output=LeadProfile)(lambda e: seen.append(e.data.output))
    receiver.on("run.completed", name="untyped")(lambda e: seen.append(e.data.output))
    receiver.on("*", output=LeadProfile, name="every")(lambda e: seen.append(e))
    assert deliver(receiver, make_event("run.completed")) == 200
    assert isinstance(seen[0], LeadProfile)
    assert isinstance(seen[1], dict)
    assert seen[2].data.output == seen[0]
    # Other events reach a handler with output= unchanged.
    seen.clear()
    assert deliver(receiver, make_event("run.failed")) == 200
    (failed,) = seen
    assert isinstance(failed, RunFailed)


def test_output_mismatch_is_a_500_and_names_no_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="flymy_receiver")
    before: list[str] = []
    typed: list[Any] = []
    receiver = Receiver(secret=SECRET)
    receiver.on("run.completed")(lambda e: before.append(e.data.run_id))
    receiver.on("run.completed", output=LeadProfile)(typed.append)
    event = make_event("run.completed", output={"background": "x", "buying_triggers": "SECRETIVE"})
    request = signed_request(event, SECRET)
    response = receiver.handle(request.body, request.headers)
    assert (response.status, response.body) == (500, b'{"error":"Handler failed"}')
    assert typed == []
    assert len(before) == 1
    assert "buying_triggers" in caplog.text
    # On redelivery the untyped handler that succeeded is not run again.
    assert receiver.handle(request.body, request.headers).status == 500
    assert len(before) == 1
    with pytest.raises(OutputMismatch):
        receiver.dispatch(event)


def test_unresolvable_annotation_is_refused_at_registration() -> None:
    receiver = Receiver(secret=SECRET)

    def handler(event: RunCompleted[NotDefinedAnywhere]) -> None:  # type: ignore[name-defined]  # noqa: F821
        raise AssertionError("never registered")

    with pytest.raises(ConfigurationError, match="output=Model") as info:
        receiver.on("run.completed")(handler)
    assert "NotDefinedAnywhere" in str(info.value)
    assert list(receiver.handlers()) == []


def sync_and_async_receiver() -> tuple[Receiver, list[str]]:
    calls: list[str] = []
    receiver = Receiver(secret=SECRET)

    @receiver.on("run.failed")
    def sync(event: RunFailed) -> None:
        calls.append("sync")

    @receiver.on("run.failed")
    async def coro(event: RunFailed) -> None:
        await asyncio.sleep(0)
        calls.append("async")

    return receiver, calls


def test_sync_and_async_handlers_through_handle_and_ahandle() -> None:
    receiver, calls = sync_and_async_receiver()
    request = signed_request(make_event("run.failed"), SECRET)
    assert receiver.handle(request.body, request.headers).status == 200
    request = signed_request(make_event("run.failed"), SECRET)
    assert asyncio.run(receiver.ahandle(request.body, request.headers)).status == 200
    assert calls == ["sync", "async", "sync", "async"]


def test_async_handler_through_handle_inside_a_running_loop() -> None:
    # A sync view called from async code (e.g. a sync adapter under an ASGI server's thread
    # that has a loop) must still run async handlers.
    receiver, calls = sync_and_async_receiver()
    request = signed_request(make_event("run.failed"), SECRET)

    async def inside_loop() -> int:
        return receiver.handle(request.body, request.headers).status

    assert asyncio.run(inside_loop()) == 200
    assert calls == ["sync", "async"]


def test_dispatch_and_adispatch_run_handlers_and_raise_what_they_raise() -> None:
    receiver, calls = sync_and_async_receiver()
    receiver.dispatch(make_event("run.failed"))
    asyncio.run(receiver.adispatch(make_event("run.failed")))
    assert calls == ["sync", "async", "sync", "async"]

    @receiver.on("run.failed")
    async def broken(event: Any) -> None:
        raise LookupError("from the handler")

    with pytest.raises(LookupError):
        receiver.dispatch(make_event("run.failed"))
    with pytest.raises(LookupError):
        asyncio.run(receiver.adispatch(make_event("run.failed")))
