"""The inspector's JSON API: what scripts (and the page's own script) read."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from flymy_receiver import Receiver
from flymy_receiver.inspector import inspector_app
from flymy_receiver.stores import MemoryStore
from flymy_receiver.testing import make_event, signed_request, wrong_secret_request
from tests.conftest import SECRET
from tests.inspector.conftest import Crm, client_for, deliver


def test_deliveries_newest_first_with_the_documented_fields(
    receiver: Receiver, client: Any
) -> None:
    first = deliver(receiver, run_id="run_one", agent_id="agent_a")
    second = deliver(receiver, "run.failed", run_id="run_two", agent_id="agent_b")
    answer = client.get("/api/deliveries")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    deliveries = answer.json()["deliveries"]
    assert [d["run_id"] for d in deliveries] == ["run_two", "run_one"]
    newest = deliveries[0]
    assert {"key", "run_id", "event", "state", "attempts", "agent_id", "received_at"} <= set(newest)
    assert newest["key"] == "run.failed:run_two"
    assert newest["event"] == second.event == "run.failed"
    assert newest["state"] == "ignored"  # no handler wants run.failed here
    assert deliveries[1]["state"] == "handled"
    assert deliveries[1]["attempts"] == 1
    assert first.data.run_id == "run_one"


def test_filters_are_query_parameters(receiver: Receiver, crm: Crm, client: Any) -> None:
    deliver(receiver, run_id="run_ok", agent_id="agent_a")
    crm.down = True
    deliver(receiver, run_id="run_bad", agent_id="agent_b")
    deliver(receiver, "run.failed", run_id="run_f", agent_id="agent_a")

    def runs(**params: str) -> list[str]:
        answer = client.get("/api/deliveries", params=params)
        assert answer.status_code == 200, answer.text
        return [d["run_id"] for d in answer.json()["deliveries"]]

    assert runs(state="failed") == ["run_bad"]
    assert runs(event="run.completed") == ["run_bad", "run_ok"]
    assert runs(agent_id="agent_a") == ["run_f", "run_ok"]
    assert runs(limit="1") == ["run_f"]
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert runs(since=future) == []
    assert len(runs(since="2000-01-01T00:00:00Z")) == 3
    assert len(runs(since="2000-01-01T00:00:00")) == 3  # no offset: UTC


@pytest.mark.parametrize(
    ("params", "complaint"),
    [
        ({"state": "done"}, "state must be one of"),
        ({"limit": "0"}, "limit must be"),
        ({"limit": "-3"}, "limit must be"),
        ({"limit": "9" * 50}, "limit must be"),
        ({"limit": "ten"}, "limit must be"),
        # The value checked is the value used: no leading zeros, nothing past the cap.
        ({"limit": "000100999999"}, "limit must be"),
        ({"limit": "0100"}, "limit must be"),
        ({"limit": "1001"}, "limit must be"),
        ({"limit": "1" * 5000}, "limit must be"),
        ({"limit": "\uff11\uff10\uff10"}, "limit must be"),  # fullwidth digits: isdigit() says yes
        ({"since": "9999-12-31T23:59:59-23:59"}, "since must be an ISO 8601 time"),
        ({"until": "0001-01-01T00:00:00+23:59"}, "until must be an ISO 8601 time"),
        ({"run_id": "r" * 500}, "run_id is longer"),
        ({"before": "k" * 500}, "before is longer"),
        ({"since": "yesterday"}, "since must be an ISO 8601 time"),
        ({"event": "x" * 500}, "event is longer"),
    ],
)
def test_bad_filters_get_400_and_a_reason(
    client: Any, params: dict[str, str], complaint: str
) -> None:
    answer = client.get("/api/deliveries", params=params)
    assert answer.status_code == 400
    assert complaint in answer.json()["error"]


def test_one_delivery_by_key_or_run_id(receiver: Receiver, crm: Crm, client: Any) -> None:
    crm.down = True
    event = deliver(receiver, run_id="run_detail", output={"score": 3})
    by_key = client.get("/api/deliveries/run.completed:run_detail")
    assert by_key.status_code == 200
    detail = by_key.json()
    assert client.get("/api/deliveries/run_detail").json() == detail
    assert detail["state"] == "failed"
    assert detail["event"] == event.event
    assert '"score":3' in detail["body"].replace(" ", "")
    assert detail["headers"]["X-FlyMyAI-Signature"].startswith("valid")
    (outcome,) = detail["handlers"].values()
    assert outcome["ok"] is False
    assert outcome["error"] == "RuntimeError: the CRM refused the profile"
    assert "Traceback (most recent call last)" in outcome["traceback"]
    # The list leaves tracebacks to the detail.
    (listed,) = client.get("/api/deliveries").json()["deliveries"]
    (short,) = listed["handlers"].values()
    assert "traceback" not in short
    assert short["error"] == outcome["error"]


def test_keys_with_slashes_and_query_characters_are_reachable(
    receiver: Receiver, client: Any
) -> None:
    deliver(receiver, run_id="run/with?odd#chars %")
    (listed,) = client.get("/api/deliveries").json()["deliveries"]
    from urllib.parse import quote

    path = "/api/deliveries/" + quote(listed["key"], safe="")
    assert client.get(path).json()["run_id"] == "run/with?odd#chars %"
    page = client.get("/deliveries/" + quote(listed["key"], safe=""))
    assert page.status_code == 200
    assert "run/with?odd#chars %" in page.text


def test_the_raw_body_is_exactly_what_was_signed(receiver: Receiver, client: Any) -> None:
    event = make_event("run.completed", run_id="run_raw")
    request = signed_request(event, SECRET)
    receiver.handle(request.body, request.headers)
    raw = client.get("/api/bodies/run.completed:run_raw")
    assert raw.status_code == 200
    assert raw.content == request.body
    assert "sandbox" in raw.headers["content-security-policy"]


def test_unknown_delivery_is_404_json(client: Any) -> None:
    for path in ("/api/deliveries/nothing", "/api/bodies/nothing"):
        answer = client.get(path)
        assert answer.status_code == 404
        assert answer.json() == {"error": "no delivery with this key or run id"}


def test_refusals_with_reason_and_hint(receiver: Receiver, client: Any) -> None:
    forged = wrong_secret_request(make_event("run.completed"))
    assert receiver.handle(forged.body, forged.headers).status == 401
    answer = client.get("/api/refusals")
    assert answer.status_code == 200
    (refusal,) = answer.json()["refusals"]
    assert refusal["status"] == 401
    assert refusal["reason"] == "signature_mismatch"
    assert refusal["detail"]  # the hint
    assert client.get("/api/refusals", params={"limit": "0"}).status_code == 400


def test_a_failing_store_is_503_without_its_message(receiver: Receiver, client: Any) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("redis://:hunter2@10.0.0.1 is down")

    store = receiver.store
    store.journal_list = broken  # type: ignore[method-assign]
    store.journal_get = broken  # type: ignore[method-assign]
    store.refusals = broken  # type: ignore[method-assign]
    for path in ("/api/deliveries", "/api/deliveries/x", "/api/refusals", "/", "/deliveries/x"):
        answer = client.get(path)
        assert answer.status_code == 503, path
        assert "hunter2" not in answer.text
        assert "unavailable" in answer.text


def test_a_store_alone_is_read_only(receiver: Receiver) -> None:
    deliver(receiver, run_id="run_store_only")
    with client_for(inspector_app(store=receiver.store)) as client:
        (listed,) = client.get("/api/deliveries").json()["deliveries"]
        assert listed["run_id"] == "run_store_only"
        page = client.get("/deliveries/run_store_only")
        assert page.status_code == 200
        assert "Replay needs the app's receiver" in page.text
        assert 'action="/replay"' not in page.text
        assert "Sending a test event needs the app's receiver" in client.get("/").text


def test_no_journal_is_said_plainly() -> None:
    receiver = Receiver(secret=SECRET, store=MemoryStore(), journal=False)
    with client_for(inspector_app(receiver)) as client:
        answer = client.get("/api/deliveries")
        assert answer.status_code == 404
        assert "keeps no delivery journal" in answer.json()["error"]
        assert "keeps no delivery journal" in client.get("/").text
