"""``flymy-receiver journal``: list, show, replay and refusals, as subprocesses."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.servers import free_port
from tests.toolkit.cli_runner import cli

# An app whose receiver already holds a journal when it is imported: two deliveries whose
# handler fails unless FIXED is set, one that succeeds, one refused, one with terminal
# escapes in its run id.
APP = textwrap.dedent(
    """
    import logging
    import os

    from flymy_receiver import Receiver
    from flymy_receiver.stores import MemoryStore
    from flymy_receiver.testing import make_event, signed_request, wrong_secret_request

    SECRET = "whsec-cli-journal"
    # The handler's own tracebacks are logged by design; keep stderr for the command's.
    logging.getLogger("flymy_receiver").setLevel(logging.CRITICAL)
    receiver = Receiver(SECRET, store=MemoryStore())
    ran = []
    broken = True  # while importing; afterwards the fix is "deployed" when FIXED is set

    @receiver.on("run.completed")
    def save(event):
        ran.append(event.data.run_id)
        if event.data.run_id.startswith("run_bad") and broken:
            raise RuntimeError("crm is down")

    for run_id in ("run_bad1", "run_bad2", "run_good", "run_\\x1b[31mred"):
        req = signed_request(make_event("run.completed", run_id=run_id), SECRET)
        receiver.handle(req.body, req.headers)
    forged = wrong_secret_request(make_event("run.completed"))
    receiver.handle(forged.body, forged.headers)
    broken = not os.environ.get("FIXED")
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "journal_app.py").write_text(APP)
    return tmp_path


def test_list_shows_a_table_newest_first_with_escaped_values(app_dir: Path) -> None:
    result = cli("journal", "list", "--app", "journal_app:receiver", cwd=app_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["RECEIVED", "(UTC)", "STATE"]
    body = "\n".join(lines[1:])
    assert "\x1b" not in result.stdout  # the terminal never sees the payload's escapes
    assert "\\x1b[31mred" in body
    order = [line.split()[4] for line in lines[1:]]
    assert order == ["run_\\x1b[31mred", "run_good", "run_bad2", "run_bad1"]
    assert "failed" in lines[-1]
    assert "0/1 ok" in lines[-1]


def test_list_filters_and_json(app_dir: Path) -> None:
    result = cli(
        "journal", "list", "--app", "journal_app:receiver", "--state", "failed", "--json",
        cwd=app_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert sorted(d["run_id"] for d in data["deliveries"]) == ["run_bad1", "run_bad2"]
    assert all(d["state"] == "failed" for d in data["deliveries"])
    assert all("body" not in d for d in data["deliveries"])


def test_show_prints_the_error_and_traceback_and_the_body_on_request(app_dir: Path) -> None:
    result = cli("journal", "show", "run_bad1", "--app", "journal_app:receiver", "--body",
                 cwd=app_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "state:     failed" in result.stdout
    assert "RuntimeError: crm is down" in result.stdout
    assert "Traceback (most recent call last)" in result.stdout
    assert '"run_id":"run_bad1"' in result.stdout.replace(" ", "")
    missing = cli("journal", "show", "run_nope", "--app", "journal_app:receiver", cwd=app_dir)
    assert missing.returncode == 1
    assert "no journal entry" in missing.stderr


def test_replay_runs_the_fixed_handler(app_dir: Path) -> None:
    still_broken = cli("journal", "replay", "run_bad1", "--app", "journal_app:receiver",
                       cwd=app_dir)  # fmt: skip
    assert still_broken.returncode == 1
    assert "run_bad1: still failed" in still_broken.stdout
    fixed = cli(
        "journal", "replay", "--failed", "--app", "journal_app:receiver", "--json",
        cwd=app_dir, env={"FIXED": "1"},
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    report = json.loads(fixed.stdout)
    keys = ["run.completed:run_bad2", "run.completed:run_bad1"]
    assert report["matched"] == keys
    assert sorted(report["handled"]) == sorted(keys)
    assert report["failed"] == []


def test_refusals_say_why(app_dir: Path) -> None:
    result = cli("journal", "refusals", "--app", "journal_app:receiver", cwd=app_dir)
    assert result.returncode == 0, result.stderr
    assert "401" in result.stdout
    assert "signature_mismatch" in result.stdout
    assert "whsec-cli-journal" not in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["journal"],
        ["journal", "list"],
        ["journal", "list", "--app", "no_such_module:receiver"],
        ["journal", "list", "--app", "journal_app"],
        ["journal", "list", "--app", "journal_app:ran"],
        ["journal", "list", "--app", "journal_app:receiver", "--since", "yesterday"],
        ["journal", "list", "--app", "journal_app:receiver", "--limit", "0"],
        ["journal", "list", "--store", "nope://x"],
        ["journal", "replay", "--app", "journal_app:receiver"],
        ["journal", "replay", "run_bad1"],
    ],
)
def test_bad_usage_is_one_line_and_exit_2(app_dir: Path, args: list[str]) -> None:
    result = cli(*args, cwd=app_dir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "hunter2" not in result.stderr


def test_an_unreachable_store_is_one_line_and_exit_1(app_dir: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://user:hunter2@127.0.0.1:{port}/0"
    for args in (["list"], ["show", "run_x"], ["refusals"]):
        result = cli("journal", *args, "--store", url, cwd=app_dir)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "failed" in result.stderr
        assert "hunter2" not in result.stderr
