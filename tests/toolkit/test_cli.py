"""The flymy-receiver command, end to end as a subprocess (listen on a free 127.0.0.1 port)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import sign
from flymy_receiver.schema import event_schemas
from flymy_receiver.testing import make_event, signed_request, stale_request
from tests.conftest import SECRET
from tests.servers import PYTHON, ROOT, free_port, post, serve, server_log
from tests.toolkit.cli_runner import cli

KNOWN_SECRET = "It's a Secret to Everybody"
KNOWN_BODY = b"Hello, World!"
KNOWN_SIGNATURE = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flymy-receiver: error: "), lines[0]
    return lines[0]


# -- sign / verify --------------------------------------------------------------------------


def test_sign_prints_the_known_answer_from_the_console_script() -> None:
    result = cli("sign", "--secret", KNOWN_SECRET, stdin=KNOWN_BODY, script=True)
    assert (result.returncode, result.stdout) == (0, KNOWN_SIGNATURE + "\n")


def test_sign_reads_the_secret_from_the_environment() -> None:
    result = cli("sign", stdin=b'{"a":1}', env={"FLYMY_WEBHOOK_SECRET": "from-env\n"})
    assert result.returncode == 0
    assert result.stdout.strip() == sign(b'{"a":1}', "from-env")


def test_verify_valid_and_rotated_secrets() -> None:
    ok = cli("verify", "--secret", KNOWN_SECRET, "--signature", KNOWN_SIGNATURE, stdin=KNOWN_BODY)
    assert ok.returncode == 0
    assert ok.stdout.startswith("valid")
    upper = "sha256=" + KNOWN_SIGNATURE.upper()
    rotated = cli(
        "verify",
        *("--secret", "new", "--secret", KNOWN_SECRET, "--signature", upper),
        stdin=KNOWN_BODY,
    )
    assert rotated.returncode == 0
    assert "secret #2 of 2" in rotated.stdout


@pytest.mark.parametrize(
    ("body", "secret", "signature", "cause"),
    [
        (KNOWN_BODY + b"!", KNOWN_SECRET, KNOWN_SIGNATURE, "differs from what the sender signed"),
        (KNOWN_BODY, "another secret", KNOWN_SIGNATURE, "differs from what the sender signed"),
        (b'{"a":1}\n', "whsec-k", sign(b'{"a":1}', "whsec-k"), "without its final newline"),
        (b'{"a":1}', "whsec-k", sign(b'{"a":1}\n', "whsec-k"), "plus a final newline"),
        (b'{"a": 1}', "whsec-k", sign(b'{"a":1}', "whsec-k"), "re-serialised"),
        (KNOWN_BODY, KNOWN_SECRET, "v1,abc", "64 hex characters"),
    ],
    ids=["tampered", "wrong-secret", "newline-added", "newline-lost", "reserialised", "malformed"],
)
def test_verify_explains_an_invalid_signature(
    body: bytes, secret: str, signature: str, cause: str
) -> None:
    result = cli("verify", "--secret", secret, "--signature", signature, stdin=body)
    assert result.returncode == 1
    assert result.stdout.startswith("invalid")
    assert cause in result.stdout
    output = result.stdout + result.stderr
    # Never the digest the body would need, nor the secret.
    assert sign(body, secret) not in output
    assert secret not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "choose a command"),
        (("sign",), "no secret"),
        (("sign", "--secret", "  "), "must not be empty"),
        (("verify", "--secret", "k"), "--signature"),
        (("send", "ftp://example.invalid/x", "--secret", "k"), "not an http(s) URL"),
        (("send", "http://127.0.0.1:9/x", "--secret", "k", "--count", "0"), "--count"),
        (
            ("send", "http://127.0.0.1:9/x", "--secret", "k", "--data", "/nonexistent.json"),
            "cannot read",
        ),
        (("listen", "--port", "x", "--secret", "k"), "invalid int value"),
        (("schema", "--output", "no_such_module:Model"), "cannot import"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_usage_is_one_line_and_exit_code_2(args: tuple[str, ...], message: str) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert message in _one_line_error(result)


# -- schema -----------------------------------------------------------------------------------


def test_schema_prints_the_event_schemas_and_openapi(tmp_path: Path) -> None:
    result = cli("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == event_schemas()
    openapi = json.loads(cli("schema", "--openapi").stdout)
    assert set(openapi["webhooks"]) == {"run.completed", "run.failed", "other"}
    (tmp_path / "my_models.py").write_text(
        "from pydantic import BaseModel\n\nclass Lead(BaseModel):\n    score: int\n"
    )
    typed = json.loads(cli("schema", "--output", "my_models:Lead", cwd=tmp_path).stdout)
    output = typed["run.completed"]["$defs"]["Lead"]
    assert output["properties"]["score"]["type"] == "integer"


# -- listen and send --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[int, Any]]:
    port = free_port()
    argv = [PYTHON, "-m", "flymy_receiver", "listen", "--port", str(port), "--secret", SECRET]
    with serve(argv, port, env={"PYTHONPATH": str(ROOT)}) as proc:
        yield port, proc


def _send(port: int, *args: str, secret: str = SECRET, **kw: Any) -> Any:
    url = f"http://127.0.0.1:{port}/webhooks/flymy"
    return cli("send", url, "--secret", secret, *args, **kw)


def test_send_to_listen_delivers_and_listen_prints_it(listener: tuple[int, Any]) -> None:
    port, proc = listener
    result = _send(port, "--count", "2", "--agent-name", "Lead Scorer", "--agent-id", "agent_9")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(" -> 200 " in line and "run.completed" in line for line in lines)
    run_ids = [line.split()[2] for line in lines]
    log = server_log(proc)
    for run_id in run_ids:
        assert f"run: {run_id}" in log
    assert "agent: Lead Scorer (agent_9)" in log
    assert "signature: valid" in log
    assert "buying_triggers" in log  # the output is printed
    assert SECRET not in log


def test_send_data_file_and_duplicates(listener: tuple[int, Any], tmp_path: Path) -> None:
    port, proc = listener
    error = tmp_path / "error.json"
    error.write_text(json.dumps({"type": "rate_limited", "message": "slow down"}))
    result = _send(
        port, "--event", "run.failed", "--data", str(error), "--run-id", "run_twice", "--count", "2"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = result.stdout.strip().splitlines()
    assert '-> 200 OK {"received":true}' in first
    assert '"duplicate":true' in second
    log = server_log(proc)
    assert "error: rate_limited: slow down" in log
    output = tmp_path / "output.json"
    output.write_text(json.dumps({"score": 97}))
    assert _send(port, "--data", str(output)).returncode == 0
    assert '"score": 97' in server_log(proc)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"run_id": "run_c1", "reason": "user"}))
    assert _send(port, "--event", "run.cancelled", "--data", str(other)).returncode == 0
    assert "event: run.cancelled  run: run_c1" in server_log(proc)


def test_send_with_a_wrong_secret_fails_and_listen_explains(listener: tuple[int, Any]) -> None:
    port, proc = listener
    result = _send(port, secret="not-the-listeners-secret")
    assert result.returncode == 1
    assert "-> 401 Unauthorized" in result.stdout
    assert "not acknowledged" in result.stderr
    log = server_log(proc)
    assert "signature: INVALID (signature does not match; likely cause:" in log
    assert "not-the-listeners-secret" not in log


def test_listen_answers_with_the_real_status_policy(listener: tuple[int, Any]) -> None:
    port, proc = listener
    good = signed_request(make_event("run.completed"), SECRET)
    assert post(port, good.body, good.headers)[0] == 200
    assert post(port, good.body, good.headers) == (200, b'{"received":true,"duplicate":true}')
    assert post(port, good.body, good.headers, method="GET")[0] == 405
    stale = stale_request("run.completed", SECRET)
    assert post(port, stale.body, stale.headers)[0] == 400
    huge = {**good.headers, "Content-Length": str(10 * 1024 * 1024)}
    assert post(port, b"", huge)[0] == 413
    gzip = {**good.headers, "Content-Encoding": "gzip"}
    assert post(port, good.body, gzip)[0] == 415
    not_json = signed_request(b"not json", SECRET)
    status, body = post(port, not_json.body, not_json.headers)
    assert status == 400
    assert b"Traceback" not in body
    assert SECRET not in server_log(proc)


def test_listen_reads_a_chunked_body(listener: tuple[int, Any]) -> None:
    import http.client

    port, _ = listener
    req = signed_request(make_event("run.completed"), SECRET)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        halves = iter([req.body[:40], req.body[40:]])
        conn.request(
            "POST", "/webhooks/flymy", body=halves, headers=req.headers, encode_chunked=True
        )
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_send_to_nothing_fails_in_one_line() -> None:
    result = _send(free_port())
    assert result.returncode == 1
    assert "cannot deliver" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_listen_with_the_env_secret_and_a_sqlite_store(tmp_path: Path) -> None:
    port = free_port()
    store = f"sqlite:///{tmp_path / 'deliveries.sqlite3'}"
    argv = [PYTHON, "-m", "flymy_receiver", "listen", "--port", str(port), "--store", store]
    env = {"FLYMY_WEBHOOK_SECRET": "env-secret", "PYTHONPATH": str(ROOT)}
    with serve(argv, port, env=env) as proc:
        first = _send(port, "--run-id", "run_kept", secret="env-secret")
        assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "deliveries.sqlite3").exists()
    # A new listener on the same store remembers the delivery.
    with serve(argv, port, env=env) as proc:
        again = _send(port, "--run-id", "run_kept", secret="env-secret")
        assert '"duplicate":true' in again.stdout
        assert "env-secret" not in server_log(proc)
