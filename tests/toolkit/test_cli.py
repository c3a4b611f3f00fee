"""The flymy-receiver command, end to end as a subprocess (listen on a free 127.0.0.1 port)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import sign
from flymy_receiver.schema import event_schemas
from flymy_receiver.testing import make_event, serialize, signed_request, stale_request
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


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 bytes on the command line: surrogate escapes
URL = "http://127.0.0.1:9/webhooks/flymy"
# Files the bad inputs below refer to, made in the test's working directory.
FILES = {
    "deep.json": _nested(1100),
    "nan.json": '{"score": NaN}',
    "list.json": "[1, 2]",
    "latin1.json": b'{"name": "caf\xe9"}',
    "raises.py": "raise ZeroDivisionError('at import')\n",
    "exits.py": "import sys\nsys.exit(3)\n",
    "broken.py": "def (:\n",
    "unschemable.py": (
        "from typing import Callable\nfrom pydantic import BaseModel\n\n"
        "class Model(BaseModel):\n    call: Callable[[], int]\n"
    ),
    "plain.py": "Model = 3\n",
}
BAD_INPUTS: dict[str, tuple[str, ...]] = {
    "max-age-nan": ("listen", "--port", "0", "--secret", "k", "--max-age", "nan"),
    "max-age-inf": ("listen", "--port", "0", "--secret", "k", "--max-age", "inf"),
    "max-age-huge": ("listen", "--port", "0", "--secret", "k", "--max-age", "1e300"),
    "max-age-negative": ("listen", "--port", "0", "--secret", "k", "--max-age", "-1"),
    "max-age-text": ("listen", "--port", "0", "--secret", "k", "--max-age", "3d"),
    "port-negative": ("listen", "--port", "-5", "--secret", "k"),
    "store-bad-url": ("listen", "--port", "0", "--secret", "k", "--store", "redis://:pw1@[::1"),
    "store-no-scheme": ("listen", "--port", "0", "--secret", "k", "--store", "u:pw1@h"),
    "url-port-too-big": ("send", "http://127.0.0.1:99999/", "--secret", "k"),
    "url-port-zero": ("send", "http://127.0.0.1:0/", "--secret", "k"),
    "url-port-text": ("send", "http://h:abc/", "--secret", "k"),
    "url-ipv6-unclosed": ("send", "http://[::1", "--secret", "k"),
    "url-no-host": ("send", "http:///path", "--secret", "k"),
    "url-label-too-long": ("send", f"http://{'a' * 64}.example/", "--secret", "k"),
    "url-space": ("send", "http://h/a b", "--secret", "k"),
    "url-control": ("send", "http://h/\x1b[2J", "--secret", "k"),
    "timeout-nan": ("send", URL, "--secret", "k", "--timeout", "nan"),
    "timeout-inf": ("send", URL, "--secret", "k", "--timeout", "inf"),
    "timeout-huge": ("send", URL, "--secret", "k", "--timeout", "1e300"),
    "timeout-zero": ("send", URL, "--secret", "k", "--timeout", "0"),
    "count-huge": ("send", URL, "--secret", "k", "--count", "10000000"),
    "data-too-deep": ("send", URL, "--secret", "k", "--data", "deep.json"),
    "data-nan": ("send", URL, "--secret", "k", "--data", "nan.json"),
    "data-not-utf8": ("send", URL, "--secret", "k", "--data", "latin1.json"),
    "data-directory": ("send", URL, "--secret", "k", "--data", "."),
    "data-not-object": ("send", URL, "--secret", "k", "--event", "x.y", "--data", "list.json"),
    "run-id-not-utf8": ("send", URL, "--secret", "k", "--run-id", NOT_UTF8),
    "event-not-utf8": ("send", URL, "--secret", "k", "--event", NOT_UTF8),
    "url-not-utf8": ("send", f"http://h/{NOT_UTF8}", "--secret", "k"),
    "secret-not-utf8-sign": ("sign", "--secret", NOT_UTF8),
    "secret-not-utf8-send": ("send", URL, "--secret", NOT_UTF8),
    "secret-not-utf8-listen": ("listen", "--port", "0", "--secret", NOT_UTF8),
    "signature-not-utf8": ("verify", "--secret", "k", "--signature", NOT_UTF8),
    "schema-import-raises": ("schema", "--output", "raises:Model"),
    "schema-import-exits": ("schema", "--output", "exits:Model"),
    "schema-syntax-error": ("schema", "--output", "broken:Model"),
    "schema-relative": ("schema", "--output", ".relative:Model"),
    "schema-not-a-model": ("schema", "--output", "plain:Model"),
    "schema-unschemable": ("schema", "--output", "unschemable:Model"),
    "schema-not-utf8": ("schema", "--output", f"{NOT_UTF8}:Model"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_every_bad_input_is_one_line_and_exit_code_2(name: str, tmp_path: Path) -> None:
    for file, content in FILES.items():
        path = tmp_path / file
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = cli(*BAD_INPUTS[name], cwd=tmp_path)  # cli() asserts there is no traceback
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    line = _one_line_error(result)
    assert "pw1" not in line
    assert NOT_UTF8 not in line
    # Nothing the terminal would interpret, whatever the input held.
    assert line.isprintable(), line
    assert result.stdout == ""


def test_a_secret_from_the_environment_that_is_not_utf8_is_one_line() -> None:
    result = cli("sign", env={"FLYMY_WEBHOOK_SECRET": NOT_UTF8})
    assert result.returncode == 2
    assert "FLYMY_WEBHOOK_SECRET is not valid UTF-8" in _one_line_error(result)


def test_an_internal_error_is_one_line_without_its_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flymy_receiver import cli as cli_module
    from flymy_receiver.cli import signing

    def broken(body: bytes, key: bytes) -> str:
        raise RuntimeError("a message that could hold " + KNOWN_SECRET)

    monkeypatch.setattr(signing, "sign", broken)
    monkeypatch.setattr(signing, "stdin_bytes", lambda: b"{}")
    assert cli_module.main(["sign", "--secret", KNOWN_SECRET]) == 70
    err = capsys.readouterr().err
    assert err.startswith("flymy-receiver: internal error: RuntimeError at test_cli.py:")
    assert len(err.splitlines()) == 1
    assert KNOWN_SECRET not in err


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


def _raw_post(port: int, path: str, headers: dict[str, str], data: bytes) -> int:
    """Send bytes as they are (a path http.client would refuse, an unfinished body)."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # A server that answered early (413) may close before taking it all.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status


