"""Minimal Django settings for the lead profiler webhook (no database, no apps needed)."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-set-DJANGO_SECRET_KEY")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    # Left on to show that the webhook view is exempt: it carries a signature, not a token.
    "django.middleware.csrf.CsrfViewMiddleware",
]
USE_TZ = True
