"""Registration refuses what would silently drop events (DESIGN section 12): an unknown
event name (with a "did you mean"), an annotation that contradicts the event, a handler
that cannot take exactly one event. The messages are part of the contract."""

from __future__ import annotations

from typing import Any

import pytest

from flymy_receiver import Receiver, Router, RunCompleted, RunFailed, UnknownEvent
from flymy_receiver.errors import ConfigurationError
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET


def _message(register: Any) -> str:
    with pytest.raises(ConfigurationError) as caught:
        register()
    return str(caught.value)


def test_a_typo_in_the_event_name_is_refused_with_did_you_mean() -> None:
    router = Router()
    message = _message(lambda: router.on("run.complete")(lambda event: None))
    assert message == (
        "unknown event name 'run.complete': did you mean 'run.completed'? The platform sends"
        " 'run.completed', 'run.failed' ('*' for every event). For an event it may add later,"
        " register with on(..., known=False)"
    )
    message = _message(lambda: router.on("deployment.finished")(lambda event: None))
    assert message == (
        "unknown event name 'deployment.finished': The platform sends 'run.completed',"
        " 'run.failed' ('*' for every event). For an event it may add later, register with"
        " on(..., known=False)"
    )


def test_known_false_accepts_an_event_the_platform_may_add() -> None:
    receiver = Receiver(SECRET)
    seen: list[str] = []

    @receiver.on("run.cancelled", known=False)
    def cancelled(event: UnknownEvent) -> None:
        seen.append(event.event)

    req = signed_request(make_event("run.cancelled"), SECRET)
    assert receiver.handle(req.body, req.headers).status == 200
    assert seen == ["run.cancelled"]


def test_an_annotation_that_contradicts_the_event_is_refused() -> None:
    router = Router()

    def on_completed(event: RunFailed) -> None: ...

    message = _message(lambda: router.on("run.completed", name="h")(on_completed))
    assert message == (
        "handler h is registered for 'run.completed' but its event is annotated 'RunFailed':"
        " 'run.completed' events arrive as RunCompleted. Register it for the event it expects,"
        " or annotate the event it gets"
    )

    def on_failed(event: RunCompleted[dict[str, Any]]) -> None: ...

    message = _message(lambda: router.on("run.failed", name="g")(on_failed))
    assert "'run.failed' events arrive as RunFailed" in message


@pytest.mark.parametrize(
    ("event", "annotation"),
    [
        ("run.completed", RunCompleted),
        ("run.completed", RunCompleted | RunFailed),
        ("run.failed", RunFailed),
        ("*", RunFailed),
        ("run.completed", Any),
        ("run.completed", object),
    ],
)
def test_annotations_that_fit_are_accepted(event: str, annotation: Any) -> None:
    def handler(event: Any) -> None: ...

    handler.__annotations__ = {"event": annotation}
    Router().on(event, name="fits")(handler)


def test_a_handler_that_cannot_take_one_event_is_refused() -> None:
    router = Router()

    def two(event: Any, crm: Any) -> None: ...

    message = _message(lambda: router.on("run.completed", name="two")(two))
    assert message == (
        "handler two cannot be called with one event: its signature is (event: 'Any', crm:"
        " 'Any') -> 'None'. A handler takes exactly one argument, the event (give any other"
        " parameter a default)"
    )

    def none() -> None: ...

    assert "cannot be called with one event" in _message(
        lambda: router.on("run.completed", name="none")(none)
    )


def test_handlers_with_defaults_or_builtins_are_accepted() -> None:
    calls: list[Any] = []

    def with_default(event: Any, retries: int = 3) -> None: ...

    router = Router()
    router.on("run.completed", name="a")(with_default)
    router.on("run.completed", name="b")(calls.append)
    router.on("run.completed", name="c")(lambda *args: None)
