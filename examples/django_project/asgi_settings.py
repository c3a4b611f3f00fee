"""The same settings, with the async view's URLs (used by asgi.py)."""

from __future__ import annotations

from .settings import *  # noqa: F403

ROOT_URLCONF = "django_project.asgi_urls"
