"""No store URL shows its password: in an error, a log line or a CLI message."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from flymy_receiver.errors import ConfigurationError
from flymy_receiver.stores import redacted_url, store_from_url
from flymy_receiver.stores.urls import without_credentials
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "hunter2-Pa55"

MALFORMED = [
    f"redis://:{PASSWORD}",  # the "@host" forgotten: urllib reads the password as a port
    f"redis://:{PASSWORD}@host:notaport/0",
    f"redis://user:{PASSWORD}@host:6379/0?socket_timeout=soon",
    f"rediss://:{PASSWORD}@[::1/0",
    f"redis://host/0?password={PASSWORD}&socket_timeout=x",
    f":{PASSWORD}@cache:6379",  # no scheme
    f"cache:{PASSWORD}",
    f"ftp://admin:{PASSWORD}@files",
    f"redis//:{PASSWORD}@cache",
    f"postgresql://app:{PASSWORD}@db:notaport/app",
    f"postgresql://app:{PASSWORD}@[db/app",
]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://user:pw@cache/0", "redis://user:***@cache/0"),  # only the password hidden
        ("rediss://u:p@ss/w@rd@h:1/0", "rediss://u:***@h:1/0"),  # an unescaped "@" or "/"
        ("redis://tok@cache/0", "redis://***@cache/0"),  # a lone user part may be a token
        ("redis://:pw", "redis://:***"),
        ("redis://cache:pw", "redis://cache:***"),
        ("pw@cache", "***@cache"),
        ("user:pw", "user:***"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
        ("unix:///tmp/r.sock?db=0&password=pw", "unix:///tmp/r.sock?db=0&password=***"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("sqlite:///deliveries.sqlite3", "sqlite:///deliveries.sqlite3"),
        ("memory://", "memory://"),
        # A mistyped scheme separator hides nothing but a password: the mistake shows.
        ("sqlite:deliveries.sqlite3", "sqlite:deliveries.sqlite3"),
        ("redis//localhost:6379", "redis//localhost:6379"),
        ("redis:/localhost:6379/0", "redis:/localhost:6379/0"),
        ("redis//cache:pw", "redis//cache:***"),
        ("redis//:pw@cache", "redis//***@cache"),
        ("redis://h\x1b[31m/0", "redis://h?[31m/0"),  # no terminal escape either
    ],
)
def test_redacted_url(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_a_long_url_is_cut_after_redaction() -> None:
    shown = redacted_url(f"redis://:{PASSWORD}@" + "h" * 500)
    assert PASSWORD not in shown
    assert len(shown) <= 120


@pytest.mark.parametrize("url", MALFORMED)
def test_store_from_url_errors_never_show_the_password(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    require("redis")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError) as info:
        store_from_url(url)
    error = info.value
    assert isinstance(error, ValueError)  # what callers catch
    shown = f"{error} {error!r} {error.__cause__!r}"
    if not error.__suppress_context__:
        shown += repr(error.__context__)
    assert PASSWORD not in shown
    assert PASSWORD not in caplog.text


def test_the_cli_never_shows_a_store_password() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flymy_receiver",
            "listen",
            "--port",
            "0",
            "--secret",
            "s",
            "--store",
            MALFORMED[0],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--store" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


def test_without_credentials_takes_them_out_of_messages_however_quoted() -> None:
    url = "redis://app:hun%40ter2@cache/0"
    message = f"cannot parse {url!r}: hun@ter2 and hun%40ter2"
    assert "ter2" not in without_credentials(message, url)
    query = "postgresql://db/app?password=s3cr3t&x=1"
    assert "s3cr3t" not in without_credentials(f"bad {query}", query)
    assert without_credentials("no credentials here", "sqlite:///x.db") == "no credentials here"


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("sqlite:deliveries.sqlite3", "did you mean sqlite:///deliveries.sqlite3?"),
        ("redis//localhost:6379", "did you mean redis://localhost:6379?"),
        ("postgresql:/db/app", "did you mean postgresql://db/app?"),
    ],
)
def test_a_mistyped_scheme_is_shown_with_a_hint(url: str, hint: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        store_from_url(url)
    assert repr(url) in str(info.value)
    assert hint in str(info.value)


def test_the_hint_never_shows_a_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        store_from_url(f"redis//:{PASSWORD}@cache:6379")
    assert "did you mean redis://***@cache:6379?" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_create_false_refuses_a_missing_sqlite_file_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"no SQLite database at 'deliveries\.sqlite3'"):
        store_from_url("sqlite:///deliveries.sqlite3", create=False)
    assert list(tmp_path.iterdir()) == []
    store = store_from_url("sqlite:///deliveries.sqlite3")  # the default creates it
    store.claim("k", 30.0)
    assert (tmp_path / "deliveries.sqlite3").exists()
    store_from_url("sqlite:///deliveries.sqlite3", create=False)  # now it opens
