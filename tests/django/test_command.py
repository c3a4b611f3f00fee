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
    assert header == list(ENTRY_COLUMNS)
    assert [row[3] for row in rows] == ["run_bad_2", "run_ok", "run_bad_1"]
    assert [row[1] for row in rows] == ["failed", "handled", "failed"]
    assert [row[6] for row in rows] == ["0/1 ok", "1/1 ok", "0/1 ok"]


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
    assert "state:     failed" in text
    assert "RuntimeError: crm is down" in text
    assert "Traceback (most recent call last)" in text
    assert '"run_id": "run_bad_1"' in text
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\\u001b]0;title\\u0007" in text  # JSON-escaped in the pretty body
    assert "history:" in text
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
    assert [(r["key"], r["state"]) for r in data["replayed"]] == [
        ("run.completed:run_bad_2", "handled")
    ]
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
    ("list", "--until", "0001-01-01T00:00:00+01:00"),
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
    ("sweep", "--older-than=-5m"),
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


# -- the journal's operations (DESIGN section 12), on SQLite and PostgreSQL ------------------


@pytest.fixture
def many(alias: str) -> tuple[Receiver, str]:
    """Five failed deliveries of two agents and one handled, on ``alias``; the receiver is
    registered, its handler fixed once ``fixed`` is set."""
    from flymy_receiver.django import DjangoStore, register

    receiver = Receiver(SECRET, store=DjangoStore(using=alias))
    fixed: list[bool] = []

    @receiver.on("run.completed")
    def save(event: RunCompleted) -> None:
        if event.data.run_id.startswith("run_f") and not fixed:
            raise RuntimeError("crm is down")

    receiver.fixed = fixed  # type: ignore[attr-defined]
    for n in range(5):
        agent = "agent_a" if n % 2 else "agent_b"
        assert receiver.handle(*request_for(f"run_f{n}", agent_id=agent)).status == 500
    assert receiver.handle(*request_for("run_ok", agent_id="agent_a")).status == 200
    register(receiver)
    return receiver, alias


def _run_ids(*args: str) -> list[str]:
    return [e["run_id"] for e in json.loads(run("list", "--json", *args))["deliveries"]]


def test_list_pages_with_before_and_finds_a_run(many: Any) -> None:
    assert _run_ids() == ["run_ok", "run_f4", "run_f3", "run_f2", "run_f1", "run_f0"]
    text = run("list", "--limit", "2")
    last = text.splitlines()[-1]
    assert last.startswith("older entries: add --before ")
    key = last.removeprefix("older entries: add --before ")
    assert json.loads(run("list", "--limit", "2", "--json"))["before"] == key
    assert _run_ids("--limit", "2", "--before", key) == ["run_f3", "run_f2"]
    assert _run_ids("--run-id", "run_f2") == ["run_f2"]
    assert _run_ids("--failed", "--agent", "agent_a") == ["run_f3", "run_f1"]
    assert _run_ids("--until", "2000-01-01") == []
    assert len(_run_ids("--since", "2000-01-01", "--until", "1d")) == 0
    assert len(_run_ids("--until", "2999-01-01T00:00:00Z")) == 6


def test_show_prints_the_history(many: Any) -> None:
    receiver, _ = many
    assert receiver.handle(*request_for("run_f1", agent_id="agent_a")).status == 500  # a retry
    text = run("show", "run_f1")
    section = text[text.index("\nhistory:\n") + 1 :].splitlines()
    header, history = section[1], section[2:4]
    assert header.split() == ["AT", "(UTC)", "SOURCE", "STATUS", "OUTCOME", "SECONDS", "HANDLER"]
    assert [line.split()[2:5] for line in history] == [
        ["sender", "500", "failed"],
        ["sender", "500", "failed"],
    ]


def test_replay_failed_dry_run_then_filtered_and_paced(many: Any) -> None:
    from django.core.management import CommandError

    receiver, _ = many
    receiver.fixed.append(True)
    out = run("replay", "--failed", "--agent", "agent_a", "--dry-run")
    assert out.splitlines()[0] == "2 failed entries would be replayed (dry run)"
    assert _run_ids("--failed") == ["run_f4", "run_f3", "run_f2", "run_f1", "run_f0"]  # ran none
    data = json.loads(run("replay", "--failed", "--dry-run", "--event", "run.failed", "--json"))
    assert data == {"dry_run": True, "matched": []}
    data = json.loads(
        run("replay", "--failed", "--agent", "agent_a", "--per-second", "1000", "--json")
    )
    assert sorted(r["state"] for r in data["replayed"]) == ["handled", "handled"]
    assert _run_ids("--failed") == ["run_f4", "run_f2", "run_f0"]
    receiver.fixed.clear()  # broken again: the rest fail, and the command says so
    with pytest.raises(CommandError, match="3 of 3 entries are not handled"):
        run("replay", "--failed")


