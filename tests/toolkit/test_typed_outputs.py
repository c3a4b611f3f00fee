"""Typed outputs per agent (examples/typed_outputs.py): filters, models and a mismatch."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

from flymy_receiver import Receiver, RunCompleted
from flymy_receiver.stores import MemoryStore
from flymy_receiver.testing import dispatch, make_event, signed_request
from tests.conftest import SECRET
from tests.servers import EXAMPLES, PYTHON, ROOT


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import typed_outputs

    typed_outputs.received.clear()
    yield typed_outputs
    typed_outputs.received.clear()


def _deliver(receiver: Receiver, event: Any) -> Any:
    req = signed_request(event, SECRET)
    return receiver.handle(req.body, req.headers)


def test_each_agent_reaches_its_own_handler_with_its_own_model(example: ModuleType) -> None:
    receiver = example.make_receiver(SECRET)
    profile = make_event("run.completed", agent_id=example.PROFILER_ID)
    score = make_event(
        "run.completed", agent_id="agent_x", agent_name=example.SCORER_NAME, output={"score": 5}
    )
    failure = make_event("run.failed", agent_id=example.PROFILER_ID)
    other_agent = make_event("run.completed", agent_id="agent_y", agent_name="Someone Else")
    for event in (profile, score, failure, other_agent):
        assert _deliver(receiver, event).status == 200
    kinds = [kind for kind, _ in example.received]
    assert kinds == ["profile", "audit", "score", "audit", "failure", "audit", "audit"]
    assert isinstance(example.received[0][1], example.LeadProfile)
    assert example.received[2][1] == example.LeadScore(score=5)


def test_output_mismatch_is_a_500_logged_with_the_raw_output_then_retried(
    example: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    receiver = example.make_receiver(SECRET, store=store)
    output = {"score": 870, "reasons": ["secret-sauce"]}
    event = make_event(
        "run.completed", agent_id="agent_x", agent_name=example.SCORER_NAME, output=output
    )
    req = signed_request(event, SECRET)
    with caplog.at_level(logging.ERROR, logger="flymy_receiver"):
        response = receiver.handle(req.body, req.headers)
    assert (response.status, response.body) == (500, b'{"error":"Handler failed"}')
    assert example.received == []  # the mismatched handler did not run, nor the ones after it
    (record,) = [r for r in caplog.records if hasattr(r, "flymy_output")]
    assert record.flymy_output == output
    assert record.flymy_handler.endswith("lead_scored")
    assert record.flymy_run_id == event.data.run_id
    message = record.getMessage()
    assert "RunCompleted[LeadScore]" in message
    assert "data.output.score" in message
    assert "870" not in message  # field names only: values stay in flymy_output
    assert record.exc_info is None  # a data problem, not a bug: no traceback
    assert _deliver(receiver, event).status == 500  # still not recorded as done

    # The model is fixed and deployed: the platform's retry of the same delivery goes through.
    class LeadScore(BaseModel):
        score: int
        reasons: list[str] = []

    fixed = Receiver(SECRET, store=store)
    seen: list[LeadScore] = []

    # A model defined in a function cannot be found from the annotation: output= names it.
    @fixed.on("run.completed", agent_name=example.SCORER_NAME, output=LeadScore)
    def lead_scored(event: RunCompleted[LeadScore]) -> None:
        seen.append(event.data.output)

    assert fixed.handle(req.body, req.headers).status == 200
    assert seen == [LeadScore(score=870, reasons=["secret-sauce"])]
    assert fixed.handle(req.body, req.headers).body == b'{"received":true,"duplicate":true}'


def test_a_handler_that_succeeded_before_a_mismatch_is_not_rerun() -> None:
    class Strict(BaseModel):
        score: int

    receiver = Receiver(SECRET)
    calls: list[str] = []
    receiver.on("*")(lambda event: calls.append("audit"))

    @receiver.on("run.completed", output=Strict)
    def strict(event: RunCompleted[Strict]) -> None:
        calls.append("strict")

    event = make_event("run.completed", output={"score": "high"})
    assert _deliver(receiver, event).status == 500
    assert _deliver(receiver, event).status == 500
    assert calls == ["audit"]  # the audit ran once, and is not run again on the retry


def test_direct_dispatch_uses_the_same_models(example: ModuleType) -> None:
    event = make_event(
        "run.completed", agent_id="agent_x", agent_name=example.SCORER_NAME, output={"score": 9}
    )
    ran = dispatch(example.router, event)
    assert [name.rsplit(".", 1)[1] for name in ran] == ["lead_scored", "audit"]
    assert example.received[0] == ("score", example.LeadScore(score=9))


def test_the_example_runs_as_a_script() -> None:
    result = subprocess.run(
        [PYTHON, str(EXAMPLES / "typed_outputs.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    statuses = [line.split(": ")[1].split()[0] for line in result.stdout.splitlines()[:3]]
    assert statuses == ["200", "200", "500"]
    assert 'raw output: {"score": 870}' in result.stderr
