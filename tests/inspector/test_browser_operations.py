"""The inspector's journal operations in a real browser (headless Chromium through Selenium):
Resolve, bulk replay with its dry-run count, older pages, and "copy as curl" giving a
command that the receiver accepts.

Servers are the real commands, on free loopback ports, stopped by PID: ``inspect --app``
over the sample app (failing handlers, fixed by creating a file) and ``listen``.
"""

from __future__ import annotations

import hmac
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver.signature import SIGNATURE_HEADER
from flymy_receiver.testing import make_event, signed_request
from tests.conftest import SECRET
from tests.inspector import sample_app
from tests.inspector.browser import chromium, require_browser, wait_for
from tests.servers import PYTHON, ROOT, free_port, post, serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fixes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixes")


@pytest.fixture(scope="module")
def inspector(fixes: Path) -> Iterator[int]:
    require_browser()
    port = free_port()
    argv = [PYTHON, "-m", "flymy_receiver", "inspect", "--port", str(port),
            "--app", "tests.inspector.sample_app:receiver"]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "SAMPLE_APP_FIX": str(fixes)}
    with serve(argv, port, env=env, cwd=ROOT):
        yield port


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    require_browser()
    port = free_port()
    argv = [PYTHON, "-m", "flymy_receiver", "listen", "--port", str(port), "--secret", SECRET]
    with serve(argv, port, env={"PYTHONPATH": str(ROOT)}):
        yield port


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def _text(browser: Any, element_id: str) -> str | None:
    script = "var e = document.getElementById(arguments[0]); return e ? e.textContent : null;"
    text: str | None = browser.execute_script(script, element_id)
    return text


def _wait_for_detail(browser: Any, key: str) -> None:
    script = (
        "var a = document.querySelector('article.detail');"
        " return document.readyState === 'complete' && a !== null ? a.dataset.key : null;"
    )
    wait_for(browser, lambda b: b.execute_script(script) == key, f"no detail page for {key}")


def _wait_for_index(browser: Any) -> None:
    script = "return document.readyState === 'complete' && document.body.dataset.page;"
    wait_for(browser, lambda b: b.execute_script(script) == "index", "no list page")


def _send_failing(browser: Any, port: int, run_id: str) -> None:
    """A test event from the page's own form, for the agent whose handler fails."""
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{port}/")
    browser.find_element(By.ID, "s-run").send_keys(run_id)
    browser.find_element(By.ID, "s-agent-name").send_keys("Broken Agent")
    browser.find_element(By.XPATH, "//button[normalize-space()='Send test event']").click()
    _wait_for_detail(browser, f"run.completed:{run_id}")
    assert _text(browser, "state") == "failed"


