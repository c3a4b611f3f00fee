"""Operating the journal from the inspector: history, Resolve, Resend, copy as curl, keyset
pages, run-id search, bulk replay with a dry-run count, deferred handler states; lists that
never read a body."""

from __future__ import annotations

import hmac
import os
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flymy_receiver import Receiver
from flymy_receiver.inspector import inspector_app
from flymy_receiver.signature import SIGNATURE_HEADER
from flymy_receiver.stores import MemoryStore
from flymy_receiver.stores.records import Attempt, HandlerOutcome, NewEntry
from tests.conftest import SECRET
from tests.inspector.conftest import ORIGIN, Crm, client_for, csrf_of, deliver

ROOT = Path(__file__).resolve().parents[2]
SAME_ORIGIN = {"Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"}


def _post(client: Any, path: str, form: dict[str, str], **kwargs: Any) -> Any:
    data = {**form, "csrf_token": csrf_of(client)}
    return client.post(path, data=data, headers=SAME_ORIGIN, follow_redirects=False, **kwargs)


def _runs(client: Any, **params: str) -> list[str]:
    answer = client.get("/api/deliveries", params=params)
    assert answer.status_code == 200, answer.text
    return [d["run_id"] for d in answer.json()["deliveries"]]


# -- lists never read bodies ------------------------------------------------------------


