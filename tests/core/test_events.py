"""Parsing and validating bodies into typed events: what the adapter contract does not reach."""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flymy_receiver import MalformedEvent, RunCompleted, RunFailed, UnknownEvent, parse_event
from flymy_receiver.events import MAX_DEPTH, MAX_NUMBER_DIGITS, parse_json, validate_event
from tests.contract import DOC_COMPLETED, DOC_FAILED


class LeadProfile(BaseModel):
    background: str
    buying_triggers: list[str]
    outreach_angle: str


def envelope(name: str = "run.failed", **data: Any) -> dict[str, Any]:
    base = {"run_id": "run_1", "agent_id": "agent_1", "error": {"type": "tool_error"}}
    return {"event": name, "timestamp": "2025-01-15T10:00:15Z", "data": {**base, **data}}


def test_documented_examples() -> None:
    completed, raw = parse_event(DOC_COMPLETED)
    assert isinstance(completed, RunCompleted)
    assert raw["data"]["output"]["background"] == "VP of Engineering at Acme Robotics..."
    failed, _ = parse_event(DOC_FAILED)
    assert isinstance(failed, RunFailed)
    assert failed.data.error.message == "web_search returned no results for query"


def test_output_typed_by_parametrised_model() -> None:
    typed = RunCompleted[LeadProfile].model_validate_json(DOC_COMPLETED)
    assert isinstance(typed.data.output, LeadProfile)
    assert typed.data.output.buying_triggers == ["Scaling team", "New product launch"]


def test_optional_fields_may_be_missing() -> None:
    event = validate_event(
        {
            "event": "run.completed",
            "timestamp": "2025-01-15T10:00:15Z",
            "data": {"run_id": 5, "agent_id": "a"},
        }
    )
    assert isinstance(event, RunCompleted)
    assert (event.data.run_id, event.data.status, event.data.output) == ("5", "done", None)
    assert (event.data.agent_name, event.data.duration_ms, event.data.input) == (None, None, None)


def test_naive_timestamp_is_read_as_utc() -> None:
    event = validate_event({**envelope(), "timestamp": "2025-01-15T10:00:15"})
    assert event.timestamp.tzinfo is not None
    assert event.timestamp.utcoffset() == timezone.utc.utcoffset(None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"run_id": True}, "run_id"),
        ({"run_id": 1.5}, "run_id"),
        ({"agent_id": None}, "agent_id"),
        ({"error": "boom"}, "error"),
        ({"duration_ms": "soon"}, "duration_ms"),
    ],
)
def test_envelope_errors_name_the_field_not_the_value(change: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedEvent) as info:
        validate_event(envelope(**change))
    assert info.value.code == "invalid_envelope"
    assert field in info.value.detail
    for value in change.values():
        if isinstance(value, str):
            assert value not in info.value.detail


@pytest.mark.parametrize("name", [5, None, ["run.completed"]])
def test_event_name_must_be_a_string(name: object) -> None:
    with pytest.raises(MalformedEvent):
        validate_event({**envelope(), "event": name})


def test_unknown_event_keeps_its_data() -> None:
    event = validate_event({"event": "run.cancelled", "timestamp": "2025-01-15T10:00:15Z"})
    assert isinstance(event, UnknownEvent)
    assert (event.data, event.run_id) == ({}, None)
    event = validate_event(envelope("run.paused", run_id=42))
    assert isinstance(event, UnknownEvent)
    assert event.run_id == "42"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),
        (b' \n{"a": 1}\r\n ', {"a": 1}),
        (b'{"a": 1, "a": 2}', {"a": 2}),
        (b'{"a": 18446744073709551615}', {"a": 18446744073709551615}),
        (b'{"a": 18446744073709551616}', {"a": 18446744073709551616}),
        (b'{"a": -9223372036854775809}', {"a": -9223372036854775809}),
        (b'{"a": "12345678901234567890", "b": 0.5}', {"a": "12345678901234567890", "b": 0.5}),
        (b'{"a": 1e308}', {"a": 1e308}),
        (b'{"a": 1e400, "b": -1e999}', {"a": float("inf"), "b": float("-inf")}),
        (
            b'{"a": 1e400, "b": 12345678901234567890}',
            {"a": float("inf"), "b": 12345678901234567890},
        ),
    ],
)
def test_parse_json_choices(body: bytes, expected: Any) -> None:
    result = parse_json(body)
    assert result == expected
    assert [type(v) for v in result.values()] == [type(v) for v in expected.values()]


