"""A real Chromium driven by Selenium: Debian's browser and driver, nothing downloaded.

The binary and the driver are passed explicitly (``CHROMIUM`` and ``CHROMEDRIVER`` override
the Debian paths), so Selenium never looks for or fetches a browser of its own. A missing
browser fails the test in CI and skips it locally.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, require

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
#: Every wait for the page is bounded (the page polls once a second).
WAIT_S = 20


def require_browser() -> None:
    require("selenium")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        message = f"a browser is required for these tests: missing {', '.join(missing)}"
        if IN_CI:
            pytest.fail(f"{message} (apt-get install chromium chromium-driver)", pytrace=False)
        pytest.skip(message)


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A headless Chromium with a fresh profile, quit (and its driver stopped) at the end."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

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
            "--disable-default-apps",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        service = Service(executable_path=CHROMEDRIVER)
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_page_load_timeout(WAIT_S)
            yield driver
        finally:
            driver.quit()


def wait_for(driver: Any, condition: Any, message: str = "") -> Any:
    """Wait (at most :data:`WAIT_S`) until ``condition(driver)`` is truthy; return it.

    A condition that reads the page while a click's navigation replaces it may hold an
    element of the old page: that poll is stale, and the next one reads the new page."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, WAIT_S, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    return wait.until(condition, message)