class CountingStore(MemoryStore):
    """A real MemoryStore that counts the calls that return bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    def journal_get(self, key_or_run_id: str) -> Any:
        self.gets += 1
        return super().journal_get(key_or_run_id)


def test_the_live_list_and_a_delivery_pages_refresh_read_summaries_only(crm: Crm) -> None:
    store = CountingStore()
    receiver = Receiver(secret=SECRET, store=store)
    receiver.on("run.completed")(lambda event: None)
    deliver(receiver, run_id="run_big", output={"blob": "x" * 200_000})
    with client_for(inspector_app(receiver)) as client:
        page = client.get("/deliveries/run_big")  # the body is read once, to show it
        assert page.status_code == 200
        assert store.gets == 1
        assert 'data-run="run_big"' in page.text
        for _ in range(3):  # what the list polls, and what the delivery page polls
            listed = client.get("/api/deliveries", params={"limit": "100"}).json()
            polled = client.get("/api/deliveries", params={"run_id": "run_big", "limit": "50"})
            (row,) = polled.json()["deliveries"]
            assert row["key"] == "run.completed:run_big"
            assert row["state"] == "handled"
            assert "body" not in row
            assert len(polled.content) < 5_000  # independent of the 200 KB body
            assert "body" not in listed["deliveries"][0]
        assert store.gets == 1
    script = (ROOT / "flymy_receiver/inspector/static/inspector.js").read_text()
    assert '"api/deliveries?limit=50&run_id="' in script
    assert '"api/deliveries/" + encodeURIComponent(key)' not in script


# -- pages of older entries, run-id search ----------------------------------------------


def test_older_pages_follow_the_keyset(receiver: Receiver, client: Any) -> None:
    for n in range(5):
        deliver(receiver, run_id=f"run_{n}")
    first = client.get("/api/deliveries", params={"limit": "2"}).json()
    assert [d["run_id"] for d in first["deliveries"]] == ["run_4", "run_3"]
    assert first["before"] == "run.completed:run_3"
    second = client.get("/api/deliveries", params={"limit": "2", "before": first["before"]})
    assert [d["run_id"] for d in second.json()["deliveries"]] == ["run_2", "run_1"]
    last = client.get("/api/deliveries", params={"limit": "2", "before": "run.completed:run_1"})
    assert [d["run_id"] for d in last.json()["deliveries"]] == ["run_0"]
    assert last.json()["before"] is None
    page = client.get("/", params={"limit": "2"}).text
    assert 'id="older" href="/?limit=2&amp;before=run.completed%3Arun_3"' in page
    older = client.get("/", params={"limit": "2", "before": "run.completed:run_3"}).text
    assert "run_2" in older
    assert "run_4" not in older


def test_run_id_search(receiver: Receiver, client: Any) -> None:
    deliver(receiver, run_id="run_wanted")
    deliver(receiver, run_id="run_other")
    assert _runs(client, run_id="run_wanted") == ["run_wanted"]
    page = client.get("/", params={"run_id": "run_wanted"}).text
    assert 'name="run_id" value="run_wanted"' in page
    assert "run_other" not in page


# -- the entry page ---------------------------------------------------------------------


def test_the_entry_page_shows_the_history(receiver: Receiver, crm: Crm, client: Any) -> None:
    crm.down = True
    event = deliver(receiver, run_id="run_hist")
    receiver.handle(*_request(event))  # the sender's retry: failed again
    crm.down = False
    assert _post(client, "/replay", {"key": "run_hist"}).status_code == 303
    page = client.get("/deliveries/run_hist").text
    history = page[page.index('id="history"') : page.index("</table>", page.index('id="history"'))]
    cells = [row.split("</td><td>")[1:4] for row in history.split("<tr><td>")[1:]]
    assert cells == [  # newest first
        ["replay", "200", "handled"],
        ["sender", "500", "failed"],
        ["sender", "500", "failed"],
    ]


def _request(event: Any) -> tuple[bytes, dict[str, str]]:
    from flymy_receiver.testing import signed_request

    request = signed_request(event, SECRET)
    return request.body, request.headers


def test_deferred_handlers_show_their_state_and_attempts() -> None:
    store = MemoryStore()
    receiver = Receiver(secret=SECRET, store=store)
    body = b'{"event":"run.completed","timestamp":"2025-01-15T10:00:15Z","data":{"run_id":"r1"}}'
    new = NewEntry("run.completed:r1", "run.completed", "r1", None, None, body, {}, 3600.0)
    claim = store.claim("run.completed:r1", 30.0, new)
    queued = {
        "app.enrich": HandlerOutcome(ok=False, state="queued", deferred=True),
        "app.mail": HandlerOutcome(ok=False, state="queued", deferred=True),
        "app.note": HandlerOutcome(ok=True, at=time.time()),
    }
    store.complete(
        "run.completed:r1",
        claim.token,
        3600.0,
        queued,
        Attempt(time.time(), "sender", 200, "queued"),
    )
    store.claim_handler("run.completed:r1", "app.enrich", 30.0)  # a worker runs it
    with client_for(inspector_app(receiver)) as client:
        page = client.get("/deliveries/run.completed:r1").text
        assert 'state-queued" id="state">queued<' in page
        heads = [chunk.split("</p>")[0] for chunk in page.split('<p class="handler-head">')[1:]]
        said = {h.split("<code>")[1].split("</code>")[0]: h for h in heads}
        assert ">running</span>" in said["app.enrich"]
        assert "1 attempt<" in said["app.enrich"]
        assert ">queued</span>" in said["app.mail"]
        assert "attempt" not in said["app.mail"]
        assert ">ok</span>" in said["app.note"]
        (row,) = client.get("/api/deliveries").json()["deliveries"]
        assert row["handlers"]["app.enrich"]["state"] == "running"
        assert row["handlers"]["app.enrich"]["attempts"] == 1


# -- Resolve ----------------------------------------------------------------------------


def test_resolve_with_a_note(receiver: Receiver, crm: Crm, client: Any) -> None:
    crm.down = True
    deliver(receiver, run_id="run_lost")
    empty = _post(client, "/resolve", {"key": "run_lost", "note": "  "})
    assert empty.status_code == 400
    answer = _post(client, "/resolve", {"key": "run_lost", "note": "refunded <b>by hand</b>"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/deliveries/run.completed%3Arun_lost?notice=resolved"
    page = client.get(answer.headers["location"]).text
    assert 'state-resolved" id="state">resolved<' in page
    assert "refunded &lt;b&gt;by hand&lt;/b&gt;" in page
    assert "Resolved: kept in the journal, never replayed in bulk." in page
    assert _runs(client, state="failed") == []
    assert _post(client, "/resolve", {"key": "nothing", "note": "x"}).status_code == 404


# -- bulk replay ------------------------------------------------------------------------


def test_bulk_replay_counts_first_then_replays_what_the_filter_shows(
    receiver: Receiver, crm: Crm, client: Any
) -> None:
    crm.down = True
    deliver(receiver, run_id="run_a1", agent_id="agent_a")
    deliver(receiver, run_id="run_a2", agent_id="agent_a")
    deliver(receiver, run_id="run_b1", agent_id="agent_b")
    crm.down = False
    dry = _post(client, "/replay-all", {"agent_id": "agent_a"})
    assert dry.status_code == 200
    assert '<p id="bulk-count">2 failed deliveries match this filter.</p>' in dry.text
    assert crm.saved == []  # a dry run runs nothing
    assert 'name="confirm" value="yes"' in dry.text
    assert 'name="agent_id" value="agent_a"' in dry.text
    done = _post(client, "/replay-all", {"agent_id": "agent_a", "confirm": "yes"})
    assert done.status_code == 303
    page = client.get(done.headers["location"]).text
    assert "Replayed 2: 2 handled, 0 still failed." in page
    assert sorted(crm.saved) == ["run_a1", "run_a2"]
    assert _runs(client, state="failed") == ["run_b1"]
    nothing = _post(client, "/replay-all", {"event": "run.failed"})
    assert '<p id="bulk-count">0 failed deliveries match this filter.</p>' in nothing.text
    assert 'name="confirm"' not in nothing.text


def test_bulk_replay_honours_a_run_id_filter(receiver: Receiver, crm: Crm, client: Any) -> None:
    crm.down = True
    deliver(receiver, run_id="run_one")
    deliver(receiver, run_id="run_two")
    crm.down = False
    dry = _post(client, "/replay-all", {"run_id": "run_two"})
    assert '<p id="bulk-count">1 failed delivery matches this filter.</p>' in dry.text
    done = _post(client, "/replay-all", {"run_id": "run_two", "confirm": "yes"})
    assert "Replayed 1: 1 handled, 0 still failed." in client.get(done.headers["location"]).text
    assert crm.saved == ["run_two"]


def test_bulk_replay_refuses_bad_filters_and_resolved(client: Any) -> None:
    assert _post(client, "/replay-all", {"since": "yesterday"}).status_code == 400
    assert _post(client, "/replay-all", {"state": "resolved"}).status_code == 400


# -- Resend and copy as curl ------------------------------------------------------------


class _App(BaseHTTPRequestHandler):
    """Another app: 200 for a body signed with SECRET, 401 otherwise."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        expected = hmac.new(SECRET.encode(), body, sha256).hexdigest()
        good = hmac.compare_digest(self.headers.get(SIGNATURE_HEADER, ""), expected)
        if good:
            self.bodies.append(body)
        self.send_response(200 if good else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_app() -> Iterator[str]:
    _App.bodies.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/webhooks/flymy"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_resend_posts_the_stored_body_signed_afresh(
    receiver: Receiver, client: Any, other_app: str
) -> None:
    event = deliver(receiver, run_id="run_resend")
    answer = _post(client, "/resend", {"key": "run_resend", "url": other_app})
    assert answer.status_code == 200
    assert f"Resent to {other_app}: it answered 200." in answer.text
    assert _App.bodies == [_request(event)[0]]
    assert SECRET not in answer.text
    unreachable = _post(client, "/resend", {"key": "run_resend", "url": "http://127.0.0.1:1/"})
    assert unreachable.status_code == 400
    assert "Could not resend" in unreachable.text
    bad = _post(client, "/resend", {"key": "run_resend", "url": "file:///etc/passwd"})
    assert bad.status_code == 400


