"""The Django app around the adapter: importable before the registry is ready, optional for
the views, migrations in step with the models, and the views safe under ATOMIC_REQUESTS."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flymy_receiver import Receiver, RunCompleted
from tests.conftest import SECRET, require
from tests.django.conftest import leads, request_for

ROOT = Path(__file__).resolve().parents[2]
URL = "/webhooks/flymy"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def test_importable_before_the_registry_and_the_views_need_no_app_nor_database() -> None:
    result = _python(
        """
        import flymy_receiver.django as adapter            # settings not even configured
        from flymy_receiver.django import DjangoStore, WebhookBodyLimit, aview, register, view
        store = DjangoStore()                               # touches no database
        from django.conf import settings
        settings.configure(SECRET_KEY="x", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                           INSTALLED_APPS=[], MIDDLEWARE=[], USE_TZ=True)
        import django
        django.setup()
        from django.test import Client
        from django.urls import path
        from flymy_receiver import Receiver
        from flymy_receiver.testing import make_event, signed_request
        receiver = Receiver("whsec-x")
        seen = []
        receiver.on("run.completed")(seen.append)
        urlpatterns = [path("webhooks/flymy", view(receiver))]
        req = signed_request(make_event("run.completed"), "whsec-x")
        response = Client().post("/webhooks/flymy", req.body, content_type="application/json",
                                 headers=req.headers)
        print(response.status_code, len(seen))
        try:
            store.claim("k", 1.0)
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first == "200 1"
    assert second.startswith("ConfigurationError")
    assert "INSTALLED_APPS" in second


def test_the_migrations_match_the_models() -> None:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("makemigrations", "flymy_receiver", check=True, dry_run=True, stdout=out)
    assert "No changes detected" in out.getvalue()


def test_the_app_label() -> None:
    from django.apps import apps

    config = apps.get_app_config("flymy_receiver")
    assert config.name == "flymy_receiver.django"


# -- ATOMIC_REQUESTS ---------------------------------------------------------------------


@pytest.fixture
def atomic_requests(alias: str) -> Iterator[str]:
    from django.db import connections

    settings_dict = connections[alias].settings_dict
    settings_dict["ATOMIC_REQUESTS"] = True
    yield alias
    settings_dict["ATOMIC_REQUESTS"] = False


def _failing_receiver(alias: str) -> Receiver:
    from django.db import connections

    from flymy_receiver.django import DjangoStore
    from tests.django.conftest import LEADS

    receiver = Receiver(SECRET, store=DjangoStore(using=alias))

    @receiver.on("run.completed")
    def save(event: RunCompleted) -> None:
        with connections[alias].cursor() as cursor:  # a database error: NULL in NOT NULL
            cursor.execute(f"INSERT INTO {LEADS} (run_id) VALUES (NULL)")  # noqa: S608

    return receiver


def _urls(view: Any) -> type:
    from django.urls import path

    return type("Urls", (), {"urlpatterns": [path(URL.lstrip("/"), view)]})


def _check_failed_is_journaled(receiver: Receiver, status: int) -> None:
    assert status == 500
    assert receiver.journal is not None
    entry = receiver.journal.get("run_atomic_requests")
    assert entry is not None  # not rolled back with the request
    assert entry.state == "failed"
    [outcome] = entry.handlers.values()
    assert outcome.error is not None
    assert "Error" in outcome.error


def test_the_view_under_atomic_requests_keeps_the_failed_record(atomic_requests: str) -> None:
    from django.test import Client, override_settings

    from flymy_receiver.django import view

    receiver = _failing_receiver(atomic_requests)
    body, headers = request_for("run_atomic_requests")
    with override_settings(ROOT_URLCONF=_urls(view(receiver))):
        response = Client().post(URL, body, content_type="application/json", headers=headers)
    _check_failed_is_journaled(receiver, response.status_code)
    assert leads(atomic_requests) == []


def test_the_async_view_under_atomic_requests(atomic_requests: str) -> None:
    # Django refuses ATOMIC_REQUESTS for an async view unless it is exempt.
    from asgiref.sync import sync_to_async
    from django.db import connections
    from django.test import AsyncClient, override_settings

    from flymy_receiver.django import aview

    receiver = _failing_receiver(atomic_requests)
    body, headers = request_for("run_atomic_requests")
    # The view's database work runs in asgiref's shared thread, whose connection an earlier
    # test in this process may have left pointing at a server that has stopped since.
    asyncio.run(sync_to_async(lambda: connections[atomic_requests].close())())
    with override_settings(ROOT_URLCONF=_urls(aview(receiver))):
        response = asyncio.run(
            AsyncClient().post(URL, body, content_type="application/json", headers=headers)
        )
    _check_failed_is_journaled(receiver, response.status_code)


def test_the_system_checks_pass_with_the_admin() -> None:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("check", stdout=out)
    assert "no issues" in out.getvalue()


def test_an_unreachable_database_is_a_503_that_names_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    require("psycopg")
    from django.db import connections

    from flymy_receiver.django import DjangoStore
    from tests.servers import free_port

    password = "pw-must-not-leak"
    alias = "unreachable"
    if alias not in connections.settings:
        configured = connections.configure_settings(
            {
                "default": dict(connections.settings["default"]),
                alias: {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": "app",
                    "USER": "app",
                    "PASSWORD": password,
                    "HOST": "127.0.0.1",
                    "PORT": str(free_port()),  # nothing listens there
                },
            }
        )
        connections.settings[alias] = configured[alias]
    receiver = Receiver(SECRET, store=DjangoStore(using=alias))
    receiver.on("run.completed")(lambda event: pytest.fail("ran without a claim"))
    response = receiver.handle(*request_for("run_unreachable"))
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert password not in caplog.text
    assert "OperationalError" in caplog.text
    assert password.encode() not in response.body
    connections[alias].close()
