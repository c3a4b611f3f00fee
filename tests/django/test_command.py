"""``manage.py flymy_journal list|show|replay|refusals``, through call_command."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from tests.conftest import SECRET
from tests.django.conftest import request_for


def run(*args: str) -> str:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("flymy_journal", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def journal(sqlite_alias: str) -> tuple[Receiver, list[bool]]:
    from flymy_receiver.django import DjangoStore

    receiver = Receiver(SECRET, store=DjangoStore())
    broken = [True]

    @receiver.on("run.completed")
    def save(event: RunCompleted) -> None:
        if broken[0] and event.data.run_id.startswith("run_bad"):
            raise RuntimeError("crm is down \x1b[2J")

    for run_id in ("run_bad_1", "run_ok", "run_bad_2"):
        receiver.handle(*request_for(run_id, output={"note": "\x1b]0;title\x07"}))
    return receiver, broken


def test_list_is_a_table_newest_first(journal: Any) -> None:
    lines = run("list").splitlines()
    assert lines[0].split() == [
        "received",
        "(UTC)",
        "state",
        "attempts",
        "event",
        "run",
        "id",
        "agent",
    ]
    assert [line.split()[5] for line in lines[1:]] == ["run_bad_2", "run_ok", "run_bad_1"]
    assert [line.split()[2] for line in lines[1:]] == ["failed", "handled", "failed"]


def test_list_filters_and_json(journal: Any) -> None:
    data = json.loads(run("list", "--failed", "--json"))
    assert [e["run_id"] for e in data["entries"]] == ["run_bad_2", "run_bad_1"]
    assert all(e["state"] == "failed" for e in data["entries"])
    assert (
        json.loads(run("list", "--state", "handled", "--json"))["entries"][0]["run_id"] == "run_ok"
    )
    assert (
        json.loads(run("list", "--since", "1d", "--limit", "1", "--json"))["entries"][0]["run_id"]
        == "run_bad_2"
    )
    assert run("list", "--agent", "agent_nobody") == "no entries\n"


def test_show_prints_outcomes_tracebacks_and_the_body_without_terminal_escapes(
    journal: Any,
) -> None:
    text = run("show", "run_bad_1")
    assert "state     failed" in text
    assert "RuntimeError: crm is down" in text
    assert "Traceback (most recent call last)" in text
    assert '"run_id": "run_bad_1"' in text
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\\u001b]0;title\\u0007" in text  # JSON-escaped in the pretty body
    data = json.loads(run("show", "run_bad_1", "--json"))
    assert data["state"] == "failed"
    assert json.loads(data["body"])["data"]["run_id"] == "run_bad_1"


def test_show_of_an_unknown_entry_is_an_error(journal: Any) -> None:
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="no journal entry"):
        run("show", "run_never_seen")


def test_replay_needs_the_receiver(journal: Any) -> None:
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="FLYMY_RECEIVER"):
        run("replay", "run_bad_1")


def test_replay_one_then_every_failed(journal: Any) -> None:
    from django.core.management import CommandError

    from flymy_receiver.django import register

    receiver, broken = journal
    register(receiver)
    with pytest.raises(CommandError, match="not handled"):
        run("replay", "run_bad_1")  # still broken: it fails again, and says so
    broken[0] = False
    out = run("replay", "run_bad_1")
    assert out.splitlines()[1].split() == ["run_bad_1", "handled"]
    data = json.loads(run("replay", "--failed", "--json"))
    assert [(r["run_id"], r["state"]) for r in data["replayed"]] == [("run_bad_2", "handled")]
    assert run("list", "--failed") == "no entries\n"
    assert run("replay", "--failed") == "no failed entries\n"


def test_refusals(sqlite_alias: str) -> None:
    from flymy_receiver.django import DjangoStore
    from flymy_receiver.testing import make_event, wrong_secret_request

    receiver = Receiver(SECRET, store=DjangoStore())
    forged = wrong_secret_request(make_event("run.completed"))
    assert receiver.handle(forged.body, forged.headers).status == 401
    assert receiver.journal is not None
    receiver.journal.refusals()  # waits for the background write
    lines = run("refusals").splitlines()
    assert lines[0].split()[:4] == ["at", "(UTC)", "status", "reason"]
    assert lines[1].split()[2:4] == ["401", "signature_mismatch"]
    data = json.loads(run("refusals", "--json"))
    assert data["refusals"][0]["status"] == 401
