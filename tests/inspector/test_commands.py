"""``listen`` and ``inspect`` as subprocesses on free loopback ports, over real HTTP."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET, require
from tests.inspector import sample_app
from tests.servers import PYTHON, ROOT, free_port, post, serve, server_log, stop
from tests.toolkit.cli_runner import cli

TOKEN = "tok-commands-0123456789"


def _listen(port: int, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "flymy_receiver",
        "listen",
        "--port",
        str(port),
        "--secret",
        SECRET,
        *extra,
    ]


def _request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flymy-receiver: error: "), lines[0]
    return lines[0]


# -- refusing to start -----------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
@pytest.mark.parametrize("command", ["listen", "inspect"])
def test_a_non_loopback_bind_without_a_token_is_refused_at_start(command: str, host: str) -> None:
    args = ["--secret", SECRET] if command == "listen" else ["--store", "memory://"]
    result = cli(command, "--port", str(free_port()), "--host", host, *args)
    assert result.returncode == 2
    line = _one_line_error(result)
    assert "without an access token" in line
    assert "--token" in line
    assert result.stdout == ""  # it never said it was listening


def test_a_weak_token_is_refused() -> None:
    result = cli("listen", "--port", "0", "--secret", SECRET, "--token", "1234")
    assert result.returncode == 2
    assert "at least 16 characters" in _one_line_error(result)


def test_inspect_needs_a_store_or_an_app() -> None:
    result = cli("inspect", "--port", "0")
    assert result.returncode == 2
    assert "--store URL, --app MODULE:RECEIVER" in _one_line_error(result)


@pytest.mark.parametrize(
    ("app", "complaint"),
    [
        ("no_such_module_here:receiver", "cannot import no_such_module_here"),
        ("tests.inspector.sample_app:nothing", "AttributeError"),
        ("tests.inspector.sample_app:SECRET", "is not a flymy_receiver.Receiver"),
        ("justamodule", "must be MODULE:RECEIVER"),
    ],
)
def test_inspect_explains_a_bad_app(app: str, complaint: str) -> None:
    result = cli("inspect", "--port", "0", "--app", app)
    assert result.returncode == 2
    assert complaint in _one_line_error(result)


@pytest.mark.parametrize("url", ["user:hunter2@127.0.0.1:1/0", "bogus://admin:hunter2@127.0.0.1/0"])
@pytest.mark.parametrize("command", ["listen", "inspect"])
def test_a_store_url_password_is_never_printed(command: str, url: str) -> None:
    args = ["--secret", SECRET] if command == "listen" else []
    result = cli(command, "--port", "0", "--store", url, *args)
    assert result.returncode == 2
    line = _one_line_error(result)
    assert line.startswith("flymy-receiver: error: --store:")
    assert "hunter2" not in result.stdout + result.stderr


def test_inspect_prints_the_store_url_without_its_password(tmp_path: Path) -> None:
    # Whether this store journals or not, its password must not be printed: stop it as soon
    # as it said what it serves (or failed to).
    require("redis")
    port = free_port()
    url = "redis://reader:hunter2@127.0.0.1:1/0"
    argv = [PYTHON, "-m", "flymy_receiver", "inspect", "--port", str(port), "--store", url]
    log = tmp_path / "out.txt"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if b"inspecting" in log.read_bytes():
                    break
                time.sleep(0.1)
        finally:
            stop(proc)
    output = log.read_text(errors="replace")
    assert "hunter2" not in output
    assert "redis://reader:***@127.0.0.1" in output or "keeps no delivery journal" in output, output


def test_a_missing_extra_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['uvicorn'] = None; from flymy_receiver.cli import main; "
        f"sys.exit(main(['listen', '--port', '0', '--secret', {SECRET!r}]))"
    )
    result = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )
    assert result.returncode == 2
    line = _one_line_error(result)
    assert "pip install 'flymy-receiver[inspector]'" in line


# -- listen ----------------------------------------------------------------------------


def _printed(proc: Any, text: str) -> bool:
    """Whether ``proc`` prints ``text`` soon: its port may accept a moment before its banner."""
    for _ in range(100):
        if text in server_log(proc):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[int, Any]]:
    port = free_port()
    with serve(_listen(port), port, env={"PYTHONPATH": str(ROOT)}) as proc:
        yield port, proc


def test_listen_serves_the_receiver_and_the_inspector_on_one_port(
    listener: tuple[int, Any],
) -> None:
    port, proc = listener
    assert _printed(proc, f"listening on http://127.0.0.1:{port}/webhooks/flymy")
    request = signed_request(make_event("run.completed", run_id="run_listen_api"), SECRET)
    assert post(port, request.body, request.headers)[0] == 200
    status, headers, body = _request(port, "/api/deliveries/run_listen_api")
    assert status == 200
    detail = json.loads(body)
    assert detail["state"] == "handled"  # the catch-all handled it
    assert list(detail["handlers"]) == ["flymy_receiver.devserver._acknowledge"]
    status, headers, body = _request(port, "/")
    assert status == 200
    assert "default-src 'none'" in headers["content-security-policy"]
    assert b"run_listen_api" in body


def test_listen_prints_control_characters_escaped(listener: tuple[int, Any]) -> None:
    port, proc = listener
    nasty = "\x1b[31mred\x1b]0;owned\x07\nfake line\u202e"
    event = make_event(
        "run.failed",
        run_id="run_\x1b[2Jwipe",
        agent_name=nasty,
        error={"type": "\x1b[1mtype", "message": "line\rover"},
    )
    request = signed_request(event, SECRET)
    assert post(port, request.body, request.headers)[0] == 200
    assert post(port, b"x", {}, path="/webhooks/flymy?\x1b=1".replace("\x1b", "%1b"))[0] == 401
    time.sleep(0.5)
    log = server_log(proc)
    assert "\x1b" not in log
    assert "\x07" not in log
    assert "\u202e" not in log
    assert "\r" not in log
    assert "agent: \\x1b[31mred\\x1b]0;owned\\x07\\x0afake line\\u202e" in log
    assert "run: run_\\x1b[2Jwipe" in log
    assert "error: \\x1b[1mtype: line\\x0dover" in log


def test_listen_with_a_token_guards_the_inspector_not_the_webhook() -> None:
    port = free_port()
    with serve(_listen(port, "--token", TOKEN), port, env={"PYTHONPATH": str(ROOT)}) as proc:
        request = signed_request(make_event("run.completed", run_id="run_tok"), SECRET)
        assert post(port, request.body, request.headers)[0] == 200
        assert _request(port, "/")[0] == 401
        assert _request(port, "/api/deliveries")[0] == 401
        status, headers, _ = _request(port, f"/?token={TOKEN}")
        assert status == 303
        assert headers["location"] == "/"
        cookie = headers["set-cookie"].split(";")[0]
        status, _, body = _request(port, "/api/deliveries", headers={"Cookie": cookie})
        assert status == 200
        assert json.loads(body)["deliveries"][0]["run_id"] == "run_tok"
        status, _, _ = _request(
            port, "/api/deliveries", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200
        assert TOKEN not in server_log(proc)


def test_listen_on_another_path() -> None:
    port = free_port()
    argv = _listen(port, "--path", "/hooks/in")
    with serve(argv, port, env={"PYTHONPATH": str(ROOT)}) as proc:
        request = signed_request(make_event("run.completed"), SECRET)
        assert post(port, request.body, request.headers, path="/hooks/in")[0] == 200
        assert post(port, request.body, request.headers, path="/webhooks/flymy")[0] == 404
        assert "/hooks/in -> 200" in server_log(proc)


# -- inspect ---------------------------------------------------------------------------


def _csrf(html: bytes) -> str:
    match = re.search(rb'name="csrf_token" value="([^"]+)"', html)
    assert match is not None
    return match.group(1).decode()


def test_inspect_an_app_send_fail_fix_and_replay(tmp_path: Path) -> None:
    port = free_port()
    argv = [
        PYTHON,
        "-m",
        "flymy_receiver",
        "inspect",
        "--port",
        str(port),
        "--app",
        "tests.inspector.sample_app:receiver",
    ]
    env = {"PYTHONPATH": str(ROOT), "SAMPLE_APP_FIX": str(tmp_path)}
    with serve(argv, port, env=env, cwd=ROOT) as proc:
        assert _printed(proc, "inspecting app tests.inspector.sample_app:receiver")
        _, _, page = _request(port, "/")
        form = {
            "csrf_token": _csrf(page),
            "event": "run.completed",
            "run_id": "run_cmd",
            "agent_name": "Broken Agent",
        }
        from urllib.parse import urlencode

        origin = {
            "Origin": f"http://127.0.0.1:{port}",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        status, headers, _ = _request(
            port, "/send", method="POST", body=urlencode(form).encode(), headers=origin
        )
        assert status == 303
        assert headers["location"].endswith("?notice=sent&status=500")
        detail = json.loads(_request(port, "/api/deliveries/run_cmd")[2])
        assert detail["state"] == "failed"
        assert detail["handlers"]["tests.inspector.sample_app.save_profile"]["error"] == (
            "RuntimeError: the CRM refused the profile"
        )
        (tmp_path / "run_cmd").touch()  # the fix is deployed
        replay = {"csrf_token": form["csrf_token"], "key": detail["key"]}
        status, _, _ = _request(
            port, "/replay", method="POST", body=urlencode(replay).encode(), headers=origin
        )
        assert status == 303
        assert json.loads(_request(port, "/api/deliveries/run_cmd")[2])["state"] == "handled"
        assert sample_app.SECRET not in server_log(proc)


@pytest.mark.postgres
def test_inspect_a_shared_store_read_only_then_replay_with_the_app(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Production: the app's workers journal in PostgreSQL; the operator inspects it from
    # another process, first read-only, then with the app's handlers to replay the fix.
    from flymy_receiver.stores import PostgresStore

    monkeypatch.delenv("SAMPLE_APP_FIX", raising=False)  # not fixed in this process
    store = PostgresStore(postgres_url)
    try:
        app = sample_app.receiver.with_store(store)
        event = make_event("run.completed", run_id="run_pg", agent_name="Broken Agent")
        request = signed_request(event, sample_app.SECRET)
        assert app.handle(request.body, request.headers).status == 500
        env = {"PYTHONPATH": str(ROOT), "SAMPLE_APP_FIX": str(tmp_path)}
        base = [PYTHON, "-m", "flymy_receiver", "inspect", "--store", postgres_url]

        port = free_port()
        with serve([*base, "--port", str(port)], port, env=env, cwd=ROOT):
            status, _, body = _request(port, "/api/deliveries?state=failed")
            assert status == 200
            (listed,) = json.loads(body)["deliveries"]
            assert listed["run_id"] == "run_pg"
            _, _, page = _request(port, "/deliveries/run_pg")
            assert b"Replay needs the app's receiver" in page

        port = free_port()
        argv = [*base, "--port", str(port), "--app", "tests.inspector.sample_app:receiver"]
        with serve(argv, port, env=env, cwd=ROOT):
            (tmp_path / "run_pg").touch()  # the fix is deployed
            _, _, page = _request(port, "/deliveries/run_pg")
            from urllib.parse import urlencode

            form = urlencode({"csrf_token": _csrf(page), "key": listed["key"]}).encode()
            headers = {
                "Origin": f"http://127.0.0.1:{port}",
                "Content-Type": "application/x-www-form-urlencoded",
            }
            status, _, _ = _request(port, "/replay", method="POST", body=form, headers=headers)
            assert status == 303
        entry = store.journal_get("run_pg")
        assert entry is not None
        assert entry.state == "handled"
        assert entry.attempts == 1
    finally:
        store.close()