def test_copy_as_curl_gives_a_command_that_is_accepted(
    receiver: Receiver, client: Any, other_app: str
) -> None:
    event = deliver(receiver, run_id="run_curl", output={"quote": 'it\'s "$HOME" `id`'})
    answer = client.get("/api/curl/run_curl", params={"url": other_app})
    assert answer.status_code == 200, answer.text
    command = answer.json()["command"]
    signature = hmac.new(SECRET.encode(), _request(event)[0], sha256).hexdigest()
    assert SECRET not in command
    assert signature not in command
    # Run its equivalent: the body the command holds, signed as it signs, POSTed.
    body = _body_of(command)
    assert body == _request(event)[0]
    _post_signed(other_app, body)
    assert _App.bodies == [body]
    # And where the tools exist, the command itself, by a shell.
    tools = [shutil.which(name) for name in ("bash", "openssl", "curl", "awk")]
    if all(tools):
        env = {"PATH": os.environ.get("PATH", ""), "FLYMY_WEBHOOK_SECRET": SECRET}
        done = subprocess.run(
            ["bash", "-c", command + " -o /dev/null -w '%{http_code}'"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.stdout == "200", done.stderr
        assert _App.bodies == [body, body]
    assert client.get("/api/curl/run_curl").status_code == 400
    assert client.get("/api/curl/run_curl", params={"url": "ftp://x/"}).status_code == 400
    assert client.get("/api/curl/nothing", params={"url": other_app}).status_code == 404


def _body_of(command: str) -> bytes:
    """The body a ``body='...'; ...`` command assigns (shell quoting undone)."""
    assignment = shlex.split(command.split("; signature=", 1)[0])
    (word,) = assignment
    assert word.startswith("body=")
    return word.removeprefix("body=").encode()


def _post_signed(url: str, body: bytes) -> None:
    import urllib.request

    signature = hmac.new(SECRET.encode(), body, sha256).hexdigest()
    request = urllib.request.Request(  # noqa: S310 - a local test URL
        url, data=body, method="POST",
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: signature},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - a local test URL
        assert answer.status == 200


# -- a replay that ran no handler -------------------------------------------------------


def test_a_replay_that_runs_no_handler_says_so(receiver: Receiver, crm: Crm) -> None:
    crm.down = True
    deliver(receiver, run_id="run_orphan")
    # The app was changed: its handler for this event is gone.
    changed = Receiver(secret=SECRET, store=receiver.store)
    with client_for(inspector_app(changed)) as client:
        answer = _post(client, "/replay", {"key": "run_orphan"})
        assert answer.headers["location"].endswith("?notice=replay-no-handler")
        page = client.get(answer.headers["location"]).text
        assert '<p class="problem" id="notice" role="status">Replayed, but no handler ran' in page
        assert 'state-failed" id="state">failed<' in page


# -- the new forms are guarded like Replay ----------------------------------------------


@pytest.mark.parametrize("path", ["/resolve", "/resend", "/replay-all"])
def test_the_new_forms_need_the_csrf_token_and_the_same_origin(
    receiver: Receiver, crm: Crm, client: Any, path: str
) -> None:
    crm.down = True
    deliver(receiver, run_id="run_guard")
    form = {"key": "run_guard", "note": "x", "url": "http://127.0.0.1:1/", "confirm": "yes"}
    no_token = client.post(path, data=form, headers=SAME_ORIGIN, follow_redirects=False)
    assert no_token.status_code == 403
    cross = client.post(
        path, data={**form, "csrf_token": csrf_of(client)},
        headers={"Origin": "http://evil.example"}, follow_redirects=False,
    )  # fmt: skip
    assert cross.status_code == 403
    assert _runs(client, state="failed") == ["run_guard"]


def test_the_inspector_sets_no_private_receiver_attribute() -> None:
    # Issue 20: the inspector uses public Receiver methods (with_store, sign).
    for path in (ROOT / "flymy_receiver/inspector").glob("*.py"):
        text = path.read_text()
        assert "receiver._" not in text, path
        assert "clone._" not in text, path
