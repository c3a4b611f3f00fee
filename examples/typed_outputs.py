"""Typed outputs per agent: each agent's output gets its own pydantic model.

Every agent returns its own JSON ``output``. Annotate a handler with
``RunCompleted[YourModel]`` (or pass ``output=YourModel`` to ``on()``) and
``event.data.output`` arrives validated as that model. ``agent_id=`` / ``agent_name=``
restrict a handler to one agent's runs, so each model only ever sees its own agent's output.

When an output does not match its model, the handler is not run, the receiver answers 500
(nothing is recorded as done, so the platform retries; once the model is fixed and
deployed, the retry goes through), and the error is logged with the field names that failed
and the raw output in the record's ``flymy_output`` attribute.

Run the demonstration: ``python examples/typed_outputs.py``
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, Field

from flymy_receiver import Receiver, Router, RunCompleted, RunFailed

PROFILER_ID = "agent_abc123"  # "Sales Lead Profiler"
SCORER_NAME = "Lead Scorer"


class LeadProfile(BaseModel):
    """The Sales Lead Profiler's output."""

    background: str
    buying_triggers: list[str]
    outreach_angle: str


class LeadScore(BaseModel):
    """The Lead Scorer's output."""

    score: int = Field(ge=0, le=100)
    reasons: list[str] = []


#: Stand-in for your database: what the handlers below received, in order.
received: list[tuple[str, Any]] = []

router = Router()


@router.on("run.completed", agent_id=PROFILER_ID)
def lead_profiled(event: RunCompleted[LeadProfile]) -> None:
    """Only the profiler's runs; ``output`` is a validated ``LeadProfile``."""
    received.append(("profile", event.data.output))


@router.on("run.completed", agent_name=SCORER_NAME, output=LeadScore)
def lead_scored(event: RunCompleted[LeadScore]) -> None:
    """Only the scorer's runs; ``output=`` does what the annotation does, explicitly."""
    received.append(("score", event.data.output))


@router.on("run.failed", agent_id=PROFILER_ID)
def profiler_failed(event: RunFailed) -> None:
    """A failed run has no output, only ``data.error``."""
    received.append(("failure", event.data.error))


@router.on("*")
def audit(event: Any) -> None:
    """Every authentic event, of any agent and any event name, untyped."""
    received.append(("audit", event.event))


def make_receiver(secret: str | list[str] | None = None, **options: Any) -> Receiver:
    """A receiver with the handlers above (the secret defaults to FLYMY_WEBHOOK_SECRET)."""
    receiver = Receiver(secret, **options)
    receiver.include(router)
    return receiver


class RawOutputInLog(logging.Filter):
    """Appends the raw output to a handler-failure log line (most log setups drop extras)."""

    def filter(self, record: logging.LogRecord) -> bool:
        output = getattr(record, "flymy_output", None)
        if output is not None:
            record.msg = f"{record.getMessage()} | raw output: {json.dumps(output)[:500]}"
            record.args = ()
        return True


def main() -> None:
    """Deliver three signed events to the receiver, as the platform would."""
    from flymy_receiver.testing import make_event, signed_request

    handler = logging.StreamHandler()
    handler.addFilter(RawOutputInLog())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", handlers=[handler])
    secret = "whsec-demo"
    receiver = make_receiver(secret)
    events = {
        "profiler, matching output": make_event("run.completed", agent_id=PROFILER_ID),
        "scorer, matching output": make_event(
            "run.completed", agent_id="agent_sc0re", agent_name=SCORER_NAME, output={"score": 87}
        ),
        "scorer, output off the model": make_event(
            "run.completed", agent_id="agent_sc0re", agent_name=SCORER_NAME, output={"score": 870}
        ),
    }
    for label, event in events.items():
        request = signed_request(event, secret)
        response = receiver.handle(request.body, request.headers)
        print(f"{label}: {response.status} {response.body.decode()}")
    for kind, value in received:
        print(f"  received {kind}: {value!r}")


if __name__ == "__main__":
    main()