def test_resolve_takes_an_entry_out_of_the_failures(many: Any) -> None:
    from django.core.management import CommandError

    assert run("resolve", "run_f2", "--note", "refunded by hand") == "'run_f2': resolved\n"
    assert "run_f2" not in _run_ids("--failed")
    assert _run_ids("--state", "resolved") == ["run_f2"]
    assert "note:      refunded by hand" in run("show", "run_f2")
    data = json.loads(run("replay", "--failed", "--dry-run", "--json"))
    assert len(data["matched"]) == 4
    assert not any("f2" in key for key in data["matched"])
    with pytest.raises(CommandError, match="no journal entry for 'run_never'"):
        run("resolve", "run_never", "--note", "x")


def test_resolve_works_without_a_receiver(many: Any) -> None:
    from flymy_receiver.django import registry

    _, alias = many
    registry.unregister()
    assert run("resolve", "run_f0", "--note", "gone", "--database", alias) == "'run_f0': resolved\n"
    assert _run_ids("--state", "resolved", "--database", alias) == ["run_f0"]


class _Recorder:
    """A local app that records what it is sent and answers ``status``."""

    def __init__(self, status: int) -> None:
        import http.server
        import threading

        seen: list[tuple[bytes, str]] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen.append((body, self.headers.get("X-FlyMyAI-Signature", "")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/flymy"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_resend_posts_the_stored_body_signed_afresh(many: Any) -> None:
    import hashlib
    import hmac

    from django.core.management import CommandError

    receiver, _ = many
    entry = receiver.journal.get("run_f3")
    app = _Recorder(200)
    try:
        assert run("resend", "run_f3", "--to", app.url) == f"'{app.url}' answered 200\n"
    finally:
        app.close()
    [(body, signature)] = app.seen
    assert body == entry.body
    assert signature == hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    failing = _Recorder(500)
    try:
        with pytest.raises(CommandError, match="answered 500, not 2xx"):
            run("resend", "run_f3", "--to", failing.url)
    finally:
        failing.close()
    with pytest.raises(CommandError, match="could not send to"):
        run("resend", "run_f3", "--to", failing.url)  # nobody listens there now
    code, _out, err = run_as_manage_py("resend", "run_f3", "--to", failing.url)
    assert code == 1
    assert err.count("\n") == 1
    assert SECRET not in err


def test_the_receivers_tools_need_the_receiver(many: Any) -> None:
    from django.core.management import CommandError

    from flymy_receiver.django import registry

    registry.unregister()
    for args in (
        ("replay", "--failed"),
        ("resend", "run_f1", "--to", "http://127.0.0.1:9/x"),
        ("sweep",),
    ):
        with pytest.raises(CommandError, match="needs your receiver"):
            run(*args)


class RecordingQueue:
    """A queue that keeps the jobs it is sent (the deferred tests run real workers)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str]] = []

    def bind(self, receiver: Receiver) -> None:
        pass

    def enqueue(self, key: str, handler_id: str, context: Any) -> None:
        self.jobs.append((key, handler_id))


def test_sweep_sends_the_queued_handlers_again(sqlite_alias: str) -> None:
    from flymy_receiver.django import DjangoStore, register

    queue = RecordingQueue()
    receiver = Receiver(SECRET, store=DjangoStore(), queue=queue)

    @receiver.on("run.completed", name="enrich", defer=True)
    def enrich(event: RunCompleted) -> None:
        pass

    assert receiver.handle(*request_for("run_deferred")).status == 200
    assert [handler for _, handler in queue.jobs] == ["enrich"]
    register(receiver)
    assert run("list").splitlines()[1].split()[2] == "queued"
    assert re.search(r"enrich +queued \(deferred\)", run("show", "run_deferred"))
    assert run("sweep") == "0 deferred handler jobs sent again\n"  # younger than 5m
    out = run("sweep", "--older-than", "0s").splitlines()
    assert out[0] == "1 deferred handler jobs sent again"
    assert out[1].split()[-1] == "enrich"
    assert queue.jobs[-1] == queue.jobs[0]
    data = json.loads(run("sweep", "--older-than", "0s", "--json"))
    assert [job["handler"] for job in data["swept"]] == ["enrich"]


def test_a_database_without_the_journal_is_a_clear_error(sqlite_alias: str, tmp_path: Any) -> None:
    from django.core.management import CommandError
    from django.db import connections

    alias = "flymy_unmigrated"
    settings = connections.configure_settings(
        {
            "default": dict(connections.settings["default"]),
            alias: {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "x.sqlite3")},
        }
    )
    connections.settings[alias] = settings[alias]
    try:
        with pytest.raises(CommandError, match=r"has no journal: run manage\.py migrate"):
            run("list", "--database", alias)
    finally:
        connections[alias].close()
        del connections.settings[alias]
