"""The webhook under WSGI (gunicorn): a sync view; the journal in the admin."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from flymy_receiver.django import view

from .webhooks import receiver

urlpatterns = [path("webhooks/flymy", view(receiver)), path("admin/", admin.site.urls)]
