"""``flymy-receiver journal``: keyset pages, run-id search, history, filtered replay with a
dry run, resolve, resend, and options checked as parsed; over a real SQLite journal."""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flymy_receiver.errors import WebhookError
from flymy_receiver.signature import SIGNATURE_HEADER, verify_signature
from tests.toolkit.cli_runner import cli

SECRET = "whsec-cli-ops"
APP_SPEC = "ops_app:receiver"
# A SQLite journal seeded once (SEED=1): three failed deliveries (two run.completed, one
# run.failed from another agent) and one handled one; the handlers fail unless FIXED is set.
APP = textwrap.dedent(
    f"""
    import logging
    import os

    from flymy_receiver import Receiver
    from flymy_receiver.stores import SQLiteStore
    from flymy_receiver.testing import make_event, signed_request

    logging.getLogger("flymy_receiver").setLevel(logging.CRITICAL)
    receiver = Receiver({SECRET!r}, store=SQLiteStore("journal.sqlite3"))
    fixed = bool(os.environ.get("FIXED"))

    @receiver.on("run.completed")
    def save(event):
        if event.data.run_id.startswith("run_bad") and not fixed:
            raise RuntimeError("crm is down")

    def alert(event):
        if not fixed:
            raise RuntimeError("pager is down")

    if not os.environ.get("ALERT_REMOVED"):  # a later version of the app drops it
        receiver.on("run.failed")(alert)

    if os.environ.get("SEED"):
        fixed = False
        for name, run_id, agent in (
            ("run.completed", "run_bad1", "agent_a"),
            ("run.completed", "run_good", "agent_a"),
            ("run.failed", "run_bad3", "agent_b"),
            ("run.completed", "run_bad2", "agent_a"),
        ):
            event = make_event(name, run_id=run_id, agent_id=agent)
            req = signed_request(event, {SECRET!r})
            receiver.handle(req.body, req.headers)
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "ops_app.py").write_text(APP)
    seeded = cli("journal", "list", "--app", APP_SPEC, cwd=tmp_path, env={"SEED": "1"})
    assert seeded.returncode == 0, seeded.stderr
    return tmp_path


def journal(app_dir: Path, *args: str, **kwargs: Any) -> Any:
    return cli("journal", *args, "--app", APP_SPEC, cwd=app_dir, **kwargs)


def listed(app_dir: Path, *args: str) -> dict[str, Any]:
    result = journal(app_dir, "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def run_ids(data: dict[str, Any]) -> list[str]:
    return [d["run_id"] for d in data["deliveries"]]


# -- lists ----------------------------------------------------------------------------------


def test_list_pages_through_older_entries_with_before(app_dir: Path) -> None:
    first = journal(app_dir, "list", "--limit", "3")
    assert first.returncode == 0, first.stderr
    assert "older entries: add --before run.completed:run_good" in first.stdout
    page = listed(app_dir, "--limit", "3")
    assert run_ids(page) == ["run_bad2", "run_bad3", "run_good"]
    assert page["before"] == "run.completed:run_good"
    older = listed(app_dir, "--limit", "3", "--before", page["before"])
    assert run_ids(older) == ["run_bad1"]
    assert older["before"] is None  # a page shorter than the limit is the last


def test_list_searches_a_run_id_and_filters(app_dir: Path) -> None:
    assert run_ids(listed(app_dir, "--run-id", "run_bad3")) == ["run_bad3"]
    assert run_ids(listed(app_dir, "--agent", "agent_b")) == ["run_bad3"]
    assert run_ids(listed(app_dir, "--state", "handled")) == ["run_good"]
    assert run_ids(listed(app_dir, "--until", "2000-01-01")) == []
    assert run_ids(listed(app_dir, "--since", "1h")) == [
        "run_bad2",
        "run_bad3",
        "run_good",
        "run_bad1",
    ]


def test_list_prints_the_shared_table(app_dir: Path) -> None:
    from flymy_receiver.tables import ENTRY_COLUMNS

    result = journal(app_dir, "list")
    header = result.stdout.splitlines()[0]
    positions = [header.index(column) for column in ENTRY_COLUMNS]
    assert positions == sorted(positions)  # every column, in the shared order


def test_show_prints_the_history_and_each_handler(app_dir: Path) -> None:
    assert journal(app_dir, "replay", "run_bad1").returncode == 1  # one more failed attempt
    result = journal(app_dir, "show", "run_bad1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("history:")
    assert lines[start + 1].split()[:4] == ["AT", "(UTC)", "SOURCE", "STATUS"]
    sources = [line.split()[2:5] for line in lines[start + 2 : start + 4]]
    assert sources == [["sender", "500", "failed"], ["replay", "500", "failed"]]
    handlers = lines.index("handlers:")
    assert lines[handlers + 1].split()[:3] == ["HANDLER", "STATE", "ATTEMPTS"]
    assert "failed" in lines[handlers + 2].split()
    assert "RuntimeError: crm is down" in lines[handlers + 2]


# -- replay ---------------------------------------------------------------------------------


def test_a_dry_run_prints_the_matched_set_and_runs_nothing(app_dir: Path) -> None:
    dry = journal(app_dir, "replay", "--failed", "--dry-run", env={"FIXED": "1"})
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "run.completed:run_bad2",
        "run.failed:run_bad3",
        "run.completed:run_bad1",
        "3 failed entries would be replayed (dry run: nothing ran)",
    ]
    assert run_ids(listed(app_dir, "--state", "failed")) == ["run_bad2", "run_bad3", "run_bad1"]


def test_replay_failed_takes_the_filters(app_dir: Path) -> None:
    only_failed_runs = journal(
        app_dir, "replay", "--failed", "--event", "run.failed", "--json", env={"FIXED": "1"}
    )
    assert only_failed_runs.returncode == 0, only_failed_runs.stderr
    report = json.loads(only_failed_runs.stdout)
    assert report["matched"] == report["handled"] == ["run.failed:run_bad3"]
    assert run_ids(listed(app_dir, "--state", "failed")) == ["run_bad2", "run_bad1"]
    nothing = journal(app_dir, "replay", "--failed", "--since", "2999-01-01", env={"FIXED": "1"})
    assert nothing.returncode == 0
    assert "nothing to replay" in nothing.stdout
    rest = journal(app_dir, "replay", "--failed", "--agent", "agent_a", "--per-second", "50")
    assert rest.returncode == 1  # still broken: both still failed
    assert "replayed 2: 0 handled, 2 still failed" in rest.stdout


def test_a_replay_that_runs_no_handler_says_so_and_fails(app_dir: Path) -> None:
    result = journal(app_dir, "replay", "run_bad3", env={"ALERT_REMOVED": "1"})
    assert result.returncode == 1
    assert result.stdout.strip() == "run_bad3: no handler ran (none wants this event now)"
    assert run_ids(listed(app_dir, "--run-id", "run_bad3", "--state", "failed")) == ["run_bad3"]


# -- resolve --------------------------------------------------------------------------------


def test_resolve_dismisses_an_entry_with_a_note(app_dir: Path) -> None:
    result = journal(app_dir, "resolve", "run_bad1", "--note", "refunded by hand")
    assert result.returncode == 0, result.stderr
    assert "run_bad1: resolved" in result.stdout
    shown = journal(app_dir, "show", "run_bad1").stdout
    assert "state:     resolved" in shown
    assert "note:      refunded by hand" in shown
    dry = journal(app_dir, "replay", "--failed", "--dry-run")
    assert "run.completed:run_bad1" not in dry.stdout
    assert "2 failed entries would be replayed" in dry.stdout
    # A store is enough to resolve: no handler runs.
    store = cli("journal", "resolve", "run_bad2", "--note", "n/a", "--store",
                "sqlite:///journal.sqlite3", cwd=app_dir)  # fmt: skip
    assert store.returncode == 0, store.stderr
    unknown = journal(app_dir, "resolve", "run_nope", "--note", "x")
    assert unknown.returncode == 1
    assert "no journal entry" in unknown.stderr


# -- resend ---------------------------------------------------------------------------------


class _Verifying(BaseHTTPRequestHandler):
    """A stand-in for another app: 200 when the signature is valid for its secret."""

    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            verify_signature(body, self.headers.get(SIGNATURE_HEADER, ""), SECRET)
            status = 200
            self.received.append(body)
        except WebhookError:
            status = 401
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def staging() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Verifying)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/webhooks/flymy"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_resend_posts_the_stored_body_signed_afresh(app_dir: Path, staging: str) -> None:
    _Verifying.received.clear()
    result = journal(app_dir, "resend", "run_good", "--to", staging)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{staging} answered 200"
    assert len(_Verifying.received) == 1
    assert b'"run_id":"run_good"' in _Verifying.received[0].replace(b" ", b"")
    assert SECRET not in result.stdout + result.stderr


def test_resend_to_nowhere_is_one_line(app_dir: Path) -> None:
    from tests.servers import free_port

    result = journal(app_dir, "resend", "run_good", "--to", f"http://127.0.0.1:{free_port()}/")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot deliver" in result.stderr


# -- options are checked as parsed ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--limit", "1" * 40],
        ["list", "--limit", "1e3"],
        ["list", "--limit", "0"],
        ["list", "--since", "99999999999d"],
        ["list", "--since", "0001-01-01T00:00:00+05:00"],
        ["list", "--until", "tomorrow"],
        ["refusals", "--limit", "-1"],
        ["replay", "--failed", "--per-second", "0"],
        ["replay", "--failed", "--per-second", "nan"],
        ["replay", "--failed", "--per-second", "inf"],
        ["replay", "--failed", "--until", "x"],
        ["replay", "run_bad1", "--since", "2h"],  # filters go with --failed
        ["replay", "run_bad1", "--failed"],
        ["resolve", "run_bad1", "--note", "  "],
        ["resend", "run_good", "--to", "ftp://example.test/"],
        ["sweep", "--older-than", "5x"],
    ],
)
def test_bad_options_are_one_line_and_exit_2(app_dir: Path, args: list[str]) -> None:
    result = journal(app_dir, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_leading_zeros_are_the_number_they_spell(app_dir: Path) -> None:
    assert run_ids(listed(app_dir, "--limit", "0" * 30 + "1")) == ["run_bad2"]


# -- reading commands create nothing --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["journal", "list"],
        ["journal", "show", "run_1"],
        ["journal", "refusals"],
        ["inspect", "--port", "0"],
    ],
)
def test_reading_a_missing_sqlite_file_refuses_and_creates_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    result = cli(*args, "--store", "sqlite:///missing.sqlite3", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "no SQLite database at 'missing.sqlite3'" in result.stderr
    assert list(tmp_path.iterdir()) == []


# -- deferred handlers: their state in show, and the sweep ----------------------------------

DEFERRED_APP = textwrap.dedent(
    f"""
    import logging
    import os

    from flymy_receiver import Receiver
    from flymy_receiver.stores import SQLiteStore
    from flymy_receiver.testing import make_event, signed_request

    logging.getLogger("flymy_receiver").setLevel(logging.CRITICAL)


    class FileQueue:
        # A queue whose broker is a file; down while BROKER_DOWN is set.
        def bind(self, receiver):
            self.receiver = receiver

        def enqueue(self, key, handler_id, context):
            if os.environ.get("BROKER_DOWN"):
                raise ConnectionError("the broker is down")
            with open("jobs.txt", "a") as jobs:
                jobs.write(f"{{key}} {{handler_id}}\\n")


    receiver = Receiver({SECRET!r}, store=SQLiteStore("deferred.sqlite3"), queue=FileQueue())

    @receiver.on("run.completed", defer=True)
    def enrich(event):
        return None

    if os.environ.get("SEED"):
        req = signed_request(make_event("run.completed", run_id="run_later"), {SECRET!r})
        assert receiver.handle(req.body, req.headers).status == 200
    """
)


def test_show_and_sweep_deferred_handlers(tmp_path: Path) -> None:
    (tmp_path / "deferred_app.py").write_text(DEFERRED_APP)
    spec = "deferred_app:receiver"
    seeded = cli("journal", "show", "run_later", "--app", spec, cwd=tmp_path,
                 env={"SEED": "1", "BROKER_DOWN": "1"})  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr
    assert "state:     queued" in seeded.stdout
    lines = seeded.stdout.splitlines()
    row = lines[lines.index("handlers:") + 2].split()
    assert row[1:3] == ["queued", "(deferred)"]
    assert not (tmp_path / "jobs.txt").exists()  # the broker refused the job
    swept = cli("journal", "sweep", "--app", spec, "--older-than", "0s", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    assert "enqueued 1 deferred handler run(s) again" in swept.stdout
    (job,) = (tmp_path / "jobs.txt").read_text().splitlines()
    assert job.startswith("run.completed:run_later ")
    assert job.endswith("enrich")


@pytest.mark.postgres
def test_reading_an_empty_postgres_database_creates_no_tables(
    postgres_server: Any, postgres_url: str, tmp_path: Path
) -> None:
    for args in (["journal", "list"], ["journal", "refusals"]):
        result = cli(*args, "--store", postgres_url, cwd=tmp_path)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "do not exist" in result.stderr
        assert "create=False" in result.stderr
    database = postgres_url.rsplit("/", 1)[1]
    tables = "SELECT count(*) FROM pg_catalog.pg_tables WHERE tablename LIKE 'flymy%'"
    assert postgres_server.psql(tables, database).strip() == "0"
