"""The webhook under ASGI (uvicorn): the async view keeps the event loop free."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from flymy_receiver.django import aview

from .webhooks import receiver

urlpatterns = [path("webhooks/flymy", aview(receiver)), path("admin/", admin.site.urls)]
