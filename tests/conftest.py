"""Shared fixtures. Core tests must run with no web framework installed."""

from __future__ import annotations

import importlib.util
import os

import pytest

#: The throwaway PostgreSQL cluster's fixtures (postgres_server, postgres_url), for every test.
pytest_plugins = ["tests.postgres_server"]

SECRET = "whsec-test-secret"

# In CI a missing optional dependency is a failure, never a silent skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str) -> None:
    """Skip when ``module`` is missing locally; fail loudly in CI."""
    if importlib.util.find_spec(module) is None:
        if IN_CI:
            pytest.fail(f"{module} is required in CI but is not installed", pytrace=False)
        pytest.skip(f"{module} is not installed", allow_module_level=True)


if importlib.util.find_spec("django") is not None:
    import django
    from django.conf import settings

    if not settings.configured:
        from tests.django_db import DATABASES

        # One configuration for the whole test process; tests swap ROOT_URLCONF with
        # django.test.override_settings(ROOT_URLCONF=<a class with urlpatterns>). The app is
        # installed for the DjangoStore and admin tests; tests/adapters/test_django_app.py
        # checks, in a fresh process, that the views need neither it nor a database.
        settings.configure(
            DEBUG=False,
            SECRET_KEY="tests-only-not-secret",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF="tests.django_urls",
            MIDDLEWARE=[
                "django.middleware.common.CommonMiddleware",
                "django.middleware.csrf.CsrfViewMiddleware",
                "django.contrib.sessions.middleware.SessionMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware",
                "django.contrib.messages.middleware.MessageMiddleware",
            ],
            INSTALLED_APPS=[
                "django.contrib.admin",
                "django.contrib.auth",
                "django.contrib.contenttypes",
                "django.contrib.sessions",
                "django.contrib.messages",
                "flymy_receiver.django",
            ],
            DATABASES=DATABASES,
            TEMPLATES=[
                {
                    "BACKEND": "django.template.backends.django.DjangoTemplates",
                    "APP_DIRS": True,
                    "OPTIONS": {
                        "context_processors": [
                            "django.template.context_processors.request",
                            "django.contrib.auth.context_processors.auth",
                            "django.contrib.messages.context_processors.messages",
                        ]
                    },
                }
            ],
            PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # fast, tests
            USE_TZ=True,
        )
        django.setup()


@pytest.fixture
def secret() -> str:
    return SECRET
