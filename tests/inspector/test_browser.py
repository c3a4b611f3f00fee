"""The inspector in a real browser (headless Chromium through Selenium).

Servers are the real commands, started as subprocesses on free loopback ports and stopped
by PID: ``listen`` for deliveries over HTTP, ``inspect --app`` for failing handlers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver.testing import make_event, signed_request, wrong_secret_request
from tests.conftest import SECRET
from tests.inspector.browser import chromium, require_browser, wait_for
from tests.servers import PYTHON, ROOT, free_port, post, serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    require_browser()
    port = free_port()
    argv = [PYTHON, "-m", "flymy_receiver", "listen", "--port", str(port), "--secret", SECRET]
    with serve(argv, port, env={"PYTHONPATH": str(ROOT)}):
        yield port


@pytest.fixture(scope="module")
def fixes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixes")


@pytest.fixture(scope="module")
def inspector(fixes: Path) -> Iterator[int]:
    require_browser()
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
    env = {"PYTHONPATH": str(ROOT), "SAMPLE_APP_FIX": str(fixes)}
    with serve(argv, port, env=env, cwd=ROOT):
        yield port


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def _deliver(port: int, **fields: Any) -> Any:
    event = make_event("run.completed", **fields)
    request = signed_request(event, SECRET)
    assert post(port, request.body, request.headers)[0] == 200
    return event


def _row_texts(browser: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#rows tr")]


def test_a_delivery_sent_over_http_appears_without_a_reload(listener: int, browser: Any) -> None:
    browser.get(f"http://127.0.0.1:{listener}/")
    browser.execute_script("window.sameDocument = 'yes';")
    _deliver(listener, run_id="run_live_1", agent_name="Lead Scorer")
    wait_for(browser, lambda b: any("run_live_1" in t for t in _row_texts(b)), "no new row")
    assert browser.execute_script("return window.sameDocument;") == "yes"  # not reloaded
    (row,) = [t for t in _row_texts(browser) if "run_live_1" in t]
    assert "Lead Scorer" in row
    assert "handled" in row
    live = browser.find_element("id", "live")
    assert live.text == "live"


def test_a_refusal_shows_its_reason(listener: int, browser: Any) -> None:
    browser.get(f"http://127.0.0.1:{listener}/")
    forged = wrong_secret_request(make_event("run.completed"))
    assert post(listener, forged.body, forged.headers)[0] == 401

    def refusal_text(b: Any) -> str:
        text: str = b.find_element("id", "refusals").text
        return text if "signature_mismatch" in text else ""

    text = wait_for(browser, refusal_text, "the refusal did not appear")
    assert "401" in text
    assert "the body or the secret differs from what the sender signed" in text


def test_a_script_payload_is_shown_as_text_and_never_runs(listener: int, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    script = "<script>window.pwned = 'script'</script>"
    image = "<img src=x onerror=\"window.pwned = 'img'\">"
    browser.get(f"http://127.0.0.1:{listener}/")
    _deliver(listener, run_id="run_xss", agent_name=image, output={"note": script})
    # Rendered by the page's script (live), then by the server (the detail page).
    wait_for(browser, lambda b: any("run_xss" in t for t in _row_texts(b)), "no row")
    (row,) = [t for t in _row_texts(browser) if "run_xss" in t]
    assert image in row
    assert browser.find_elements(By.CSS_SELECTOR, "#rows img") == []
    browser.find_element(By.LINK_TEXT, "run_xss").click()
    wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "pre.body"), "no detail page")
    body = browser.find_element(By.CSS_SELECTOR, "pre.body").text
    assert "window.pwned = 'script'" in body
    assert "<script>" in body
    assert browser.execute_script("return document.scripts.length;") == 1  # the page's own
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    assert browser.execute_script("return typeof window.pwned;") == "undefined"


def _send_from_the_form(browser: Any, port: int, run_id: str, agent_name: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{port}/")
    browser.find_element(By.ID, "s-run").send_keys(run_id)
    browser.find_element(By.ID, "s-agent-name").send_keys(agent_name)
    browser.find_element(By.XPATH, "//button[normalize-space()='Send test event']").click()
    wait_for(browser, lambda b: "/deliveries/" in b.current_url, "the form did not redirect")


def test_a_failed_delivery_page_shows_the_error(inspector: int, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    _send_from_the_form(browser, inspector, "run_browser_fail", "Broken Agent")
    assert browser.find_element(By.ID, "state").text == "failed"
    notice = browser.find_element(By.CSS_SELECTOR, ".notice").text
    assert notice == "Test event sent. The receiver answered 500."
    handler = browser.find_element(By.CSS_SELECTOR, ".handler.failed")
    assert "tests.inspector.sample_app.save_profile" in handler.text
    assert "RuntimeError: the CRM refused the profile" in handler.text
    traceback = handler.find_element(By.CSS_SELECTOR, "pre.traceback")
    assert not traceback.is_displayed()  # folded until asked for
    handler.find_element(By.TAG_NAME, "summary").click()
    assert traceback.is_displayed()
    assert "Traceback (most recent call last)" in traceback.text
    assert 'raise RuntimeError("the CRM refused the profile")' in traceback.text


def test_replay_runs_the_fixed_handler_and_the_state_turns_handled(
    inspector: int, browser: Any, fixes: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _send_from_the_form(browser, inspector, "run_browser_replay", "Broken Agent")
    assert browser.find_element(By.ID, "state").text == "failed"
    (fixes / "run_browser_replay").touch()  # the fix is deployed
    replay = browser.find_element(By.XPATH, "//button[normalize-space()='Replay']")
    replay.send_keys(Keys.ENTER)  # a real button: the keyboard works
    wait_for(
        browser,
        lambda b: (
            b.find_elements(By.CSS_SELECTOR, ".notice")
            and b.find_element(By.CSS_SELECTOR, ".notice").text == "Replayed."
        ),
        "no replay notice",
    )
    assert browser.find_element(By.ID, "state").text == "handled"
    handler = browser.find_element(By.CSS_SELECTOR, ".handler")
    assert "ok" in handler.text
    assert browser.find_elements(By.CSS_SELECTOR, ".handler.failed") == []
    assert browser.find_element(By.ID, "attempts").text == "1"


def test_a_phone_sized_window_needs_no_sideways_scrolling(listener: int) -> None:
    _deliver(listener, run_id="run_phone_" + "x" * 60, agent_name="A rather long agent name")
    with chromium(width=390, height=844) as phone:
        phone.get(f"http://127.0.0.1:{listener}/")
        wait_for(phone, lambda b: _row_texts(b), "no rows")
        overflow = phone.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;"
        )
        assert overflow <= 0
