"""ASGI entry point: ``uvicorn django_project.asgi:application`` (from the examples folder)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from flymy_receiver.django import WebhookBodyLimit

from .webhooks import receiver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.asgi_settings")
# Django reads a whole body before any view runs: refuse oversized ones first.
application = WebhookBodyLimit(get_asgi_application(), receiver)
