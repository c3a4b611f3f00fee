"""The inspector's pages: escaped payloads, a delivery's detail, Replay, the test-event form."""

from __future__ import annotations

import re
from typing import Any

from flymy_receiver import Receiver
from flymy_receiver.inspector.app import BODY_SHOWN
from tests.inspector.conftest import ORIGIN, Crm, csrf_of, deliver

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def _post(client: Any, path: str, form: dict[str, str]) -> Any:
    form = {"csrf_token": csrf_of(client), **form}
    return client.post(path, data=form, headers={"Origin": ORIGIN}, follow_redirects=False)


def test_payload_values_are_escaped_everywhere(receiver: Receiver, crm: Crm, client: Any) -> None:
    crm.down = True
    deliver(
        receiver,
        run_id=f"run_{HOSTILE}",
        agent_name=HOSTILE,
        agent_id='"><svg onload=alert(1)>',
        output={"note": HOSTILE},
    )
    pages = [client.get("/").text]
    (listed,) = client.get("/api/deliveries").json()["deliveries"]
    from urllib.parse import quote

    pages.append(client.get("/deliveries/" + quote(listed["key"], safe="")).text)
    for html in pages:
        assert "<script>window" not in html
        assert "<img src=x" not in html
        assert "<svg" not in html
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html
        # The only scripts are the inspector's own file.
        assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/inspector.js" defer>']


def test_a_failed_delivery_shows_its_error_and_traceback(
    receiver: Receiver, crm: Crm, client: Any
) -> None:
    crm.down = True
    deliver(receiver, run_id="run_broken", agent_name="Lead Scorer")
    page = client.get("/deliveries/run_broken")
    assert page.status_code == 200
    html = page.text
    assert 'state-failed" id="state">failed<' in html
    assert "RuntimeError: the CRM refused the profile" in html
    assert "Traceback (most recent call last)" in html
    assert "save_profile" in html
    assert "Headers the receiver read" in html
    assert "X-FlyMyAI-Signature" in html
    assert "valid (secret 1 of 1)" in html
    assert "&#34;agent_name&#34;: &#34;Lead Scorer&#34;" in html  # the body, pretty-printed
    assert ">Replay</button>" in html
    assert 'name="key" value="run.completed:run_broken"' in html


def test_replay_through_the_form_runs_the_fixed_handler(
    receiver: Receiver, crm: Crm, client: Any
) -> None:
    crm.down = True
    deliver(receiver, run_id="run_fixme")
    crm.down = False  # the fix is deployed
    answer = _post(client, "/replay", {"key": "run.completed:run_fixme"})
    assert answer.status_code == 303
    page = client.get(answer.headers["location"])
    assert "Replayed: every handler succeeded; the delivery is handled." in page.text
    assert 'class="notice"' in page.text
    assert 'state-handled" id="state">handled<' in page.text
    assert crm.saved == ["run_fixme"]
    # A replay is not a delivery: attempts stay as the sender made them.
    assert client.get("/api/deliveries/run_fixme").json()["attempts"] == 1
    # Nothing left to run: a second replay runs no handler; force runs them again.
    _post(client, "/replay", {"key": "run.completed:run_fixme"})
    assert crm.saved == ["run_fixme"]
    _post(client, "/replay", {"key": "run.completed:run_fixme", "force": "on"})
    assert crm.saved == ["run_fixme", "run_fixme"]


def test_replay_that_fails_again_stays_failed(receiver: Receiver, crm: Crm, client: Any) -> None:
    crm.down = True
    deliver(receiver, run_id="run_still_down")
    answer = _post(client, "/replay", {"key": "run_still_down"})
    assert answer.status_code == 303
    assert answer.headers["location"].endswith("?notice=replay-failed")
    assert client.get("/api/deliveries/run_still_down").json()["state"] == "failed"
    # Said as a problem, with the error: never "Replayed." in green.
    page = client.get(answer.headers["location"]).text
    assert (
        '<p class="problem" id="notice" role="status">Replayed, but it still failed: '
        "RuntimeError: the CRM refused the profile</p>"
    ) in page
    assert "Replayed:" not in page