def _api(port: int, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
        return json.loads(answer.read())


def _rows(browser: Any) -> list[str]:
    script = "return Array.from(document.querySelectorAll('#rows tr'), e => e.dataset.key);"
    keys: list[str] = browser.execute_script(script)
    return keys


def test_resolve_with_a_note(inspector: int, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    _send_failing(browser, inspector, "run_b_resolve")
    browser.find_element(By.ID, "note-input").send_keys("refunded by hand")
    browser.find_element(By.ID, "resolve").click()
    said = "Resolved: kept in the journal, never replayed in bulk."
    wait_for(browser, lambda b: _text(b, "notice") == said, "no resolve notice")
    _wait_for_detail(browser, "run.completed:run_b_resolve")
    assert _text(browser, "state") == "resolved"
    assert _text(browser, "note") == "refunded by hand"
    failed = _api(inspector, "/api/deliveries?state=failed")["deliveries"]
    assert "run_b_resolve" not in [d["run_id"] for d in failed]


def test_bulk_replay_shows_the_dry_run_count_first(
    inspector: int, browser: Any, fixes: Path
) -> None:
    from selenium.webdriver.common.by import By

    for run_id in ("run_b_bulk1", "run_b_bulk2"):
        _send_failing(browser, inspector, run_id)
        (fixes / run_id).touch()  # the fix is deployed
    failed = [d["run_id"] for d in _api(inspector, "/api/deliveries?state=failed")["deliveries"]]
    assert {"run_b_bulk1", "run_b_bulk2"} <= set(failed)
    browser.get(f"http://127.0.0.1:{inspector}/?event=run.completed")
    _wait_for_index(browser)
    browser.find_element(By.ID, "bulk-dry-run").click()
    wait_for(browser, lambda b: _text(b, "bulk-count") is not None, "no dry-run count")
    count = f"{len(failed)} failed deliver{'y matches' if len(failed) == 1 else 'ies match'}"
    assert _text(browser, "bulk-count") == f"{count} this filter."
    # Nothing ran yet.
    assert len(_api(inspector, "/api/deliveries?state=failed")["deliveries"]) == len(failed)
    browser.find_element(By.ID, "bulk-run").click()
    wait_for(browser, lambda b: (_text(b, "notice") or "").startswith("Replayed "), "no report")
    notice = _text(browser, "notice") or ""
    handled = len(failed) - len([r for r in failed if not (fixes / r).exists()])
    assert notice.startswith(f"Replayed {len(failed)}: {handled} handled")
    still = [d["run_id"] for d in _api(inspector, "/api/deliveries?state=failed")["deliveries"]]
    assert "run_b_bulk1" not in still
    assert "run_b_bulk2" not in still


def test_older_pages(inspector: int, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    for n in range(3):  # whatever ran before on this server, at least three entries
        _send_failing(browser, inspector, f"run_b_page{n}")
    everything = [d["key"] for d in _api(inspector, "/api/deliveries")["deliveries"]]
    assert len(everything) >= 3
    browser.get(f"http://127.0.0.1:{inspector}/?limit=2")
    _wait_for_index(browser)
    wait_for(browser, lambda b: _rows(b) == everything[:2], "not the newest page")
    browser.find_element(By.ID, "older").click()
    _wait_for_index(browser)
    wait_for(browser, lambda b: _rows(b) == everything[2:4], "not the older page")
    assert "before=" in browser.current_url


def test_copy_as_curl_gives_a_command_the_receiver_accepts(listener: int, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    event = make_event("run.completed", run_id="run_b_curl", output={"note": 'it\'s "$x"'})
    request = signed_request(event, SECRET)
    assert post(listener, request.body, request.headers)[0] == 200
    browser.get(f"http://127.0.0.1:{listener}/deliveries/run_b_curl")
    _wait_for_detail(browser, "run.completed:run_b_curl")
    url = browser.find_element(By.ID, "resend-url").get_attribute("value")
    assert url == f"http://127.0.0.1:{listener}/webhooks/flymy"  # this receiver, by default
    browser.find_element(By.ID, "copy-curl").click()
    wait_for(browser, lambda b: _text(b, "curl-command"), "no command shown")
    command = _text(browser, "curl-command") or ""
    signature = hmac.new(SECRET.encode(), request.body, sha256).hexdigest()
    assert SECRET not in command
    assert signature not in command
    # The command's equivalent: its body, signed as it signs, POSTed to its URL.
    assignment, _, rest = command.partition("; signature=")
    (word,) = shlex.split(assignment)
    body = word.removeprefix("body=").encode()
    assert body == request.body
    assert shlex.quote(url) in rest
    mine = {"Content-Type": "application/json", SIGNATURE_HEADER: signature}
    assert post(listener, body, mine)[0] == 200
    # And the command itself, where a shell with openssl and curl is at hand: accepted with
    # the receiver's secret in the environment, refused with another (it really signs).
    if all(shutil.which(tool) for tool in ("bash", "openssl", "curl", "awk")):
        for secret, status in ((SECRET, "200"), (sample_app.SECRET, "401")):
            env = {"PATH": os.environ.get("PATH", ""), "FLYMY_WEBHOOK_SECRET": secret}
            done = subprocess.run(
                ["bash", "-c", command + " -o /dev/null -w '%{http_code}'"],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert done.stdout == status, done.stderr
