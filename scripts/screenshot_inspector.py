"""Screenshot the inspector with a few sample deliveries, from a real headless Chromium.

    python scripts/screenshot_inspector.py [--output docs/inspector.png] [--width 1280]
        [--delivery-output docs/inspector-delivery.png]

Starts a development server on a free 127.0.0.1 port (this script with ``--serve``, as a
subprocess), posts realistic signed deliveries to it over HTTP (handled, failed after three
attempts, a duplicate, an event nobody handles, and two refused requests), opens the list (and
the failed delivery's own page: history, handlers, Replay, Resolve, Send elsewhere) in
Debian's Chromium through its chromedriver (``CHROMIUM`` / ``CHROMEDRIVER`` override the
paths; nothing is downloaded), saves the PNG and stops the server by its PID.
Needs the ``inspector`` and ``test`` extras (Selenium).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flymy_receiver import Receiver, RunCompleted, RunFailed  # noqa: E402
from flymy_receiver.stores import MemoryStore  # noqa: E402
from flymy_receiver.testing import make_event, signed_request, stale_request  # noqa: E402

SECRET = "whsec-screenshot-sample"  # noqa: S105 - a sample app's, shown nowhere
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
PATH = "/webhooks/flymy"


# -- the sample app (runs in the subprocess) ----------------------------------------------


def sample_receiver() -> Receiver:
    """An app in development: one handler per event, one of them failing for one agent."""
    receiver = Receiver(secret=SECRET, store=MemoryStore())

    @receiver.on("run.completed")
    def save_profile(event: RunCompleted) -> None:
        if event.data.agent_name == "Churn Predictor":
            raise ConnectionError("CRM API answered 503 Service Unavailable")

    @receiver.on("run.failed")
    def alert_owner(event: RunFailed) -> None:
        return None

    return receiver


def serve_sample(port: int) -> None:
    from flymy_receiver.devserver import development_app, serve

    serve(development_app(sample_receiver(), path=PATH), "127.0.0.1", port)


# -- driving it -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def sample_server() -> Iterator[int]:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port)]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the sample server did not start")
            time.sleep(0.1)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def post(port: int, body: bytes, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", PATH, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def send_samples(port: int) -> None:
    def deliver(name: str = "run.completed", times: int = 1, **fields: Any) -> None:
        request = signed_request(make_event(name, **fields), SECRET)
        for _ in range(times):
            post(port, request.body, request.headers)
            time.sleep(0.05)

    deliver(run_id="run_0d4419be", agent_name="Lead Scorer", agent_id="agent_score2")
    deliver(run_id="run_7f3a91c2", agent_name="Sales Lead Profiler", agent_id="agent_abc123")
    deliver(
        "run.failed",
        run_id="run_2b8e40d7",
        agent_name="Sales Lead Profiler",
        agent_id="agent_abc123",
        error={"type": "tool_error", "message": "web_search returned no results for query"},
    )
    deliver(run_id="run_c41d07aa", agent_name="Churn Predictor", agent_id="agent_churn9", times=3)
    deliver(
        run_id="run_5e09b6f1",
        agent_name="Lead Scorer",
        agent_id="agent_score2",
        output={"score": 97, "tier": "A"},
        times=2,
    )
    deliver("run.cancelled", run_id="run_90aa13e4", agent_id="agent_abc123", reason="user")
    forged = signed_request(make_event("run.completed"), "whsec-not-the-secret")
    post(port, forged.body, forged.headers)
    stale = stale_request("run.completed", SECRET)
    post(port, stale.body, stale.headers)
    deliver(run_id="run_e12f5c80", agent_name="Lead Scorer", agent_id="agent_score2")
    deliver(run_id="run_a7c2e9f3", agent_name="Sales Lead Profiler", agent_id="agent_abc123")


#: The delivery shown on the second screenshot: failed after three attempts.
FAILED_KEY = "run.completed%3Arun_c41d07aa"


def screenshot(
    port: int, output: Path, width: int, height: int, delivery_output: Path | None = None
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="flymy-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            # The viewport itself, whatever the window around it would take.
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            driver.get(f"http://127.0.0.1:{port}/")
            WebDriverWait(driver, 20).until(
                lambda d: d.execute_script(
                    "return document.querySelectorAll('#rows tr').length >= 5"
                    " && document.getElementById('live').textContent === 'live';"
                )
            )
            time.sleep(2)  # let the new-row highlight fade
            output.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(output))
            if delivery_output is not None:
                driver.get(f"http://127.0.0.1:{port}/deliveries/{FAILED_KEY}")
                WebDriverWait(driver, 20).until(
                    lambda d: d.execute_script(
                        "return document.readyState === 'complete'"
                        " && document.getElementById('history') !== null;"
                    )
                )
                delivery_output.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(delivery_output))
        finally:
            driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "inspector.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=860)
    parser.add_argument(
        "--delivery-output", type=Path, help="also screenshot a failed delivery's page here"
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve_sample(args.serve)
        return 0
    with sample_server() as port:
        send_samples(port)
        screenshot(port, args.output, args.width, args.height, args.delivery_output)
    for path in (args.output, args.delivery_output):
        if path is not None:
            print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
