"""flymy_receiver.testing: event factories, negative builders and direct dispatch (no framework)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel

from flymy_receiver import (
    OutputMismatch,
    Receiver,
    Router,
    RunCompleted,
    RunFailed,
    UnknownEvent,
    sign,
)
from flymy_receiver.events import MAX_DEPTH
from flymy_receiver.testing import (
    SignedRequest,
    adispatch,
    dispatch,
    make_event,
    reserialized_request,
    rotated_out_request,
    serialize,
    signed_request,
    stale_request,
    tampered_request,
    unsigned_request,
    wrong_secret_request,
)
from tests.conftest import SECRET


class LeadProfile(BaseModel):
    background: str
    buying_triggers: list[str]
    outreach_angle: str


def _receiver(**kwargs: Any) -> tuple[Receiver, list[Any]]:
    receiver = Receiver(secret=kwargs.pop("secret", SECRET), **kwargs)
    calls: list[Any] = []
    receiver.on("*")(calls.append)
    return receiver, calls


# -- make_event ---------------------------------------------------------------------------


def test_make_event_builds_each_documented_event_with_fresh_ids() -> None:
    completed = make_event("run.completed")
    failed = make_event("run.failed")
    other = make_event("run.cancelled", reason="user")
    assert isinstance(completed, RunCompleted)
    assert isinstance(failed, RunFailed)
    assert isinstance(other, UnknownEvent)
    assert other.event == "run.cancelled"
    assert other.data["reason"] == "user"
    assert completed.data.status == "done"
    assert failed.data.error.type == "tool_error"
    assert completed.data.run_id != make_event("run.completed").data.run_id
    age = datetime.now(timezone.utc) - completed.timestamp
    assert timedelta(0) <= age < timedelta(minutes=1)


def test_make_event_overrides_every_field() -> None:
    when = datetime(2025, 1, 15, 10, 0, 15, tzinfo=timezone.utc)
    event = make_event(
        "run.completed",
        run_id=42,
        agent_id="agent_x",
        agent_name=None,
        status="done-ish",
        duration_ms=1,
        input={"q": 1},
        output=[1, 2],
        timestamp=when,
        region="eu",
    )
    assert event.data.run_id == "42"  # an integer run id is accepted, handlers see a string
    assert event.data.agent_id == "agent_x"
    assert event.data.agent_name is None
    assert (event.data.status, event.data.duration_ms) == ("done-ish", 1)
    assert event.data.input == {"q": 1}
    assert event.data.output == [1, 2]
    assert event.timestamp == when
    assert event.model_dump()["data"]["region"] == "eu"
    failed = make_event("run.failed", error={"type": "timeout", "message": "slow"})
    assert (failed.data.error.type, failed.data.error.message) == ("timeout", "slow")


def test_make_event_with_a_model_output_is_typed() -> None:
    profile = LeadProfile(background="b", buying_triggers=["t"], outreach_angle="o")
    event = make_event("run.completed", output=profile)
    assert isinstance(event.data.output, LeadProfile)
    assert event.data.output == profile
    # And it serialises to what the platform sends: a plain JSON object.
    assert json.loads(serialize(event))["data"]["output"]["buying_triggers"] == ["t"]


def test_make_event_defaults_are_not_shared_between_events() -> None:
    first = make_event("run.completed")
    first.data.output["buying_triggers"].append("mutated by a handler")
    first.data.input["name"] = "someone else"
    second = make_event("run.completed")
    assert "mutated by a handler" not in second.data.output["buying_triggers"]
    assert second.data.input["name"] == "Dana Lee"


def test_make_event_refuses_an_invalid_override() -> None:
    from flymy_receiver import MalformedEvent

    with pytest.raises(MalformedEvent):
        make_event("run.failed", error="not an object")


# -- signed_request and the receiver agree -------------------------------------------------


def test_signed_request_is_accepted_and_matches_the_known_answer() -> None:
    receiver, calls = _receiver()
    req = signed_request(make_event("run.completed"), SECRET)
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["X-FlyMyAI-Signature"] == sign(req.body, SECRET)
    response = receiver.handle(req.body, req.headers)
    assert (response.status, response.body) == (200, b'{"received":true}')
    assert len(calls) == 1
    known = signed_request(b"Hello, World!", "It's a Secret to Everybody")
    assert known.headers["X-FlyMyAI-Signature"] == (
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


@pytest.mark.parametrize(
    ("depth", "status"), [(10, 200), (MAX_DEPTH - 5, 200), (300, 400), (900, 400)]
)
def test_an_event_nested_at_any_depth_is_serialised(depth: int, status: int) -> None:
    # pydantic serialises about 254 levels: deeper events (to test the receiver's 400) are
    # written by the standard encoder.
    output: Any = "leaf"
    for _ in range(depth):
        output = [output]
    event = make_event("run.completed", output=output)
    req = signed_request(event, SECRET)
    assert json.loads(req.body)["timestamp"] == event.timestamp.isoformat().replace("+00:00", "Z")
    receiver = Receiver(secret=SECRET)
    assert receiver.handle(req.body, req.headers).status == status


def test_signed_request_keeps_exact_bytes_and_reads_the_env_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYMY_WEBHOOK_SECRET", "from-env")
    pretty = b'{\n  "event": "run.cancelled",\n  "timestamp": "2030-01-01T00:00:00Z"\n}'
    req = signed_request(pretty)
    assert req.body == pretty
    assert req.headers["X-FlyMyAI-Signature"] == sign(pretty, "from-env")
    assert req.json()["event"] == "run.cancelled"
    custom = signed_request({"a": 1}, "k", headers={"X-Extra": "1"})
    assert (custom.body, custom.headers["X-Extra"]) == (b'{"a":1}', "1")


# -- negative builders: each is refused, no handler runs -------------------------------------


@pytest.mark.parametrize(
    ("build", "status"),
    [
        (lambda e: tampered_request(e, SECRET), 401),
        (lambda e: wrong_secret_request(e), 401),
        (lambda e: rotated_out_request(e, "whsec-old", current=[SECRET]), 401),
        (lambda e: reserialized_request(e, SECRET), 401),
        (lambda e: unsigned_request(e), 401),
        (lambda e: stale_request(e, SECRET), 400),
    ],
    ids=["tampered", "wrong-secret", "rotated-out", "reserialized", "unsigned", "stale"],
)
def test_negative_builders_are_refused(build: Any, status: int) -> None:
    receiver, calls = _receiver()
    event = make_event("run.completed")
    req = build(event)
    assert isinstance(req, SignedRequest)
    response = receiver.handle(req.body, req.headers)
    assert response.status == status
    assert calls == []
    # The same event, properly signed, goes through: the builder broke only one thing.
    good = signed_request(event, SECRET)
    assert receiver.handle(good.body, good.headers).status == 200
    assert len(calls) == 1


def test_tampered_and_reserialized_bodies_still_parse_as_json() -> None:
    event = make_event("run.completed")
    reserialized = reserialized_request(event, SECRET)
    assert json.loads(reserialized.body) == json.loads(serialize(event))
    assert reserialized.headers == signed_request(event, SECRET).headers
    assert tampered_request(event, SECRET).body != serialize(event)
    assert tampered_request(b"", SECRET).body != b""


def test_rotated_out_request_is_accepted_while_the_old_secret_is_still_listed() -> None:
    event = make_event("run.completed")
    req = rotated_out_request(event, "whsec-old", current=["whsec-new"])
    during_rotation, _ = _receiver(secret=["whsec-new", "whsec-old"])
    after_rotation, _ = _receiver(secret=["whsec-new"])
    assert during_rotation.handle(req.body, req.headers).status == 200
    assert after_rotation.handle(req.body, req.headers).status == 401
    with pytest.raises(ValueError, match="still one of the current"):
        rotated_out_request(event, "whsec-old", current=["whsec-new", "whsec-old"])


def test_stale_request_respects_age_and_the_window_switch() -> None:
    req = stale_request("run.failed", SECRET, age=timedelta(hours=2))
    assert json.loads(req.body)["event"] == "run.failed"
    tight, _ = _receiver(max_age=timedelta(hours=1))
    off, calls = _receiver(max_age=None)
    assert tight.handle(req.body, req.headers).status == 400
    assert off.handle(req.body, req.headers).status == 200
    assert len(calls) == 1
    event = make_event("run.completed", run_id="run_keep")
    assert json.loads(stale_request(event, SECRET).body)["data"]["run_id"] == "run_keep"


# -- direct dispatch ------------------------------------------------------------------------


def test_dispatch_runs_matching_handlers_in_order_with_typed_outputs() -> None:
    router = Router()
    seen: list[tuple[str, Any]] = []

    @router.on("run.completed", agent_name="Sales Lead Profiler")
    def profiled(event: RunCompleted[LeadProfile]) -> None:
        seen.append(("profiled", event.data.output))

    @router.on("run.completed", agent_id="agent_other")
    def other_agent(event: RunCompleted) -> None:
        seen.append(("other", event))

    @router.on("*")
    async def audit(event: Any) -> None:
        await asyncio.sleep(0)
        seen.append(("audit", event.event))

    ran = dispatch(router, make_event("run.completed"))
    assert [name for name, _ in seen] == ["profiled", "audit"]
    assert isinstance(seen[0][1], LeadProfile)
    assert ran == [f"{__name__}.{f.__qualname__}" for f in (profiled, audit)]
    seen.clear()
    assert asyncio.run(adispatch(router, make_event("run.failed"))) == [ran[1]]
    assert seen == [("audit", "run.failed")]


def test_dispatch_raises_what_handlers_raise_and_output_mismatch() -> None:
    router = Router()

    @router.on("run.completed")
    def typed(event: RunCompleted[LeadProfile]) -> None:
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError, match="handler bug"):
        dispatch(router, make_event("run.completed"))
    with pytest.raises(OutputMismatch, match="LeadProfile"):
        dispatch(router, make_event("run.completed", output={"background": 1}))
    with pytest.raises(OutputMismatch):
        asyncio.run(adispatch(router, make_event("run.completed", output=None)))


def test_data_fields_map_one_json_value_to_each_event_kind() -> None:
    from flymy_receiver.testing import data_fields

    assert data_fields("run.completed", {"score": 3}) == {"output": {"score": 3}}
    assert data_fields("run.failed", {"type": "x"}) == {"error": {"type": "x"}}
    assert data_fields("run.cancelled", {"reason": "user"}) == {"reason": "user"}
    with pytest.raises(ValueError, match="must be a JSON object"):
        data_fields("run.cancelled", [1, 2])
