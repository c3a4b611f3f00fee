"""The entry page's Replay and Resolve in a real Chromium, against a live Django server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.django.test_admin import CHANGELIST, _admin_urls
from tests.django.test_admin import deliveries as deliveries  # the fixture

PASSWORD = "pw-tests-only"


@pytest.fixture
def live_admin(sqlite_alias: str) -> Iterator[str]:
    """The admin served over HTTP on a loopback port (stopped at the end), and a superuser."""
    from django.contrib.auth.models import User
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.test import override_settings

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    User.objects.filter(username="browser").delete()
    user = User.objects.create_superuser("browser", "browser@example.com", PASSWORD)
    with override_settings(ROOT_URLCONF=_admin_urls(), ALLOWED_HOSTS=["127.0.0.1"]):
        server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet, allow_reuse_address=False)
        server.set_app(WSGIHandler())
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)
    user.delete()


def test_replay_and_resolve_from_the_entry_page(live_admin: str, deliveries: Any) -> None:
    from selenium.webdriver.common.by import By

    from flymy_receiver.django import register
    from flymy_receiver.django.models import JournalEntry
    from tests.inspector.browser import chromium, wait_for

    receiver, _ = deliveries  # the handler is still broken
    register(receiver)
    failed = JournalEntry.objects.get(run_id="run_failed_one")
    page = f"{live_admin}{CHANGELIST}{failed.pk}/change/"

    def message(driver: Any) -> str:
        found = driver.find_elements(By.CSS_SELECTOR, "ul.messagelist li")
        return " ".join(element.text for element in found)

    with chromium() as browser:
        browser.get(f"{live_admin}/admin/login/?next={CHANGELIST}{failed.pk}/change/")
        browser.find_element(By.NAME, "username").send_keys("browser")
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        wait_for(browser, lambda b: b.find_elements(By.NAME, "_replay"), "no Replay button")
        assert browser.current_url == page

        browser.find_element(By.NAME, "_replay").click()
        assert "failed again" in wait_for(browser, message, "no message after Replay")
        assert browser.current_url == page

        browser.find_element(By.NAME, "_resolve").click()  # no note: the browser holds it
        assert browser.find_element(By.ID, "flymy-note").get_attribute("validationMessage")
        browser.find_element(By.ID, "flymy-note").send_keys("refunded by hand")
        browser.find_element(By.NAME, "_resolve").click()
        assert "is resolved" in wait_for(
            browser, lambda b: "resolved" in message(b) and message(b), "no message"
        )
        assert "refunded by hand" in browser.find_element(By.CSS_SELECTOR, ".field-resolution").text
    failed.refresh_from_db()
    assert failed.state == "resolved"
