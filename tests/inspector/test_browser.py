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


def _texts(browser: Any, selector: str) -> list[str]:
    # Read in one script call: the page replaces its rows as it polls, so element handles
    # taken one by one could go stale between two calls.
    script = "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);"
    texts: list[str] = browser.execute_script(script, selector)
    return texts


def _row_texts(browser: Any) -> list[str]:
    return _texts(browser, "#rows tr")


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
        return next((t for t in _texts(b, "#refusals li") if "signature_mismatch" in t), "")

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
    _wait_for_detail(browser, "run.completed:run_xss")
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
    _wait_for_detail(browser, f"run.completed:{run_id}")


def _wait_for_detail(browser: Any, key: str) -> None:
    """Wait until the detail page of ``key`` has loaded (not just been navigated to)."""
    script = (
        "var a = document.querySelector('article.detail');"
        " return document.readyState === 'complete' && a !== null ? a.dataset.key : null;"
    )
    wait_for(browser, lambda b: b.execute_script(script) == key, f"no detail page for {key}")


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
    notice = "var n = document.querySelector('.notice'); return n ? n.textContent : null;"
    said = "Replayed: every handler succeeded; the delivery is handled."
    wait_for(browser, lambda b: b.execute_script(notice) == said, "no replay notice")
    _wait_for_detail(browser, "run.completed:run_browser_replay")
    assert browser.find_element(By.ID, "state").text == "handled"
    handler = browser.find_element(By.CSS_SELECTOR, ".handler")
    assert "ok" in handler.text
    assert browser.find_elements(By.CSS_SELECTOR, ".handler.failed") == []
    assert browser.find_element(By.ID, "attempts").text == "1"


def test_a_phone_sized_window_needs_no_sideways_scrolling(listener: int) -> None:
    from selenium.webdriver.common.by import By

    run_id = "run_phone_" + "x" * 60
    _deliver(listener, run_id=run_id, agent_name="A rather long agent name " * 3)
    with chromium(width=390, height=844) as phone:
        phone.get(f"http://127.0.0.1:{listener}/")
        wait_for(phone, lambda b: _row_texts(b), "no rows")
        pages = {"list": phone.execute_script(_OVERFLOW)}
        phone.find_element(By.LINK_TEXT, run_id).click()
        _wait_for_detail(phone, f"run.completed:{run_id}")
        pages["detail"] = phone.execute_script(_OVERFLOW)
        assert pages == {"list": 0, "detail": 0}


# How far the page is wider than the window (long lines scroll inside their own boxes).
_OVERFLOW = (
    "return Math.max(0, document.documentElement.scrollWidth"
    " - document.documentElement.clientWidth);"
)
