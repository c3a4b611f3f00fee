"""The example apps behind real servers, over real HTTP: what the platform would see."""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping

import pytest

from flymy_receiver import sign
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.e2e.conftest import Server
from tests.servers import server_log

pytestmark = pytest.mark.e2e


def send(
    server: Server,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request; every answer is checked for the secret and the expected signature."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, "/webhooks/flymy", body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        status, answer_headers, answer = response.status, response.headers, response.read()
    finally:
        conn.close()
    assert SECRET.encode() not in answer
    assert sign(body, SECRET).encode() not in answer
    assert SECRET not in str(answer_headers)
    return status, answer_headers, answer


def test_a_signed_run_completed_is_stored(server: Server) -> None:
    event = make_event("run.completed", agent_id="agent_e2e")
    request = signed_request(event, SECRET)
    status, headers, body = send(server, request.body, request.headers)
    assert (status, json.loads(body)) == (200, {"received": True})
    assert headers["Content-Type"].startswith("application/json")
    [row] = server.rows("leads", event.data.run_id)
    run_id, agent_id, background, outreach_angle, received_at = row
    assert (run_id, agent_id) == (event.data.run_id, "agent_e2e")
    assert background == event.data.output["background"]
    assert outreach_angle == event.data.output["outreach_angle"]
    assert received_at.startswith("20")


def test_the_same_delivery_twice_is_stored_once(server: Server) -> None:
    request = signed_request(make_event("run.completed"), SECRET)
    first = send(server, request.body, request.headers)
    second = send(server, request.body, request.headers)
    assert first[0] == second[0] == 200
    assert json.loads(second[2]) == {"received": True, "duplicate": True}
    assert len(server.rows("leads", request.json()["data"]["run_id"])) == 1


def test_an_integer_run_id_is_accepted(server: Server) -> None:
    event = make_event("run.completed")
    raw = event.model_dump(mode="json")
    raw["data"]["run_id"] = 9_007_199_254_740_993  # beyond a double's exact range
    request = signed_request(raw, SECRET)
    assert send(server, request.body, request.headers)[0] == 200
    assert len(server.rows("leads", "9007199254740993")) == 1


def test_a_forged_signature_is_refused_and_nothing_stored(server: Server) -> None:
    event = make_event("run.completed")
    forged = signed_request(event, "whsec-not-the-secret")
    status, _, body = send(server, forged.body, forged.headers)
    assert (status, json.loads(body)) == (401, {"error": "Invalid signature"})
    assert server.rows("leads", event.data.run_id) == []


def test_a_missing_signature_is_refused(server: Server) -> None:
    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    headers = {"Content-Type": "application/json"}
    assert send(server, request.body, headers)[0] == 401
    assert server.rows("leads", event.data.run_id) == []


def test_a_body_changed_after_signing_is_refused(server: Server) -> None:
    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    pretty = json.dumps(request.json(), indent=2).encode()
    assert send(server, pretty, request.headers)[0] == 401
    assert send(server, request.body + b"\n", request.headers)[0] == 401
    assert server.rows("leads", event.data.run_id) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_405(server: Server, method: str) -> None:
    request = signed_request(make_event("run.completed"), SECRET)
    body = request.body if method != "GET" else b""
    status, headers, _ = send(server, body, request.headers, method=method)
    assert status == 405
    assert headers["Allow"] == "POST"


def test_a_run_failed_is_stored_in_failures(server: Server) -> None:
    event = make_event("run.failed", error={"type": "timeout", "message": "agent took too long"})
    request = signed_request(event, SECRET)
    assert send(server, request.body, request.headers)[0] == 200
    assert server.rows("failures", event.data.run_id) == [
        (event.data.run_id, "timeout", "agent took too long")
    ]
    assert server.rows("leads", event.data.run_id) == []


def test_an_unknown_event_is_acknowledged_and_not_stored(server: Server) -> None:
    event = make_event("run.cancelled")
    request = signed_request(event, SECRET)
    assert send(server, request.body, request.headers)[0] == 200
    assert server.rows("leads", str(event.run_id)) == []
    assert server.rows("failures", str(event.run_id)) == []


def test_an_output_that_is_not_a_lead_profile_is_a_500_and_retried(server: Server) -> None:
    # The typed handler cannot run: nothing is recorded, so the sender's retry is not a
    # duplicate; the response does not say why (that is in the log).
    event = make_event("run.completed", output={"score": 3})
    request = signed_request(event, SECRET)
    for _ in range(2):
        status, _, body = send(server, request.body, request.headers)
        assert (status, json.loads(body)) == (500, {"error": "Handler failed"})
    assert server.rows("leads", event.data.run_id) == []


def test_the_server_log_names_refusals_and_never_the_secret(server: Server) -> None:
    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    forged = {**request.headers, "X-FlyMyAI-Signature": "0" * 64}
    assert send(server, request.body, forged)[0] == 401
    log = server_log(server.proc)
    assert "reason=signature_mismatch" in log
    assert SECRET not in log
    assert sign(request.body, SECRET) not in log


@pytest.mark.parametrize("server", ["fastapi-uvicorn"], indirect=True)
def test_fastapi_keeps_its_own_routes(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"ok": True})
    finally:
        conn.close()


@pytest.mark.parametrize("server", ["django-gunicorn", "django-uvicorn"], indirect=True)
def test_the_django_example_journals_in_its_own_database(server: Server) -> None:
    import os
    import subprocess

    from tests.servers import EXAMPLES, PYTHON, ROOT

    event = make_event("run.completed")
    request = signed_request(event, SECRET)
    for _ in range(2):  # the second is a duplicate, answered from the shared DjangoStore
        assert send(server, request.body, request.headers)[0] == 200
    bad = signed_request(make_event("run.completed", output={"score": 3}), SECRET)
    assert send(server, bad.body, bad.headers)[0] == 500
    env = {**os.environ, **server.env, "PYTHONPATH": os.pathsep.join((str(ROOT), str(EXAMPLES)))}

    def journal(*args: str) -> dict[str, object]:
        manage = str(EXAMPLES / "django_project" / "manage.py")
        out = subprocess.run(
            [PYTHON, manage, "flymy_journal", *args, "--json"],
            env=env,
            cwd=EXAMPLES,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        data: dict[str, object] = json.loads(out.stdout)
        return data

    entry = journal("show", event.data.run_id)
    assert (entry["state"], entry["attempts"]) == ("handled", 2)
    failed = journal("show", bad.json()["data"]["run_id"])
    assert failed["state"] == "failed"
    [outcome] = failed["handlers"].values()  # type: ignore[attr-defined]
    assert str(outcome["error"]).startswith("OutputMismatch: output of run")
