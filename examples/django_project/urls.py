"""The webhook under WSGI (gunicorn): a sync view."""

from __future__ import annotations

from django.urls import path

from flymy_receiver.django import view

from .webhooks import receiver

urlpatterns = [path("webhooks/flymy", view(receiver))]
