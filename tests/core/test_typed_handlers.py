"""A typed handler gets what it annotated: an aware timestamp, and its model even when the
handler and the model live inside a function (an app factory).

This module uses ``from __future__ import annotations`` on purpose: every annotation below
is a string until the receiver resolves it.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.errors import ConfigurationError
from flymy_receiver.signature import SIGNATURE_HEADER, sign
from flymy_receiver.testing import make_event
from tests.conftest import SECRET

if TYPE_CHECKING:
    from decimal import Decimal  # never importable at run time from here


class Lead(BaseModel):
    background: str


def naive_body(run_id: str = "run_naive") -> bytes:
    payload = make_event("run.completed", run_id=run_id, output={"background": "x"}).model_dump(
        mode="json"
    )
    payload["timestamp"] = "2025-01-15T10:00:15"  # no zone
    return json.dumps(payload).encode()


def deliver(receiver: Receiver, body: bytes) -> int:
    return receiver.handle(body, {SIGNATURE_HEADER: sign(body, SECRET)}).status


def test_a_naive_timestamp_is_aware_utc_for_typed_and_untyped_handlers() -> None:
    seen: dict[str, datetime] = {}
    ages: list[timedelta] = []
    receiver = Receiver(secret=SECRET, max_age=None)

    @receiver.on("run.completed", output=Lead)
    def by_output(event: Any) -> None:
        seen["output="] = event.timestamp
        ages.append(datetime.now(timezone.utc) - event.timestamp)  # raised on a naive one

    @receiver.on("run.completed")
    def by_annotation(event: RunCompleted[Lead]) -> None:
        seen["annotation"] = event.timestamp

    @receiver.on("run.completed")
    def untyped(event: RunCompleted[Any]) -> None:
        seen["untyped"] = event.timestamp

    assert deliver(receiver, naive_body()) == 200
    expected = datetime(2025, 1, 15, 10, 0, 15, tzinfo=timezone.utc)
    assert seen == {"output=": expected, "annotation": expected, "untyped": expected}
    assert all(ts.utcoffset() == timedelta(0) for ts in seen.values())
    assert len(ages) == 1


def test_a_timestamp_with_an_offset_keeps_it() -> None:
    event = RunCompleted[Lead].model_validate(
        {
            "timestamp": "2025-01-15T12:00:15+02:00",
            "data": {
                "run_id": "r",
                "agent_id": "a",
                "status": "done",
                "output": {"background": ""},
            },
        }
    )
    assert event.timestamp.utcoffset() == timedelta(hours=2)


def create_app() -> tuple[Receiver, list[Any]]:
    """An app factory: the model and an import exist only inside it."""
    from pydantic import BaseModel as LocalBase

    class Profile(LocalBase):
        background: str

    receiver = Receiver(secret=SECRET, max_age=None)
    seen: list[Any] = []

    @receiver.on("run.completed")
    def profiled(event: RunCompleted[Profile]) -> None:
        seen.append(event.data.output)

    return receiver, seen


def test_annotations_resolve_from_the_scope_that_defined_the_handler() -> None:
    receiver, seen = create_app()
    assert deliver(receiver, naive_body()) == 200
    (output,) = seen
    assert type(output).__name__ == "Profile"
    assert output.background == "x"


def test_annotations_resolve_from_closure_variables() -> None:
    def make(model: type[BaseModel]) -> tuple[Receiver, list[Any]]:
        receiver = Receiver(secret=SECRET, max_age=None)
        seen: list[Any] = []
        Model = model  # a name the annotation uses

        def handler(event: RunCompleted[Model]) -> None:  # type: ignore[valid-type]
            seen.append((Model, event.data.output))

        receiver.on("run.completed")(handler)
        return receiver, seen

    receiver, seen = make(Lead)
    assert deliver(receiver, naive_body()) == 200
    assert isinstance(seen[0][1], Lead)


def test_an_annotation_only_imported_for_type_checking_is_refused_at_registration() -> None:
    receiver = Receiver(secret=SECRET)

    def handler(event: RunCompleted[Decimal]) -> None: ...

    with pytest.raises(ConfigurationError, match="Decimal"):
        receiver.on("run.completed")(handler)


def test_a_model_defined_after_the_handler_is_refused_at_registration() -> None:
    def factory() -> None:
        receiver = Receiver(secret=SECRET)

        @receiver.on("run.completed")
        def handler(event: RunCompleted[Later]) -> None: ...

        class Later(BaseModel):
            x: int

    with pytest.raises(ConfigurationError, match="output=Model"):
        factory()


def test_only_the_event_parameter_annotation_must_resolve() -> None:
    receiver = Receiver(secret=SECRET, max_age=None)
    seen: list[Any] = []

    @receiver.on("run.completed")
    def handler(event: RunCompleted[Lead], extra: Decimal | None = None) -> Decimal | None:
        seen.append(event.data.output)
        return None

    assert deliver(receiver, naive_body()) == 200
    assert isinstance(seen[0], Lead)