def _log_after(proc: Any, marker: str) -> str:
    # The listener prints each delivery after answering it: wait (bounded) for its line.
    for _ in range(200):
        log = server_log(proc)
        if marker in log:
            return log[log.index(marker) :]
        time.sleep(0.05)
    raise AssertionError(f"{marker!r} never printed:\n{server_log(proc)[-3000:]}")


def test_listen_never_calls_an_oversized_signed_body_invalid(listener: tuple[int, Any]) -> None:
    port, proc = listener
    event = make_event("run.completed", run_id="run_oversized").model_dump(mode="json")
    event["data"]["output"] = "x" * (5 * 1024 * 1024 + 16384)  # over listen's 5 MiB limit
    req = signed_request(event, SECRET)  # correctly signed over the whole body
    size = 64 * 1024
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(req.body[i : i + size]), req.body[i : i + size])
        for i in range(0, len(req.body), size)
    )  # no final chunk: only a listener that stops reading at the limit can answer
    headers = {**req.headers, "Transfer-Encoding": "chunked"}
    # The query string only tells this request apart in the listener's shared log.
    assert _raw_post(port, "/webhooks/flymy?t=oversized", headers, chunks) == 413
    printed = _log_after(proc, "/webhooks/flymy?t=oversized -> 413")
    assert "INVALID" not in printed.split("\n[")[0]
    assert "body over max_body_size: refused before the signature was checked" in printed


def test_listen_shows_a_huge_nested_output_quickly(listener: tuple[int, Any]) -> None:
    port, proc = listener
    block = b"[" * 150 + b"]" * 150  # within the receiver's nesting limit
    output = b"[" + b",".join([block] * 13_000) + b"]"  # 4 MB; indented whole: gigabytes
    envelope = make_event("run.completed", run_id="run_nested", output=None)
    body = serialize(envelope).replace(b'"output":null', b'"output":' + output)
    req = signed_request(body, SECRET)
    assert post(port, req.body, req.headers, path="/webhooks/flymy", timeout=60)[0] == 200
    printed = _log_after(proc, "run: run_nested").split("\n[")[0]
    assert "run: run_nested" in printed
    assert "... (cut)" in printed
    assert len(printed) < 5000


def test_listen_prints_no_terminal_escape_from_a_delivery(listener: tuple[int, Any]) -> None:
    port, proc = listener
    hostile = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e"
    event = make_event(
        "run.failed",
        run_id="run_esc" + hostile,
        agent_name=hostile,
        error={"type": hostile, "message": hostile},
    )
    req = signed_request(event, SECRET)
    headers = {**req.headers, "Content-Length": str(len(req.body))}
    assert _raw_post(port, "/webhooks/flymy", headers, req.body) == 200
    printed = _log_after(proc, "run: run_esc")
    for char in "\x1b\x07\x9b\u202e":
        assert char not in printed
    assert "run: run_esc\\x1b]0;owned\\x07" in printed


def test_send_a_deeply_nested_output(listener: tuple[int, Any], tmp_path: Path) -> None:
    port, proc = listener
    data = tmp_path / "deep.json"
    data.write_text(_nested(190))  # within the receiver's nesting limit of 200
    result = _send(port, "--data", str(data), "--run-id", "run_deep")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " -> 200 OK" in result.stdout
    assert "run: run_deep" in _log_after(proc, "run: run_deep")


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