def test_integers_are_exact_up_to_the_digit_limit_and_refused_past_it() -> None:
    at_limit = "9" * MAX_NUMBER_DIGITS
    value = parse_json(b'{"a": -' + at_limit.encode() + b"}")["a"]
    assert isinstance(value, int)
    assert value == -int(at_limit)
    with pytest.raises(MalformedEvent) as info:
        parse_json(b'{"a": ' + b"9" * (MAX_NUMBER_DIGITS + 1) + b"}")
    assert (info.value.status, info.value.code) == (400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xef\xbb\xbf\xef\xbb\xbf{}", id="two-boms"),
        pytest.param(b'{"a": NaN}', id="nan"),
        pytest.param(b'{"a": "\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"a": "\xff"}', id="invalid-utf8"),
        pytest.param(b'{"a": "\xff", "b": 12345678901234567890}', id="invalid-utf8-long-digits"),
        pytest.param('{"b": 12345678901234567890}'.encode("utf-16"), id="utf16-long-digits"),
        pytest.param(b"{} {}", id="two-documents"),
        pytest.param(b"{}\x00", id="trailing-nul"),
        pytest.param(b"[" * (MAX_DEPTH + 2) + b"]" * (MAX_DEPTH + 2), id="arrays-too-deep"),
        pytest.param(
            b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), id="objects-too-deep"
        ),
        pytest.param(b'{"a": "\\udc00"}', id="lone-low-surrogate"),
        pytest.param(b'{"a": "\\ud800", "b": "12345678901234567890"}', id="surrogate-long-digits"),
        pytest.param(b"[" + b"7" * 1_000_000 + b"]", id="million-digits"),
        pytest.param(b'{"n": 12345678901234567890, "d": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ],
)
def test_parse_json_refusals(body: bytes) -> None:
    with pytest.raises(MalformedEvent) as info:
        parse_json(body)
    assert info.value.code == "invalid_json"
    assert info.value.status == 400


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert len(parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)) == 1
    nested = parse_json(b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH)
    for _ in range(MAX_DEPTH):
        nested = nested["a"]
    assert nested == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_any_json_value_is_an_event_or_a_400(value: Any) -> None:
    body = json.dumps(value).encode()
    try:
        event, raw = parse_event(body)
    except MalformedEvent as exc:
        status = exc.status
    else:
        status = 200
        assert isinstance(event, (RunCompleted, RunFailed, UnknownEvent))
        assert raw == json.loads(body)
    assert status in (200, 400)


@settings(max_examples=200, deadline=None)
@given(data=st.fixed_dictionaries({}, optional={"run_id": json_values, "agent_id": json_values}))
def test_data_field_types_decide_between_event_and_400(data: dict[str, Any]) -> None:
    run_id, agent_id = data.get("run_id"), data.get("agent_id")
    valid = (
        isinstance(agent_id, str)
        and isinstance(run_id, (str, int))
        and not isinstance(run_id, bool)
    )
    body = json.dumps({"event": "run.completed", "timestamp": "2025-01-15T10:00:15Z", "data": data})
    if valid:
        event, _ = parse_event(body.encode())
        assert event.data.run_id == str(run_id)
    else:
        with pytest.raises(MalformedEvent):
            parse_event(body.encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_an_event_or_a_400(body: bytes) -> None:
    try:
        event, _ = parse_event(body)
    except MalformedEvent as exc:
        status = exc.status
    else:
        status = 200
        assert isinstance(event, (RunCompleted, RunFailed, UnknownEvent))
    assert status in (200, 400)