def test_replay_of_an_unknown_key_is_404(client: Any) -> None:
    answer = _post(client, "/replay", {"key": "run.completed:nothing"})
    assert answer.status_code == 404
    assert "No delivery with this key." in answer.text


def test_the_send_form_delivers_a_signed_test_event(
    receiver: Receiver, crm: Crm, client: Any
) -> None:
    answer = _post(
        client,
        "/send",
        {
            "event": "run.completed",
            "run_id": "run_from_form",
            "agent_name": "Lead Scorer",
            "data": '{"score": 97}',
        },
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == (
        "/deliveries/run.completed%3Arun_from_form?notice=sent&status=200"
    )
    assert crm.saved == ["run_from_form"]
    detail = client.get("/api/deliveries/run_from_form").json()
    assert detail["agent_name"] == "Lead Scorer"
    assert '"output":{"score":97}' in detail["body"]
    page = client.get(answer.headers["location"]).text
    assert "Test event sent. The receiver answered 200." in page


def test_the_send_form_reports_what_a_failing_handler_answered(
    receiver: Receiver, crm: Crm, client: Any
) -> None:
    crm.down = True
    answer = _post(client, "/send", {"event": "run.completed", "run_id": "run_500"})
    assert answer.headers["location"].endswith("?notice=sent&status=500")
    assert client.get("/api/deliveries/run_500").json()["state"] == "failed"


def test_the_send_form_explains_bad_data(client: Any) -> None:
    answer = _post(client, "/send", {"event": "run.completed", "data": "{not json"})
    assert answer.status_code == 400
    assert "the data is not JSON" in answer.text
    assert "{not json" in answer.text  # the form keeps what was typed
    answer = _post(client, "/send", {"event": "run.cancelled", "data": "[1, 2]"})
    assert answer.status_code == 400
    assert "must be a JSON object" in answer.text


def test_other_events_are_sent_with_their_data_fields(receiver: Receiver, client: Any) -> None:
    answer = _post(
        client,
        "/send",
        {"event": "run.cancelled", "data": '{"run_id": "run_c1", "reason": "user"}'},
    )
    assert answer.status_code == 303
    entry = client.get("/api/deliveries/run_c1").json()
    assert (entry["event"], entry["state"]) == ("run.cancelled", "ignored")


def test_a_large_body_is_cut_on_the_page_and_whole_in_the_api(
    receiver: Receiver, client: Any
) -> None:
    big = "x" * (BODY_SHOWN * 2)
    deliver(receiver, run_id="run_big", output={"text": big})
    page = client.get("/deliveries/run_big").text
    assert f"Showing the first {BODY_SHOWN} of" in page
    assert big not in page
    assert len(page) < BODY_SHOWN + 20_000
    assert big in client.get("/api/deliveries/run_big").json()["body"]


def test_the_list_page_renders_rows_and_refusals(receiver: Receiver, client: Any) -> None:
    deliver(receiver, run_id="run_row", agent_name="Lead Scorer", agent_id="agent_7")
    receiver.handle(b"{}", {"X-FlyMyAI-Signature": "0" * 64})
    html = client.get("/").text
    assert 'href="/deliveries/run.completed%3Arun_row">run_row</a>' in html
    assert 'Lead Scorer <span class="sub id">agent_7</span>' in html
    assert "<code>signature_mismatch</code>" in html
    assert "1 shown, newest first" in html


def test_filters_on_the_page_and_a_bad_one(receiver: Receiver, crm: Crm, client: Any) -> None:
    deliver(receiver, run_id="run_fine")
    crm.down = True
    deliver(receiver, run_id="run_sad")
    html = client.get("/", params={"state": "failed"}).text
    assert "run_sad" in html
    assert "run_fine" not in html
    assert '<option value="failed" selected>' in html
    bad = client.get("/", params={"state": "<b>"})
    assert bad.status_code == 400
    assert "state must be one of" in bad.text
    assert "<b>" not in bad.text


def test_static_assets_are_in_the_package(client: Any) -> None:
    css = client.get("/static/inspector.css")
    js = client.get("/static/inspector.js")
    assert css.status_code == js.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text  # rows are built with textContent
    assert "textContent" in js.text
