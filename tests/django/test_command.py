"""``manage.py flymy_journal``, through call_command and as ``manage.py`` runs it."""

from __future__ import annotations

import io
import json
import re
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


def test_list_is_a_table_newest_first_with_the_clis_columns(journal: Any) -> None:
    from flymy_receiver.tables import ENTRY_COLUMNS

    header, *rows = [re.split(r"\s{2,}", line) for line in run("list").splitlines()]
    assert header == ENTRY_COLUMNS
    assert [row[3] for row in rows] == ["run_bad_2", "run_ok", "run_bad_1"]
    assert [row[1] for row in rows] == ["failed", "handled", "failed"]
    assert [row[6] for row in rows] == ["0/1 ok, 1 failed", "1/1 ok", "0/1 ok, 1 failed"]


def test_the_cli_and_the_command_print_the_same_table(journal: Any, capsys: Any) -> None:
    from flymy_receiver.cli import main
    from flymy_receiver.django import register

    receiver, _ = journal
    register(receiver)
    ours = run("list")
    tests_module = f"{__name__}:cli_receiver"
    global cli_receiver
    cli_receiver = receiver
    try:
        assert main(["journal", "list", "--app", tests_module]) == 0
    finally:
        cli_receiver = None
    assert capsys.readouterr().out == ours


#: The receiver the CLI loads in the test above (``--app tests.django.test_command:...``).
cli_receiver: Receiver | None = None


def test_list_filters_and_json(journal: Any) -> None:
    data = json.loads(run("list", "--failed", "--json"))
    assert [e["run_id"] for e in data["deliveries"]] == ["run_bad_2", "run_bad_1"]
    assert all(e["state"] == "failed" for e in data["deliveries"])
    handled = json.loads(run("list", "--state", "handled", "--json"))["deliveries"]
    assert handled[0]["run_id"] == "run_ok"
    newest = json.loads(run("list", "--since", "1d", "--limit", "1", "--json"))["deliveries"]
    assert [e["run_id"] for e in newest] == ["run_bad_2"]
    assert run("list", "--agent", "agent_nobody") == "no journaled deliveries\n"


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
    assert "history" in text
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
    with pytest.raises(CommandError, match="1 of 1 entries are not handled"):
        run("replay", "run_bad_1")  # still broken: it fails again, and says so
    broken[0] = False
    out = run("replay", "run_bad_1")
    assert out.splitlines()[0].split() == ["RUN", "ID", "OR", "KEY", "STATE", "NOW"]
    assert out.splitlines()[1].split() == ["run_bad_1", "handled"]
    data = json.loads(run("replay", "--failed", "--json"))
    assert [(r["run_id"], r["state"]) for r in data["replayed"]] == [("run_bad_2", "handled")]
    assert run("list", "--failed") == "no journaled deliveries\n"
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
    assert lines[0].split()[:4] == ["AT", "(UTC)", "STATUS", "REASON"]
    assert lines[1].split()[2:4] == ["401", "signature_mismatch"]
    data = json.loads(run("refusals", "--json"))
    assert data["refusals"][0]["status"] == 401


def run_as_manage_py(*args: str) -> tuple[int, str, str]:
    """What ``python manage.py flymy_journal ...`` does: exit status, stdout, stderr."""
    import contextlib

    from flymy_receiver.django.management.commands.flymy_journal import Command

    out, err = io.StringIO(), io.StringIO()
    command = Command(stdout=out, stderr=err)
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            command.run_from_argv(["manage.py", "flymy_journal", *args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


BAD_VALUES = [
    # Issue 22 L9: out of range, leading zeros, huge, not a number: one line each.
    ("list", "--limit", "0"),
    ("list", "--limit", "-1"),
    ("list", "--limit", "10001"),
    ("list", "--limit", "000100999999"),
    ("list", "--limit", "9" * 5000),
    ("list", "--limit", "ten"),
    ("list", "--limit", "1e3"),
    ("refusals", "--limit", "0"),
    ("refusals", "--limit", "99999999999999999999"),
    ("list", "--since", "99999999999d"),
    ("list", "--since", "999999999999h"),
    ("list", "--since", "0d"),
    ("list", "--since", "0001-01-01T00:00:00+01:00"),
    ("list", "--since", "9999-12-31T23:59:59-01:00"),
    ("list", "--since", "yesterday"),
    ("list", "--since", "\x1b[2J"),
    ("list", "--state", "failed", "--failed", "--state", "handled"),
    ("replay", "--failed", "--since", "99999999999d"),
    ("replay", "--failed", "--until", "not-a-date"),
    ("replay", "--failed", "--per-second", "0"),
    ("replay", "--failed", "--per-second", "nan"),
    ("replay", "--failed", "--per-second", "inf"),
    ("replay", "--failed", "--per-second", "-5"),
    ("replay", "--failed", "--per-second", "1e9"),
    ("replay", "run_bad_1", "--dry-run"),
    ("replay", "run_bad_1", "--failed"),
    ("replay",),
    ("sweep", "--older-than", "0m"),
    ("sweep", "--older-than", "99999999999d"),
    ("sweep", "--older-than", "soon"),
    ("resolve", "run_bad_1", "--note", "   "),
    ("resend", "run_bad_1", "--to", "ftp://example.com/x"),
    ("list", "--database", "nosuch"),
]


@pytest.mark.parametrize("args", BAD_VALUES, ids=lambda args: " ".join(args)[:60])
def test_every_bad_value_is_one_command_error_line(journal: Any, args: tuple[str, ...]) -> None:
    from django.core.management import CommandError

    with pytest.raises(CommandError) as raised:
        run(*args)
    message = str(raised.value)
    assert "\n" not in message
    assert "\x1b" not in message
    assert len(message) < 400
    code, _out, err = run_as_manage_py(*args)
    assert code == 1
    assert err.startswith("CommandError: ")
    assert err.count("\n") == 1  # one line
    assert "Traceback" not in err


def test_database_is_refused_where_it_cannot_apply(journal: Any) -> None:
    from django.core.management import CommandError

    from flymy_receiver.django import register

    receiver, _ = journal
    assert len(json.loads(run("list", "--database", "default", "--json"))["deliveries"]) == 3
    register(receiver)  # a receiver whose DjangoStore uses "default"
    assert len(json.loads(run("list", "--database", "default", "--json"))["deliveries"]) == 3
    from django.db import connections

    other = next((alias for alias in connections.settings if alias != "default"), "other")
    with pytest.raises(CommandError, match=r"--database .* does not apply.*database 'default'"):
        run("list", "--database", other)
    with pytest.raises(CommandError, match="does not apply"):
        run("replay", "run_bad_1", "--database", other)


def test_database_is_refused_for_a_receiver_outside_django(journal: Any, tmp_path: Any) -> None:
    from django.core.management import CommandError

    from flymy_receiver.django import register
    from flymy_receiver.stores import SQLiteStore

    register(Receiver(SECRET, store=SQLiteStore(str(tmp_path / "journal.sqlite3"))))
    with pytest.raises(CommandError, match=r"does not apply: .*SQLiteStore"):
        run("list", "--database", "default")
    assert run("list") == "no journaled deliveries\n"  # the receiver's own journal
