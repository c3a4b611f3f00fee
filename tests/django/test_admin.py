"""The journal's admin pages, rendered by Django's test client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from tests.conftest import SECRET
from tests.django.conftest import request_for

HOSTILE = "<script>alert('x')</script>\x1b[31m"


def _admin_urls() -> type:
    from django.contrib import admin
    from django.urls import path

    return type("Urls", (), {"urlpatterns": [path("admin/", admin.site.urls)]})


@pytest.fixture
def client(sqlite_alias: str) -> Iterator[Any]:
    from django.contrib.auth.models import User
    from django.test import Client, override_settings

    User.objects.filter(username="ops").delete()
    user = User.objects.create_superuser("ops", "ops@example.com", "pw-tests-only")
    client = Client()
    client.force_login(user)
    with override_settings(ROOT_URLCONF=_admin_urls()):
        yield client
    user.delete()


@pytest.fixture
def deliveries(sqlite_alias: str) -> tuple[Receiver, list[bool]]:
    """A handled, a failed and an ignored entry; ``broken[0] = False`` fixes the handler."""
    from flymy_receiver.django import DjangoStore

    receiver = Receiver(SECRET, store=DjangoStore())
    broken = [True]

    @receiver.on("run.completed")
    def save(event: RunCompleted) -> None:
        if broken[0] and event.data.agent_id == "agent_crm":
            raise RuntimeError("crm is down")

    assert receiver.handle(*request_for("run_failed_one", agent_id="agent_crm")).status == 500
    body, headers = request_for("run_fine", agent_id="agent_other", output={"note": HOSTILE})
    assert receiver.handle(body, headers).status == 200
    from flymy_receiver.testing import make_event, signed_request

    cancelled = signed_request(make_event("run.cancelled", run_id="run_cancelled"), SECRET)
    assert receiver.handle(cancelled.body, cancelled.headers).status == 200
    return receiver, broken


CHANGELIST = "/admin/flymy_receiver/journalentry/"


def _rows(page: bytes) -> list[str]:
    """The run ids listed on a changelist page, in order."""
    return re.findall(r'<th class="field-run_id"><a href="[^"]*">([^<]+)</a>', page.decode())


def test_the_list_shows_every_entry_newest_first(client: Any, deliveries: Any) -> None:
    response = client.get(CHANGELIST)
    assert response.status_code == 200
    assert _rows(response.content) == ["run_cancelled", "run_fine", "run_failed_one"]
    text = response.content.decode()
    for state in ("failed", "handled", "ignored"):
        assert f'<td class="field-shown_state">{state}</td>' in text


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("state=failed", ["run_failed_one"]),
        ("event=run.cancelled", ["run_cancelled"]),
        ("agent_id=agent_other", ["run_fine"]),
        ("q=run_fine", ["run_fine"]),
        (
            "received_at__gte=2000-01-01+00%3A00%3A00%2B00%3A00",
            ["run_cancelled", "run_fine", "run_failed_one"],
        ),
        ("received_at__lt=2000-01-01+00%3A00%3A00%2B00%3A00", []),
    ],
)
def test_filters_and_search(client: Any, deliveries: Any, query: str, expected: list[str]) -> None:
    response = client.get(f"{CHANGELIST}?{query}")
    assert response.status_code == 200
    assert _rows(response.content) == expected


def test_the_filters_are_offered(client: Any, deliveries: Any) -> None:
    text = client.get(CHANGELIST).content.decode()
    assert "?state=failed" in text
    assert "?event=run.cancelled" in text
    assert "?agent_id=agent_crm" in text
    assert "received_at__gte=" in text  # the date filter


def test_the_detail_escapes_the_body_and_shows_each_outcome(client: Any, deliveries: Any) -> None:
    from flymy_receiver.django.models import JournalEntry

    fine = JournalEntry.objects.get(run_id="run_fine")
    response = client.get(f"{CHANGELIST}{fine.pk}/change/")
    assert response.status_code == 200
    text = response.content.decode()
    assert "&lt;script&gt;alert(" in text
    assert "<script>alert(" not in text
    assert "\x1b" not in text
    assert "\\u001b[31m" in text  # the terminal escape shown as (JSON-escaped) text
    assert '"run_id": "run_fine"' in text.replace("&quot;", '"')  # pretty-printed
    assert 'name="_save"' not in text  # read-only

    failed = JournalEntry.objects.get(run_id="run_failed_one")
    text = client.get(f"{CHANGELIST}{failed.pk}/change/").content.decode()
    assert "RuntimeError: crm is down" in text
    assert "Traceback (most recent call last)" in text
    assert "failed" in text


def test_without_a_receiver_the_pages_say_so_and_replay_refuses(
    client: Any, deliveries: Any
) -> None:
    from flymy_receiver.django.models import JournalEntry

    text = client.get(CHANGELIST).content.decode()
    assert "No receiver is configured" in text
    assert "FLYMY_RECEIVER" in text
    failed = JournalEntry.objects.get(run_id="run_failed_one")
    response = client.post(
        CHANGELIST, {"action": "replay_selected", "_selected_action": [failed.pk]}, follow=True
    )
    assert "No receiver is configured" in response.content.decode()
    failed.refresh_from_db()
    assert failed.state == "failed"


def test_replay_selected_runs_the_fixed_handler_and_the_state_turns_handled(
    client: Any, deliveries: Any
) -> None:
    from flymy_receiver.django import register
    from flymy_receiver.django.models import JournalEntry

    receiver, broken = deliveries
    register(receiver)
    broken[0] = False  # the fix is deployed
    failed = JournalEntry.objects.get(run_id="run_failed_one")
    response = client.post(
        CHANGELIST, {"action": "replay_selected", "_selected_action": [failed.pk]}, follow=True
    )
    assert response.status_code == 200
    assert "Replayed: 1 handled." in response.content.decode()
    failed.refresh_from_db()
    assert failed.state == "handled"
    assert failed.attempts == 1  # a replay is not a delivery
    assert all(o["ok"] for o in failed.handlers.values())
    assert "No receiver is configured" not in client.get(CHANGELIST).content.decode()


#: What the FLYMY_RECEIVER setting names in the test below.
configured: Receiver | None = None


def test_the_setting_names_the_receiver(client: Any, deliveries: Any) -> None:
    from django.test import override_settings

    from flymy_receiver.django.models import JournalEntry

    global configured
    configured, broken = deliveries
    broken[0] = False
    failed = JournalEntry.objects.get(run_id="run_failed_one")
    with override_settings(FLYMY_RECEIVER=f"{__name__}:configured"):
        assert "No receiver is configured" not in client.get(CHANGELIST).content.decode()
        response = client.post(
            CHANGELIST, {"action": "replay_selected", "_selected_action": [failed.pk]}, follow=True
        )
    assert "Replayed: 1 handled." in response.content.decode()
    with override_settings(FLYMY_RECEIVER="no.such.module:receiver"):
        text = client.get(CHANGELIST).content.decode()
    assert "cannot be imported" in text
    configured = None


def test_refusals_are_listed_read_only(client: Any, sqlite_alias: str) -> None:
    from flymy_receiver.django import DjangoStore
    from flymy_receiver.testing import make_event, wrong_secret_request

    receiver = Receiver(SECRET, store=DjangoStore())
    forged = wrong_secret_request(make_event("run.completed"))
    assert receiver.handle(forged.body, forged.headers).status == 401
    assert receiver.journal is not None
    assert receiver.journal.refusals()  # waits for the background write
    url = "/admin/flymy_receiver/refusal/"
    text = client.get(url).content.decode()
    assert "signature_mismatch" in text
    assert "401" in text
    assert SECRET not in text
    assert client.get(f"{url}add/").status_code == 403
    from flymy_receiver.django.models import Refusal

    refusal = Refusal.objects.first()
    assert refusal is not None
    page = client.get(f"{url}{refusal.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()


def test_the_list_and_its_actions_are_exempt_from_atomic_requests(client: Any) -> None:
    # Replays commit their claims and records on their own, as deliveries do.
    from django.urls import resolve

    assert "default" in resolve(CHANGELIST).func._non_atomic_requests


def _page(pk: int) -> str:
    return f"{CHANGELIST}{pk}/change/"


def _entry(run_id: str) -> Any:
    from flymy_receiver.django.models import JournalEntry

    return JournalEntry.objects.get(run_id=run_id)


def test_entries_cannot_be_deleted_in_the_admin(client: Any, deliveries: Any) -> None:
    # Issue 22 L11: a failed entry is work still owed; the admin is read-only but for
    # replay and resolve, as its docstring says.
    failed = _entry("run_failed_one")
    assert client.get(f"{CHANGELIST}{failed.pk}/delete/").status_code == 403
    assert client.post(f"{CHANGELIST}{failed.pk}/delete/", {"post": "yes"}).status_code == 403
    text = client.get(CHANGELIST).content.decode()
    assert 'value="delete_selected"' not in text
    response = client.post(
        CHANGELIST,
        {"action": "delete_selected", "_selected_action": [failed.pk], "post": "yes"},
        follow=True,
    )
    assert response.status_code == 200
    failed.refresh_from_db()  # still there
    assert 'class="deletelink"' not in client.get(_page(failed.pk)).content.decode()


def test_the_entry_page_has_replay_and_it_says_what_the_replay_did(
    client: Any, deliveries: Any
) -> None:
    from flymy_receiver.django import register

    receiver, broken = deliveries
    register(receiver)
    failed = _entry("run_failed_one")
    page = client.get(_page(failed.pk)).content.decode()
    replay_url = f"{CHANGELIST}{failed.pk}/replay/"
    assert f'action="{replay_url}"' in page
    assert 'name="csrfmiddlewaretoken"' in page

    response = client.post(replay_url, follow=True)  # still broken
    text = response.content.decode()
    assert response.redirect_chain[-1][0] == _page(failed.pk)
    assert "failed again" in text
    assert "still failed" in text
    failed.refresh_from_db()
    assert failed.state == "failed"

    broken[0] = False  # the fix is deployed
    text = client.post(replay_url, follow=True).content.decode()
    assert "every handler succeeded; the entry is handled" in text
    failed.refresh_from_db()
    assert failed.state == "handled"


def test_replay_on_the_entry_page_without_a_receiver_says_so(client: Any, deliveries: Any) -> None:
    failed = _entry("run_failed_one")
    text = client.post(f"{CHANGELIST}{failed.pk}/replay/", follow=True).content.decode()
    assert "No receiver is configured" in text
    failed.refresh_from_db()
    assert failed.state == "failed"


def test_a_get_never_replays(client: Any, deliveries: Any) -> None:
    from flymy_receiver.django import register

    receiver, broken = deliveries
    register(receiver)
    broken[0] = False
    failed = _entry("run_failed_one")
    assert client.get(f"{CHANGELIST}{failed.pk}/replay/").status_code == 403
    failed.refresh_from_db()
    assert failed.state == "failed"


def test_the_buttons_need_the_csrf_token(deliveries: Any, sqlite_alias: str) -> None:
    from django.contrib.auth.models import User
    from django.test import Client, override_settings

    from flymy_receiver.django import register

    receiver, broken = deliveries
    register(receiver)
    broken[0] = False
    User.objects.filter(username="csrf").delete()
    user = User.objects.create_superuser("csrf", "csrf@example.com", "pw-tests-only")
    guarded = Client(enforce_csrf_checks=True)
    guarded.force_login(user)
    failed = _entry("run_failed_one")
    with override_settings(ROOT_URLCONF=_admin_urls()):
        assert guarded.post(f"{CHANGELIST}{failed.pk}/replay/").status_code == 403
        assert guarded.post(f"{CHANGELIST}{failed.pk}/resolve/", {"note": "x"}).status_code == 403
        page = guarded.get(_page(failed.pk)).content.decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token is not None
        response = guarded.post(
            f"{CHANGELIST}{failed.pk}/replay/", {"csrfmiddlewaretoken": token.group(1)}
        )
        assert response.status_code == 302
    failed.refresh_from_db()
    assert failed.state == "handled"
    user.delete()


def test_the_buttons_need_the_change_permission(deliveries: Any, sqlite_alias: str) -> None:
    from django.contrib.auth.models import Permission, User
    from django.test import Client, override_settings

    from flymy_receiver.django import register

    receiver, broken = deliveries
    register(receiver)
    broken[0] = False
    User.objects.filter(username__in=["viewer", "outsider"]).delete()
    viewer = User.objects.create_user("viewer", password="pw-tests-only", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_journalentry"))
    outsider = User.objects.create_user("outsider", password="pw-tests-only")  # not staff
    failed = _entry("run_failed_one")
    replay_url = f"{CHANGELIST}{failed.pk}/replay/"
    with override_settings(ROOT_URLCONF=_admin_urls()):
        client = Client()
        client.force_login(viewer)
        page = client.get(_page(failed.pk))
        assert page.status_code == 200
        assert replay_url not in page.content.decode()  # no buttons to see
        assert client.post(replay_url).status_code == 403
        assert client.post(f"{CHANGELIST}{failed.pk}/resolve/", {"note": "x"}).status_code == 403
        client.force_login(outsider)
        response = client.post(replay_url)
        assert response.status_code == 302
        assert "/login/" in response["Location"]
    failed.refresh_from_db()
    assert failed.state == "failed"
    viewer.delete()
    outsider.delete()


def test_a_deferred_handler_is_shown_with_its_state_and_attempts(
    client: Any, deliveries: Any
) -> None:
    from flymy_receiver.stores.records import HandlerOutcome

    entry = _entry("run_fine")
    entry.handlers = {
        "app.enrich": HandlerOutcome(
            ok=False, state="queued", attempts=0, deferred=True, queued_at=1.0
        ).to_dict(),
        "app.mail": HandlerOutcome(
            ok=False, error="SMTPError: 451", state="failed", attempts=3, deferred=True
        ).to_dict(),
        "app.crm": HandlerOutcome(ok=False, state="running", attempts=2, deferred=True).to_dict(),
    }
    entry.save(update_fields=["handlers"])
    text = client.get(_page(entry.pk)).content.decode()
    rows = re.findall(r"<tr><td><code>([^<]+)</code></td><td>([^<]+)</td><td>([^<]+)</td>", text)
    assert rows == [
        ("app.enrich", "deferred, queued", "0"),
        ("app.mail", "deferred, failed", "3"),
        ("app.crm", "deferred, running", "2"),
    ]
    assert "SMTPError: 451" in text


def test_resolve_on_the_entry_page_keeps_the_note(client: Any, deliveries: Any) -> None:
    failed = _entry("run_failed_one")
    resolve_url = f"{CHANGELIST}{failed.pk}/resolve/"
    page = client.get(_page(failed.pk)).content.decode()
    assert f'action="{resolve_url}"' in page
    text = client.post(resolve_url, {"note": "   "}, follow=True).content.decode()
    assert "Say why the entry is resolved" in text
    failed.refresh_from_db()
    assert failed.state == "failed"

    # No receiver is needed: resolving runs nothing.
    text = client.post(resolve_url, {"note": f"refunded by hand {HOSTILE}"}, follow=True)
    text = text.content.decode()
    assert "is resolved" in text
    failed.refresh_from_db()
    assert failed.state == "resolved"
    assert "refunded by hand &lt;script&gt;" in text
    assert "\x1b" not in text
    assert f'action="{resolve_url}"' not in text  # nothing left to resolve
    assert _rows(client.get(f"{CHANGELIST}?state=failed").content) == []
    assert _rows(client.get(f"{CHANGELIST}?state=resolved").content) == ["run_failed_one"]


def test_the_history_table_shows_every_attempt(client: Any, deliveries: Any) -> None:
    from flymy_receiver.django import register

    receiver, broken = deliveries
    assert receiver.handle(*request_for("run_failed_one", agent_id="agent_crm")).status == 500
    register(receiver)
    broken[0] = False
    failed = _entry("run_failed_one")
    client.post(f"{CHANGELIST}{failed.pk}/replay/")
    text = client.get(_page(failed.pk)).content.decode()
    table = text[text.index('class="flymy-history"') :]
    table = table[: table.index("</table>")]
    cells = re.findall(r"<tr><td>[^<]+</td><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", table)
    assert cells == [  # newest first
        ("replay", "200", "handled"),
        ("sender", "500", "failed"),
        ("sender", "500", "failed"),
    ]


def test_a_stalled_entry_is_shown_and_filtered_as_a_failure(client: Any, deliveries: Any) -> None:
    # Issue 22 L2 in the admin: a worker that died leaves "pending"; once its lease has
    # ended the entry is found with the failures.
    entry = _entry("run_fine")
    entry.state, entry.lease_until = "pending", 1.0
    entry.save(update_fields=["state", "lease_until"])
    text = client.get(CHANGELIST).content.decode()
    assert '<td class="field-shown_state">stalled</td>' in text
    assert _rows(client.get(f"{CHANGELIST}?state=failed").content) == [
        "run_fine",
        "run_failed_one",
    ]
    assert _rows(client.get(f"{CHANGELIST}?state=stalled").content) == ["run_fine"]
    assert _rows(client.get(f"{CHANGELIST}?state=pending").content) == []


def test_search_finds_a_long_run_id(client: Any, sqlite_alias: str) -> None:
    from flymy_receiver.django import DjangoStore

    receiver = Receiver(SECRET, store=DjangoStore())
    long_run = "run_" + "x" * 3000
    assert receiver.handle(*request_for(long_run)).status == 200
    response = client.get(CHANGELIST, {"q": long_run})
    assert response.status_code == 200
    assert len(_rows(response.content)) == 1
