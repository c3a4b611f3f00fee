"""Databases for the Django tests: SQLite in a temporary file (alias ``default``) and, when
asked, a database on the throwaway PostgreSQL cluster (alias ``postgres``).

Each is migrated once per process; tests keep apart by emptying the app's tables.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_TMP = Path(tempfile.mkdtemp(prefix="flymy-django-"))
atexit.register(shutil.rmtree, _TMP, True)

#: What tests/conftest.py configures; a 30 s busy timeout, as the threads tests need.
DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(_TMP / "django.sqlite3"),
        "OPTIONS": {"timeout": 30},
    }
}

POSTGRES = "postgres"
_migrated: set[str] = set()


def migrated(alias: str = "default") -> str:
    """Migrate ``alias`` once per process; returns it."""
    if alias not in _migrated:
        from django.core.management import call_command

        call_command("migrate", database=alias, verbosity=0, interactive=False)
        _migrated.add(alias)
    return alias


def empty(alias: str = "default") -> None:
    """Delete every row of the app's tables on ``alias``."""
    from flymy_receiver.django import models

    for model in (models.DeliveryClaim, models.HandlerRecord, models.JournalEntry):
        model.objects.using(alias).all().delete()
    models.Refusal.objects.using(alias).all().delete()


def postgres_alias(server: Any) -> str:
    """The ``postgres`` alias on a fresh database of ``server``, migrated (once per process)."""
    from django.db import connections

    if POSTGRES not in connections.settings:
        url = urlsplit(server.create_database())
        settings = connections.configure_settings(
            {
                "default": dict(connections.settings["default"]),
                POSTGRES: {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": url.path.lstrip("/"),
                    "USER": url.username,
                    "HOST": url.hostname,
                    "PORT": str(url.port),
                    "TEST": {"NAME": url.path.lstrip("/")},
                },
            }
        )
        connections.settings[POSTGRES] = settings[POSTGRES]
    return migrated(POSTGRES)
